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


# Models with a joint image-text embedding: features are `get_image_features` (the projected pooled output).
CONTRASTIVE_TYPES = ("clip", "siglip", "siglip2", "chinese_clip", "altclip")


class HFBackbone(Backbone):
    """Any Hugging Face image model, by hub id or local path: CLIP/SigLIP-style models use their projected image
    features (`get_image_features`); other vision models (DINOv2, DINOv3, ViT, ...) their CLS token (`pooler_output`
    when the model has one, else the first token of `last_hidden_state`).

    Pre-processing follows the checkpoint's image processor (size, mean, std) but is done in torch, so gradients
    reach the images (the cold start backpropagates through it).
    """

    def __init__(self, name_or_path: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        config = AutoConfig.from_pretrained(name_or_path)
        self.contrastive = config.model_type in CONTRASTIVE_TYPES
        self.model = AutoModel.from_pretrained(name_or_path, dtype=dtype).eval()
        proc = AutoImageProcessor.from_pretrained(name_or_path)
        size = getattr(proc, "crop_size", None) or proc.size
        size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
        if "height" in size:
            self.size = (size["height"], size["width"])
        else:
            edge = size.get("shortest_edge") or size.get("longest_edge")
            self.size = (edge, edge)
        self.register_buffer("mean", torch.tensor(proc.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(proc.image_std).view(1, 3, 1, 1), persistent=False)
        self.name = name_or_path

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=self.size, mode="bicubic", align_corners=False, antialias=True)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.model.dtype)
        if self.contrastive:
            out = self.model.get_image_features(pixel_values=x)
            return out if torch.is_tensor(out) else out.pooler_output
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class ToyPalette(Backbone):
    """How much of each toy object colour an image contains, wherever it is: soft-assigns every pixel to the
    toy palette (objects and background) and keeps the object colours' shares. Rewards the right colours and
    sizes even when positions are wrong, so captions that only name colours already score."""

    def __init__(self, temperature: float = 0.02):
        super().__init__()
        from uae_lightning.data.toy import BACKGROUND, COLOURS

        palette = torch.tensor([BACKGROUND, *COLOURS.values()], dtype=torch.float32) / 255.0
        self.register_buffer("palette", palette, persistent=False)
        self.temperature = temperature

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(2).transpose(1, 2)  # [B, HW, 3]
        d = ((x[:, :, None, :] - self.palette) ** 2).sum(-1)  # [B, HW, K]
        shares = torch.softmax(-d / self.temperature, -1).mean(1)  # [B, K]
        return shares[:, 1:].sqrt() + 1e-6  # object colours only; sqrt so a small object still counts


BACKBONES: dict[str, Callable[[], Backbone]] = {
    "toy_pixels": ToyPixels, "toy_regions": ToyRegionColours, "toy_palette": ToyPalette,
}
# The paper's Unified-Bench backbones (hub ids; local paths work the same way).
PAPER_BACKBONES = {
    "clip": "openai/clip-vit-large-patch14",
    "dinov2": "facebook/dinov2-large",
    "dinov3": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "longclip": "BeichenZhang/LongCLIP-L",
}


def build_backbone(name: str) -> Backbone:
    """A toy backbone by name, a paper backbone by short name (clip, dinov2, dinov3, longclip), or any Hugging Face
    image model by id or local path."""
    if name in BACKBONES:
        return BACKBONES[name]()
    if name.startswith("toy_"):
        raise ValueError(f"reward.backbones: unknown toy backbone {name!r}; expected one of {sorted(BACKBONES)}")
    try:
        return HFBackbone(PAPER_BACKBONES.get(name, name))
    except OSError as e:
        raise ValueError(
            f"reward.backbones: cannot load {name!r} ({e.__class__.__name__}); expected a toy backbone "
            f"{sorted(BACKBONES)}, a paper backbone {sorted(PAPER_BACKBONES)}, or a Hugging Face id / local path"
        ) from e


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
