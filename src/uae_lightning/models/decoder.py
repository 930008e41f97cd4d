"""The decoder (image generation): SD3 MMDiT + optional VAE + flow-matching scheduler, conditioned on the connector.

PAPER.md "Stage 1": z_t = (1 - t) z0 + t eps, target = eps - z0. The connector output replaces SD3's text
embeddings; the pooled projection is a frozen vector (buffer `pooled`).
With `vae=None` the decoder works in pixel space (z = 2x - 1): the toy world's documented choice, since a tiny
random VAE cannot reconstruct anything.

This file imports only torch and diffusers: an export's decoder/ folder ships it beside its pipeline.py, so the
exported decoder loads where this package is not installed (pipeline.py, UAEPipeline.save_pretrained).
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn


def seed_for(key: str, seed: int) -> int:
    """A per-item seed from a name (an image's file name, a prompt): its noise never depends on which batch or rank it
    lands in, so a sharded or resumed evaluation draws what one uninterrupted process draws."""
    return (zlib.crc32(key.encode()) + seed * 1_000_003) % (2**63)


def euler_step(z: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One step of the flow ODE dz/dsigma = v from sigma to sigma_next (< sigma): z + (sigma_next - sigma) v. The
    sampler's step, and U4G's on the rollout steps it does not explore."""
    return z + (sigma_next - sigma) * v


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


class MaskedJointAttnProcessor:
    """SD3 joint attention with a key mask on the conditioning tokens. diffusers' JointAttnProcessor2_0 has no mask:
    padded conditioning tokens are attended, so a caption's image would depend on what else is in its batch. This
    processor drops padded keys; it is installed with the public `set_attn_processor` and receives the mask through
    `joint_attention_kwargs={"attention_mask": mask}`."""

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


class Decoder(nn.Module):
    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL | None,
        pooled: torch.Tensor,
        mask_condition: bool = True,
    ):
        super().__init__()
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae = vae
        self.register_buffer("pooled", pooled.reshape(-1).float(), persistent=True)
        self.mask_condition = mask_condition
        if mask_condition:
            transformer.set_attn_processor(MaskedJointAttnProcessor())

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def joint_attention_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    def latent_size(self, resolution: int) -> int:
        if self.vae is None:
            return resolution
        return resolution // (2 ** (len(self.vae.config.block_out_channels) - 1))

    def seeded_noise(self, seeds: list[int], resolution: int) -> torch.Tensor:
        """Initial noise at `resolution`, one CPU generator per seed: an image's draw depends only on its seed, not
        on its batch, rank or device (on CPU; move it where it is used)."""
        size = self.latent_size(resolution)
        return torch.stack([torch.randn(self.latent_channels, size, size, generator=torch.Generator().manual_seed(s))
                            for s in seeds])

    # ---- latents <-> images -------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] -> z0 (scaled and shifted by the VAE config, PAPER.md stage 1)."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample()
        shift = self.vae.config.shift_factor or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            shift = self.vae.config.shift_factor or 0.0
            z = self.vae.decode((z / self.vae.config.scaling_factor + shift).to(self.vae.dtype)).sample.float()
        return ((z + 1) / 2).clamp(0, 1)

    # ---- the velocity field ------------------------------------------------------------------------------------
    def velocity(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """v_theta(z_t, t, c); `sigma` is t in [0,1] per sample (SD3 takes timestep = 1000 t)."""
        dtype = self.transformer.dtype
        kwargs = {"attention_mask": mask} if (self.mask_condition and mask is not None) else None
        out = self.transformer(
            hidden_states=z.to(dtype),
            encoder_hidden_states=cond.to(dtype),
            pooled_projections=self.pooled.to(dtype).expand(z.shape[0], -1),
            timestep=(sigma * 1000).to(dtype),
            joint_attention_kwargs=kwargs,
        ).sample
        return out.float()

    def train_sigmas(self) -> torch.Tensor:
        """The N training sigmas of a fresh scheduler with this one's config (shift included), from ~1 down; the
        sampling scheduler's own sigmas change with every `set_timesteps`."""
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config).sigmas.float()

    def sigmas(self, num_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The scheduler's sigma schedule (with its shift), num_steps + 1 values from 1 down to 0."""
        self.scheduler.set_timesteps(num_steps, device=device)
        return self.scheduler.sigmas.float().to(device)

    def guided_velocity(self, z, sigma, cond, mask, guidance_scale: float = 1.0, negative=None) -> torch.Tensor:
        """Velocity with classifier-free guidance against the encoded negative prompt (`negative` = (cond, mask))."""
        if guidance_scale == 1.0 or negative is None:
            return self.velocity(z, sigma, cond, mask)
        neg_cond, neg_mask = negative
        length = max(cond.shape[1], neg_cond.shape[1])
        c = torch.cat([_pad_to(neg_cond, length), _pad_to(cond, length)])
        m = torch.cat([_pad_to(neg_mask, length), _pad_to(mask, length)]) if mask is not None else None
        v_neg, v_pos = self.velocity(torch.cat([z, z]), torch.cat([sigma, sigma]), c, m).chunk(2)
        return v_neg + guidance_scale * (v_pos - v_neg)

    def sample(
        self,
        cond: torch.Tensor,
        mask: torch.Tensor | None,
        noise: torch.Tensor,
        num_steps: int,
        guidance_scale: float = 1.0,
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
        grad_last_steps: int = 0,
        checkpoint_steps: bool = False,
    ) -> torch.Tensor:
        """Deterministic Euler ODE sampler from noise (sigma=1) to z0; returns latents.

        Gradients flow through only the last `grad_last_steps` steps (0 = none), as in DRaFT-K; with
        `checkpoint_steps` each of those steps recomputes its activations in backward instead of storing them.
        """
        sigmas = self.sigmas(num_steps, noise.device)
        z = noise.float()
        for i in range(num_steps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= num_steps - grad_last_steps):
                s = sigmas[i].expand(z.shape[0])
                if checkpoint_steps and torch.is_grad_enabled():
                    v = torch.utils.checkpoint.checkpoint(
                        self.guided_velocity, z, s, cond, mask, guidance_scale, negative, use_reentrant=False)
                else:
                    v = self.guided_velocity(z, s, cond, mask, guidance_scale, negative)
                z = euler_step(z, v, sigmas[i], sigmas[i + 1])
        return z


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], 1)
