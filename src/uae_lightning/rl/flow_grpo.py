"""Flow-GRPO math (PAPER.md "Stage 2c — U4G"): the flow ODE turned into an SDE so every denoising step is a Gaussian
policy with a log-probability. All math in float32.

Two conventions (`convention=`):
- "flow_grpo" (default): what Flow-GRPO's `sd3_sde_with_logprob.py` and `train_sd3.py` compute, so that its clip
  range (1e-4) and KL beta (0.01-0.04) mean what they mean there. SDE: the KL divides by the *unscaled* std_t^2.
  CPS: log-prob -(x_next - mu)^2 and KL mean((mu - mu_ref)^2), both without Gaussian constants.
- "gaussian": the exact Gaussian forms. SDE: the KL divides by the step variance std_t^2 |dt|. CPS: the full normal
  log-density (undefined at sigma_next = 0, where the step is deterministic).
The SDE log-prob is the normal log-density in both conventions.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from uae_lightning.choices import CONVENTIONS


class Step(NamedTuple):
    sample: torch.Tensor  # x_next (sampled, or the stored transition that was scored)
    log_prob: torch.Tensor  # [B], averaged over latent dimensions
    mean: torch.Tensor  # mu, the policy's mean for x_next
    kl_std: torch.Tensor | None  # [B]: the std in the KL's 1 / (2 std^2); None: the KL has no such factor


def _b(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample [B] (or scalar) tensor over the latent dimensions of `like`."""
    x = torch.as_tensor(x, dtype=torch.float32, device=like.device)
    return x.view(-1, *([1] * (like.dim() - 1))) if x.dim() == 1 else x


def _check(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}; expected one of {CONVENTIONS}")


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
             convention: str = "flow_grpo") -> Step:
    """One SDE step. With dt = sigma_next - sigma < 0 and std_t = a * sqrt(sigma / (1 - sigma)):

        mu      = x (1 + std_t^2 / (2 sigma) dt) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
        x_next  = mu + std_t sqrt(-dt) eps
        log p   = mean over latent dims of  -|x_next - mu|^2 / (2 std_t^2 (-dt)) - log(std_t sqrt(-dt)) - log sqrt(2 pi)
        kl_std  = std_t ("flow_grpo")  or  std_t sqrt(-dt) ("gaussian")

    At sigma = 1 the ratio sigma / (1 - sigma) uses sigma_next in the denominator (Flow-GRPO's sigma_max). Pass
    `prev_sample` to score a stored transition instead of sampling.
    """
    _check(convention)
    x, v = x.float(), v.float()
    sigma, sigma_next = _b(sigma, x), _b(sigma_next, x)
    dt = sigma_next - sigma
    denom = torch.where(sigma >= 1.0, 1 - sigma_next, 1 - sigma)
    std_t = noise_level * torch.sqrt(sigma / denom)
    mu = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std_t * torch.sqrt(-dt)
    if prev_sample is None:
        eps = torch.randn_like(x) if noise is None else noise.float()
        prev_sample = mu + step_std * eps
    prev_sample = prev_sample.float()
    kl_std = std_t if convention == "flow_grpo" else step_std
    n = x.shape[0]
    return Step(prev_sample, gaussian_logprob(prev_sample, mu, step_std), mu, _per_sample(kl_std, n))


def cps_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
             convention: str = "flow_grpo") -> Step:
    """Coefficients-preserving sampling step: std = sigma_next sin(a pi / 2), x0_hat = x - sigma v,
    x1_hat = x + (1 - sigma) v, mu = x0_hat (1 - sigma_next) + x1_hat sqrt(sigma_next^2 - std^2), x_next = mu + std eps.

    log p = -mean((x_next - mu)^2) and kl_std = None ("flow_grpo", Flow-CPS), or the normal log-density with
    kl_std = std ("gaussian")."""
    _check(convention)
    x, v = x.float(), v.float()
    sigma, sigma_next = _b(sigma, x), _b(sigma_next, x)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    mu = x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt((sigma_next**2 - std**2).clamp_min(0))
    if prev_sample is None:
        eps = torch.randn_like(x) if noise is None else noise.float()
        prev_sample = mu + std * eps
    prev_sample = prev_sample.float()
    if convention == "flow_grpo":
        return Step(prev_sample, -((prev_sample - mu) ** 2).flatten(1).mean(1), mu, None)
    return Step(prev_sample, gaussian_logprob(prev_sample, mu, std), mu, _per_sample(std, x.shape[0]))


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(-1)


def gaussian_logprob(sample: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(sample; mu, std^2), averaged over the latent dimensions (the clip range is tuned for it)."""
    std = (std if std.dim() == mu.dim() else _b(std, mu)).expand_as(mu)
    lp = -((sample - mu) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def step_kl(mu: torch.Tensor, mu_ref: torch.Tensor, kl_std: torch.Tensor | None) -> torch.Tensor:
    """Per-sample KL term between the policy's and the reference's step: mean((mu - mu_ref)^2) / (2 kl_std^2), or
    mean((mu - mu_ref)^2) when kl_std is None (Flow-CPS). `kl_std` comes from the step function's `Step`."""
    sq = ((mu.float() - mu_ref.float()) ** 2).flatten(1).mean(1)
    return sq if kl_std is None else sq / (2 * kl_std.float() ** 2)


def nonzero_advantage(advantages: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO trains only on samples whose advantage is not exactly zero (a group whose rewards were all equal
    carries no signal; its samples would only add KL). Returns the boolean mask of the samples to keep."""
    return advantages != 0
