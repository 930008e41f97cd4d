"""GRPO math (PAPER.md "Stage 2b — G4U"): group advantages, the token-level clipped surrogate, the k3 KL
estimator and the loss aggregations. Pure functions of tensors; stages call them, tests check them by hand."""
from __future__ import annotations

import torch

from uae_lightning.choices import ADVANTAGE_SCALES, LOSS_AGGREGATIONS


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     unbiased: bool = True, batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps)   (scale="group")

    scale="batch" divides by the std of the whole batch instead (Flow-GRPO's `global_std`; pass `batch_rewards`, the
    rewards gathered from every rank, when the batch is split over processes), "none" only centres per group.
    `rewards` is flat, groups contiguous ([g0 s0, g0 s1, ..., g1 s0, ...]). A group whose rewards are all equal gets
    advantage 0. `unbiased`: the sample std (torch.std, as TRL's GRPO) or the population std (np.std, as Flow-GRPO).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"advantage scale={scale!r}; expected one of {ADVANTAGE_SCALES}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    correction = 1 if unbiased else 0
    if scale == "group":
        centred = centred / (r.std(1, keepdim=True, correction=correction) + eps)
    elif scale == "batch":
        everything = rewards if batch_rewards is None else batch_rewards
        centred = centred / (everything.float().std(correction=correction) + eps)
    return centred.view(-1)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) with rho = exp(logp - old_logp).

    `advantages` broadcasts over tokens ([B] or [B,1] against [B,T]). Returns (loss, ratio, clipped) where
    `clipped` marks tokens whose clipped term was the one taken (the clip fraction's numerator).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.view(-1, *([1] * (logp.dim() - 1))) if advantages.dim() == 1 else advantages
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, ratio, (clipped < unclipped)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased under pi)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_length: int | None = None,
              num_tokens: float | None = None) -> torch.Tensor:
    """Reduce a [B,T] per-token loss to a scalar, as TRL's GRPO `loss_type`:

    grpo:    mean over sequences of (sum of the sequence's tokens / its length)
    bnpo:    sum over all tokens / number of tokens in this batch
    dr_grpo: sum over all tokens / (B * max_length)        (max_length: the generation cap)
    dapo:    sum over all tokens / num_tokens               (tokens in the whole rollout batch, all micro-batches;
                                                             across ranks: global tokens / number of processes, TRL)
    """
    m = mask.to(per_token.dtype)
    total = (per_token * m).sum()
    if mode == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if mode == "bnpo":
        return total / m.sum().clamp(min=1)
    if mode == "dr_grpo":
        if max_length is None:
            raise ValueError("loss aggregation 'dr_grpo' needs max_length (the generation cap)")
        return total / (per_token.shape[0] * max_length)
    if mode == "dapo":
        if num_tokens is None:
            raise ValueError("loss aggregation 'dapo' needs num_tokens (tokens in the whole rollout batch)")
        return total / max(float(num_tokens), 1.0)
    raise ValueError(f"loss aggregation={mode!r}; expected one of {LOSS_AGGREGATIONS}")


def dapo_num_tokens(mask: torch.Tensor) -> torch.Tensor:
    """dapo's normaliser on this process, as TRL computes it: the completion tokens of the whole rollout batch summed
    over all processes, divided by the number of processes. Gradients are then averaged over processes (DDP, FSDP), so
    the update is (sum over every token) / (every token), however the batch is split. A collective when distributed."""
    n = mask.sum().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(n)
        n = n / torch.distributed.get_world_size()
    return n


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token_t | prefix) from logits aligned with `tokens` ([B,T,V], [B,T]); logits are divided by the
    sampling temperature, so the log-probs are those of the distribution the tokens were sampled from."""
    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)
