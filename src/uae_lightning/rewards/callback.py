"""The reward callback every stage shares: owns the frozen similarity backbones, places them on the stage's device
once, and logs reward statistics. It is a Callback, not a submodule, so the backbones are never trained, saved in
checkpoints, or wrapped/sharded with the policy."""
from __future__ import annotations

import lightning as L
import torch

from uae_lightning.rewards.backbones import Similarity


class RewardCallback(L.Callback):
    def __init__(self, backbones: dict[str, float], sources: dict[str, str] | None = None):
        super().__init__()
        self.similarity = Similarity(dict(backbones), dict(sources or {}))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.similarity.to(pl_module.device).eval()

    def state_dict(self) -> dict:
        return {}  # nothing to save: the backbones are frozen and rebuilt from config

    def score(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Reward per image: weighted cosine similarity of backbone features (differentiable in `images`)."""
        return self.similarity(images, references.to(images.device))

    def per_backbone(self, images: torch.Tensor, references: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.similarity.per_backbone(images, references.to(images.device))

    @staticmethod
    def log_stats(pl_module: L.LightningModule, rewards: torch.Tensor, prefix: str = "reward") -> None:
        r = rewards.detach().float()
        pl_module.log_dict({f"{prefix}/mean": r.mean(), f"{prefix}/std": r.std() if r.numel() > 1 else r.new_zeros(()),
                            f"{prefix}/min": r.min(), f"{prefix}/max": r.max()})
