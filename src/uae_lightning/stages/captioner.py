"""Toy captioner initialisation: supervised captioning on *short* captions (DESIGN.md "The toy world").

At paper scale Qwen2.5-VL already captions, so this stage exists for the toy world only: a random encoder must
first learn to see and to write something. Trained on mostly-short captions, it leaves G4U room to discover that
longer, more complete captions redraw better. Loss: next-token cross-entropy on the caption tokens only.
The vision tower and the output head train fully (neither is on the text path that conditions the decoder); the
language model through the captioner's LoRA adapter, which stays apart from the base weights: later stages caption with it and condition
the decoder without it, so the decoder keeps the input distribution stage 1 trained it on.
"""
from __future__ import annotations

import torch

from uae_lightning.stages.base import UAEStage


class CaptionerFinetuning(UAEStage):
    def __init__(
        self,
        model: dict,
        resolution: int,
        init_from: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        lr_schedule: str = "constant",
        lora: dict | None = None,
        full_modules: tuple[str, ...] = ("model.visual", "lm_head"),
        max_nonfinite_in_a_row: int = 5,
        eval_steps: int = 10,
        eval_guidance_scale: float = 1.0,
        negative_prompt: str = "",
        eval_seed: int = 1234,
        max_new_tokens: int = 48,
    ):
        super().__init__(model, resolution, init_from)
        self.save_hyperparameters(ignore=["init_from"])

    def configure_trainable(self) -> None:
        self.add_encoder_lora(self.hparams.lora)
        for name in self.hparams.full_modules:
            self.encoder.model.get_submodule(name).requires_grad_(True)

    def training_step(self, batch: dict, batch_idx: int):
        if not self.count_data(batch):
            return None
        enc = self.encoder
        inputs = enc.caption_inputs(batch["images"])
        tok = enc.tokenizer
        target = tok([t + tok.eos_token for t in batch["short_caption"]], return_tensors="pt", padding="longest",
                     padding_side="right").to(self.device)
        ids = torch.cat([inputs.pop("input_ids"), target.input_ids], 1)
        attention = torch.cat([inputs.pop("attention_mask"), target.attention_mask], 1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(target.input_ids)], 1)
        labels = ids.clone()
        labels[:, : ids.shape[1] - target.input_ids.shape[1]] = -100  # no loss on the prompt
        labels[attention == 0] = -100
        loss = enc.model(input_ids=ids, attention_mask=attention, labels=labels, **inputs).loss
        if not self.finite_or_skip(loss.detach(), "loss", self.hparams.max_nonfinite_in_a_row):
            return None
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def preview(self, batch: dict) -> dict:
        caps = self.encoder.caption(batch["images"], do_sample=False, max_new_tokens=self.hparams.max_new_tokens)
        noise = self.sample_noise(len(caps.texts), self.hparams.eval_seed)
        return {"captions": caps.texts, "reconstructions": self.redraw(caps.texts, noise, self.hparams.eval_steps)}
