"""Frozen image backbones whose feature cosine similarity scores a reconstruction against its original.

Each backbone maps images (float [B,3,H,W] in [0,1]) to L2-normalised features. The toy world's backbones are
weight-free, so the embedded default needs no download; they register exactly like the Hugging Face ones.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Backbone(nn.Module):
    """Base class: subclasses implement `embed`; `forward` returns normalised float32 features.

    Differentiable (the cold start backpropagates through it); parameters are frozen by `Similarity`."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(images).float().flatten(1), dim=-1)


class ToyPixels(Backbone):
    """Low-resolution pixels, centred per image: the cosine is the Pearson correlation of two 8x8 thumbnails."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)
        return x - x.mean(1, keepdim=True)


class ToyRegionColours(Backbone):
    """Per-region colour statistics on a 3x3 grid (mean and spread of each channel), centred over regions."""

    def __init__(self, grid: int = 3):
        super().__init__()
        self.grid = grid

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        mean = F.adaptive_avg_pool2d(x, self.grid)
        spread = (F.adaptive_avg_pool2d(x * x, self.grid) - mean * mean).clamp_min(0).sqrt()
        feats = torch.cat([mean, spread], 1).flatten(2)  # [B, 6, grid*grid]
        return feats - feats.mean(2, keepdim=True)


BACKBONES: dict[str, Callable[[], Backbone]] = {"toy_pixels": ToyPixels, "toy_regions": ToyRegionColours}


def build_backbone(name: str) -> Backbone:
    if name in BACKBONES:
        return BACKBONES[name]()
    raise ValueError(f"reward.backbones: unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")


class Similarity(nn.Module):
    """Weighted sum of per-backbone cosine similarities; never trained, never saved in checkpoints."""

    def __init__(self, backbones: dict[str, float]):
        super().__init__()
        if not backbones:
            raise ValueError("reward.backbones is empty; name at least one backbone with a weight")
        for name, w in backbones.items():
            if not w > 0:
                raise ValueError(f"reward.backbones.{name}={w}: weights must be > 0")
        total = sum(backbones.values())
        self.weights = {k: v / total for k, v in backbones.items()}
        self.backbones = nn.ModuleDict({k: build_backbone(k) for k in backbones})
        self.requires_grad_(False)

    def per_backbone(self, images: torch.Tensor, references: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: (b(images) * b(references)).sum(-1) for k, b in self.backbones.items()}

    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        scores = self.per_backbone(images, references)
        return sum(self.weights[k] * s for k, s in scores.items())
