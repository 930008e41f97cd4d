"""Stage 1 — decoder pre-training on long captions (PAPER.md "Stage 1").

Encoder frozen; connector + DiT (full or LoRA) learn the SD3 rectified-flow objective:
z_t = (1 - t) z0 + t eps, target = eps - z0, loss = mean(w(t) (v_theta(z_t, t, c) - target)^2),
with c = connector(encoder hidden states of the caption's text-only "generate" message).
"""
from __future__ import annotations

import torch

from uae_lightning.choices import SIGMA_SAMPLINGS
from uae_lightning.models.flow import flow_matching_loss, noisy_latents, sample_t, sigmas_from_density
from uae_lightning.stages.base import UAEStage


class DecoderPretraining(UAEStage):
    def __init__(
        self,
        model: dict,
        resolution: int,
        init_from: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        caption_dropout: float = 0.1,
        weighting_scheme: str = "logit_normal",
        sigma_sampling: str = "scheduler",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        max_nonfinite_in_a_row: int = 5,
        eval_steps: int = 10,
        eval_guidance_scale: float = 1.0,
        negative_prompt: str = "",
        eval_seed: int = 1234,
    ):
        super().__init__(model, resolution, init_from)
        if sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"stages.pretrain.module.sigma_sampling={sigma_sampling!r}; expected one of {SIGMA_SAMPLINGS}")
        self.save_hyperparameters(ignore=["init_from"])
        self._train_sigmas: torch.Tensor | None = None

    def configure_trainable(self) -> None:
        self.train_decoder(self.hparams.lora, self.hparams.gradient_checkpointing)

    def training_step(self, batch: dict, batch_idx: int):
        if not self.count_data(batch):
            return None
        h = self.hparams
        images, captions = batch["images"], list(batch["caption"])
        # Drop captions at random so the decoder also learns the unconditional field (classifier-free guidance).
        # Every draw is made for the global batch and sliced to this rank (global_draw), so the loss does not
        # depend on how the batch is split over processes.
        n = len(captions)
        drop = self.global_draw(torch.rand, n) < h.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            hidden, mask = self.encoder.condition(captions)
            z0 = self.decoder.encode(images)
        cond = self.connector(hidden)
        noise = self.global_draw(lambda k: torch.randn(k, *z0.shape[1:]), n).to(z0)
        if self._train_sigmas is None:
            self._train_sigmas = self.decoder.train_sigmas()
        u = self.global_draw(lambda k: sample_t(k, h.weighting_scheme, h.logit_mean, h.logit_std, h.mode_scale, "cpu"), n)
        t = sigmas_from_density(u, self._train_sigmas, h.sigma_sampling).to(z0.device)
        v = self.decoder.velocity(noisy_latents(z0, noise, t), t, cond, mask)
        loss = flow_matching_loss(v, z0, noise, t, h.weighting_scheme)
        if not self.finite_or_skip(loss.detach(), "loss", h.max_nonfinite_in_a_row):
            return None
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def heldout_settings(self) -> None:
        return None  # its own test (complete vs empty caption), shared with no other stage

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out reconstructions from the complete caption vs. from an empty caption, same noise."""
        if not self.count_data(batch):
            return
        images, n = batch["images"], len(batch["images"])
        noise = self.image_noise(batch, self.hparams.eval_seed)
        full = self.redraw(list(batch["caption"]), noise, self.hparams.eval_steps)
        empty = self.redraw([""] * n, noise, self.hparams.eval_steps)
        self.eval_metric("similarity_complete_caption", self.reward.score(full, images), batch)
        self.eval_metric("similarity_empty_caption", self.reward.score(empty, images), batch)

    def preview(self, batch: dict) -> dict:
        """For the image logger: originals and reconstructions from their complete captions."""
        return {"captions": list(batch["caption"]),
                "reconstructions": self.redraw(list(batch["caption"]), self.sample_noise(len(batch["images"]), self.hparams.eval_seed),
                                               self.hparams.eval_steps)}
