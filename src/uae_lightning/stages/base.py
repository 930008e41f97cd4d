"""What every stage shares: building encoder/connector/decoder in `configure_model` (so FSDP can shard them),
loading the previous stage's weights, data-quality counters, throughput, and saving the stage's final weights.

Each stage file (pretrain.py, ...) holds its own algorithm top to bottom; this file holds no algorithm.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from uae_lightning.models.build import build_connector, build_decoder, build_encoder, lora_config, plain_state_dict
from uae_lightning.rewards.callback import RewardCallback


class UAEStage(L.LightningModule):
    def __init__(self, model: dict, resolution: int, init_from: str | None = None):
        super().__init__()
        self.model_cfg = model
        self.resolution = resolution
        self.init_from = init_from
        self.encoder = self.connector = self.decoder = None
        self.data_counts: Counter = Counter()
        self._t0: float | None = None

    # ---- models --------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.encoder is not None:
            return
        cfg = self.model_cfg
        padding = cfg["condition_padding"]
        with torch.random.fork_rng(devices=[]):  # random init independent of everything seeded before it
            torch.manual_seed(cfg["seed"])
            self.encoder = build_encoder(cfg["encoder"], self.resolution, padding)
            self.decoder = build_decoder(cfg["decoder"], self.resolution, padding)
            self.connector = build_connector(cfg["connector"], self.encoder, self.decoder)
        if self.init_from:
            self.load_weights(self.init_from)
        self.encoder.requires_grad_(False)
        self.connector.requires_grad_(False)
        self.decoder.requires_grad_(False)
        self.configure_trainable()

    def configure_trainable(self) -> None:
        """Unfreeze what this stage trains (everything starts frozen)."""
        raise NotImplementedError

    def train_decoder(self, lora: dict | None, gradient_checkpointing: bool) -> None:
        """Connector + DiT train: the whole DiT, or LoRA adapters on it when `lora` is set."""
        self.connector.requires_grad_(True)
        transformer = self.decoder.transformer
        if lora:
            transformer.add_adapter(lora_config(lora))  # only the adapter weights require grad
        else:
            transformer.requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

    def save_weights(self, path: str | Path) -> None:
        """The stage's result with adapters merged: what the next stage (or an export) starts from."""
        sd = {}
        for name in ("encoder", "connector", "decoder"):
            for k, v in plain_state_dict(getattr(self, name)).items():
                sd[f"{name}.{k}"] = v.contiguous()
        tmp = Path(str(path) + ".tmp")
        save_file(sd, str(tmp))
        tmp.replace(path)  # atomic: a preempted job never leaves half a file behind

    def load_weights(self, path: str | Path) -> None:
        sd = load_file(str(path))
        for name in ("encoder", "connector", "decoder"):
            part = {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
            missing, unexpected = getattr(self, name).load_state_dict(part, strict=False)
            missing = [k for k in missing if "lora_" not in k]
            if missing or unexpected:
                raise RuntimeError(f"init_from={path}: {name} does not match (missing {missing[:5]}, unexpected {unexpected[:5]})")

    def configure_optimizers(self):
        """AdamW on whatever `configure_trainable` unfroze, linear warm-up then constant (hparams lr, weight_decay,
        warmup_steps of the stage)."""
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- shared bookkeeping ------------------------------------------------------------------------------------
    @property
    def reward(self) -> RewardCallback:
        for cb in self.trainer.callbacks:
            if isinstance(cb, RewardCallback):
                return cb
        raise RuntimeError("this stage needs a RewardCallback in `callbacks` (config group callbacks/)")

    def count_data(self, batch: dict) -> bool:
        """Accumulate the batch's skip/conversion counters and log them; False if nothing in it is usable."""
        self.data_counts.update(batch.get("skipped", {}))
        for k, v in self.data_counts.items():
            self.log(f"data/{k}", float(v))
        return "images" in batch

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._t0 is not None and "images" in batch:
            dt = time.perf_counter() - self._t0
            self.log("throughput/images_per_s", len(batch["images"]) / dt)

    def sample_noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        size = self.decoder.latent_size(self.resolution)
        return torch.randn(n, self.decoder.latent_channels, size, size, generator=g).to(self.device)

    @torch.no_grad()
    def reconstruct_from_text(self, texts: list[str], noise_seed: int, num_steps: int, guidance_scale: float = 1.0,
                              negative_prompt: str = "") -> torch.Tensor:
        """Text -> image through the text bottleneck (encoder "generate" message -> connector -> decoder)."""
        hidden, mask = self.encoder.condition(texts)
        cond = self.connector(hidden)
        negative = None
        if guidance_scale != 1.0:
            nh, nm = self.encoder.condition([negative_prompt] * len(texts))
            negative = (self.connector(nh), nm)
        z = self.decoder.sample(cond, mask, self.sample_noise(len(texts), noise_seed), num_steps, guidance_scale, negative)
        return self.decoder.decode(z)
