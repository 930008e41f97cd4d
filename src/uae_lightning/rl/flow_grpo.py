"""Flow-GRPO math (PAPER.md "Stage 2c — U4G"): the flow ODE turned into an SDE so every denoising step is a Gaussian
policy with a log-probability. All math in float32."""
from __future__ import annotations

import math

import torch


def _b(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample [B] (or scalar) tensor over the latent dimensions of `like`."""
    x = torch.as_tensor(x, dtype=torch.float32, device=like.device)
    return x.view(-1, *([1] * (like.dim() - 1))) if x.dim() == 1 else x


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None):
    """One SDE step. With dt = sigma_next - sigma < 0 and std_t = a * sqrt(sigma / (1 - sigma)):

        mu      = x (1 + std_t^2 / (2 sigma) dt) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
        x_next  = mu + std_t sqrt(-dt) eps
        log p   = mean over latent dims of  -|x_next - mu|^2 / (2 std_t^2 (-dt)) - log(std_t sqrt(-dt)) - log sqrt(2 pi)

    At sigma = 1 the ratio sigma / (1 - sigma) uses sigma_next in the denominator (PAPER.md). Pass `prev_sample` to
    score a stored transition instead of sampling. Returns (x_next, log_prob [B], mu, step_std [B]).
    """
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
    return prev_sample, gaussian_logprob(prev_sample.float(), mu, step_std), mu, _per_sample(step_std, x.shape[0])


def cps_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None):
    """Coefficients-preserving sampling step: std = sigma_next sin(a pi / 2), x0_hat = x - sigma v,
    x1_hat = x + (1 - sigma) v, mu = x0_hat (1 - sigma_next) + x1_hat sqrt(sigma_next^2 - std^2);
    x_next = mu + std eps. Same returns as `sde_step`."""
    x, v = x.float(), v.float()
    sigma, sigma_next = _b(sigma, x), _b(sigma_next, x)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    mu = x0_hat * (1 - sigma_next) + x1_hat * torch.sqrt((sigma_next**2 - std**2).clamp_min(0))
    if prev_sample is None:
        eps = torch.randn_like(x) if noise is None else noise.float()
        prev_sample = mu + std * eps
    return prev_sample, gaussian_logprob(prev_sample.float(), mu, std), mu, _per_sample(std, x.shape[0])


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(-1)


def gaussian_logprob(sample: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(sample; mu, std^2), averaged over the latent dimensions (the clip range is tuned for it)."""
    std = (std if std.dim() == mu.dim() else _b(std, mu)).expand_as(mu)
    lp = -((sample - mu) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def step_kl(mu: torch.Tensor, mu_ref: torch.Tensor, step_std: torch.Tensor) -> torch.Tensor:
    """KL between the policy's and the reference's step Gaussians (same std): mean((mu - mu_ref)^2) / (2 std^2)."""
    return ((mu.float() - mu_ref.float()) ** 2).flatten(1).mean(1) / (2 * step_std.float() ** 2)
