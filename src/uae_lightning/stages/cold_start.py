"""Stage 2a — cold start: semantic reconstruction (PAPER.md "Stage 2a").

For an image x and its caption y: c = connector(encoder(y)), x_hat = decode(sample K steps from noise), with
gradients through the last k sampler steps only (DRaFT-K style truncation) and optional activation checkpointing
per step; loss = 1 - cos(phi(x_hat), phi(x)) with phi the frozen reward backbones (features of x without grad).
Trains connector + decoder, and the encoder's language model through LoRA when `encoder_lora` is set.
"""
from __future__ import annotations

import torch

from uae_lightning.stages.base import UAEStage


class ColdStart(UAEStage):
    def __init__(
        self,
        model: dict,
        resolution: int,
        init_from: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        num_steps: int = 10,
        grad_last_steps: int = 2,
        guidance_scale: float = 1.0,
        checkpoint_steps: bool = False,
        decoder_lora: dict | None = None,
        encoder_lora: dict | None = None,
        gradient_checkpointing: bool = False,
        max_nonfinite_in_a_row: int = 5,
        eval_steps: int = 10,
        eval_guidance_scale: float = 1.0,
        negative_prompt: str = "",
        eval_seed: int = 1234,
        max_new_tokens: int = 48,
    ):
        super().__init__(model, resolution, init_from)
        self.report_before = True  # summary.json gets <metric>_before and <metric>_after
        if not 1 <= grad_last_steps <= num_steps:
            raise ValueError(f"stages.cold_start.module.grad_last_steps={grad_last_steps}; expected 1..num_steps={num_steps}")
        self.save_hyperparameters(ignore=["init_from"])

    def configure_trainable(self) -> None:
        self.train_decoder(self.hparams.decoder_lora, self.hparams.gradient_checkpointing)
        if self.hparams.encoder_lora:
            # On the conditioning path (gradients reach it through the decoder); merged by save_weights.
            from uae_lightning.models.lora import add_lora

            if self.encoder_lora is not None:
                raise ValueError("stages.cold_start.module.encoder_lora: the encoder already has a captioner adapter "
                                 "(from init_from); a second adapter on the conditioning path is not supported")

            add_lora(self.encoder.model, self.hparams.encoder_lora)
            self.adapters["encoder"] = dict(self.hparams.encoder_lora)

    def training_step(self, batch: dict, batch_idx: int):
        if not self.count_data(batch):
            return None
        h = self.hparams
        images = batch["images"]
        captions = list(batch["caption"])
        guided = h.guidance_scale != 1.0
        texts = captions + [h.negative_prompt] * len(captions) if guided else captions
        if h.encoder_lora:
            hidden, mask = self.encoder.condition(texts)
        else:
            with torch.no_grad(), self.encoder.adapter_disabled():  # the captioner adapter is not on the text path
                hidden, mask = self.encoder.condition(texts)
        cond, negative = self.connector(hidden), None
        if guided:  # one conditioning pass for both branches
            (cond, negative_cond), (mask, negative_mask) = cond.chunk(2), mask.chunk(2)
            negative = (negative_cond, negative_mask)
        noise = torch.randn(len(images), self.decoder.latent_channels, *([self.decoder.latent_size(self.resolution)] * 2),
                            device=self.device)
        z = self.decoder.sample(cond, mask, noise, h.num_steps, h.guidance_scale, negative,
                                grad_last_steps=h.grad_last_steps, checkpoint_steps=h.checkpoint_steps)
        similarity = self.reward.score(self.decoder.decode(z), images)
        loss = 1 - similarity.mean()
        if not self.finite_or_skip(loss, "loss", h.max_nonfinite_in_a_row):
            return None
        self.log("train/loss", loss, prog_bar=True)
        self.reward.log_stats(self, similarity, "train/similarity")
        return loss

    def preview(self, batch: dict) -> dict:
        texts = list(batch["caption"])
        noise = self.sample_noise(len(texts), self.hparams.eval_seed)
        return {"captions": texts, "reconstructions": self.redraw(texts, noise, self.hparams.eval_steps)}
