"""SD3 joint attention with a key mask on the conditioning tokens.

diffusers' JointAttnProcessor2_0 has no mask: padded conditioning tokens are attended, so a caption's image would
depend on what else is in its batch. This processor drops padded keys; it is installed with the public
`set_attn_processor` and receives the mask through `joint_attention_kwargs={"attention_mask": mask}`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


class MaskedJointAttnProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual_len = hidden_states.shape[1]
        b = hidden_states.shape[0]
        q, k, v = (_heads(p(hidden_states), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        key_mask = None
        if encoder_hidden_states is not None:
            cq, ck, cv = (_heads(p(encoder_hidden_states), attn.heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            if attention_mask is not None:
                image_keys = torch.ones(b, residual_len, dtype=torch.bool, device=q.device)
                key_mask = torch.cat([image_keys, attention_mask.to(q.device, torch.bool)], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, ctx = out[:, :residual_len], out[:, residual_len:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](out)), ctx
