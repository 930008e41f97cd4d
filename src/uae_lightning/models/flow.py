"""Rectified-flow training math (PAPER.md "Stage 1 — decoder pre-training"), as small pure functions."""
from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from uae_lightning.choices import SIGMA_SAMPLINGS, WEIGHTING_SCHEMES


def sample_t(n: int, scheme: str, logit_mean: float, logit_std: float, mode_scale: float, device, generator=None) -> torch.Tensor:
    """t in (0,1) per sample: logit-normal (default, mean 0 std 1), "mode", or uniform for the weighted schemes."""
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme={scheme!r}; expected one of {WEIGHTING_SCHEMES}")
    return compute_density_for_timestep_sampling(scheme, n, logit_mean, logit_std, mode_scale, device=device, generator=generator)


def sigmas_from_density(u: torch.Tensor, train_sigmas: torch.Tensor, mapping: str) -> torch.Tensor:
    """Noise levels for density samples u in (0, 1).

    "scheduler" (diffusers' SD3 training script): u picks a training timestep, index = floor(u * N), and the noise
    level is the training scheduler's (shifted) sigma there; `train_sigmas` are its N sigmas, from ~1 down to 1/N
    before the shift (SD3.5-large: shift 3.0, so u = 0.5 gives sigma 0.75). "density": sigma = u, no shift.
    """
    if mapping not in SIGMA_SAMPLINGS:
        raise ValueError(f"sigma_sampling={mapping!r}; expected one of {SIGMA_SAMPLINGS}")
    if mapping == "density":
        return u
    n = len(train_sigmas)
    idx = (u * n).long().clamp(0, n - 1)
    return train_sigmas.to(u.device)[idx.to(u.device)].to(u.dtype)


def noisy_latents(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) z0 + t eps."""
    t = t.view(-1, *([1] * (z0.dim() - 1)))
    return (1 - t) * z0 + t * noise


def flow_matching_loss(v_pred: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheme: str) -> torch.Tensor:
    """mean(w(t) * (v - (eps - z0))^2); w = 1 except for the "sigma_sqrt" and "cosmap" schemes."""
    w = compute_loss_weighting_for_sd3(scheme, t).view(-1, *([1] * (z0.dim() - 1)))
    return (w * (v_pred.float() - (noise - z0).float()) ** 2).mean()

