"""Stage step time on the toy models: each Lightning stage next to a hand-written PyTorch loop doing the same work
on the same batch, so Lightning's overhead is measured, not guessed.

    python benchmarks/stage_speed.py [--steps 60] [--warmup 10] [--batch-size 32]

Prints a markdown table. CPU numbers depend on the machine; compare the ratio column.
"""
from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from common import SameBatch, default_config
from uae_lightning.data.datamodule import ToyShapes, collate
from uae_lightning.models.flow import flow_matching_loss, noisy_latents, sample_t
from uae_lightning.stages.pretrain import DecoderPretraining


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.t1 = time.perf_counter()


def model_cfg() -> tuple[dict, dict]:
    cfg = default_config()
    return OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.stages.pretrain.module, resolve=True)


def make_stage(model: dict, hp: dict) -> DecoderPretraining:
    hp = {k: v for k, v in hp.items() if k != "_target_"}
    hp["caption_dropout"] = 0.0  # identical work in both loops
    stage = DecoderPretraining(model=model, resolution=32, **hp)
    stage.configure_model()
    return stage


def lightning_step_time(model, hp, batch, steps, warmup) -> float:
    stage = make_stage(model, hp)
    timer = StepTimer(warmup)
    trainer = L.Trainer(max_steps=steps + warmup, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    loader = DataLoader(SameBatch(batch, steps + warmup), batch_size=None)
    trainer.fit(stage, train_dataloaders=loader)
    return (timer.t1 - timer.t0) / steps


def plain_step_time(model, hp, batch, steps, warmup) -> float:
    stage = make_stage(model, hp)
    enc, conn, dec = stage.encoder, stage.connector, stage.decoder
    params = [p for p in stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"])
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.no_grad():
            hidden, mask = enc.condition(batch["caption"])
            z0 = dec.encode(batch["images"])
        cond = conn(hidden)
        noise = torch.randn_like(z0)
        t = sample_t(len(z0), hp["weighting_scheme"], hp["logit_mean"], hp["logit_std"], hp["mode_scale"], z0.device)
        loss = flow_matching_loss(dec.velocity(noisy_latents(z0, noise, t), t, cond, mask), z0, noise, t, hp["weighting_scheme"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, hp = model_cfg()
    ds = ToyShapes(args.batch_size, 0, 32, 3, {"short": 1.0})
    batch = collate([ds[i] for i in range(args.batch_size)])
    batch.pop("skipped")
    # Alternate the two loops twice so drift in machine load hits both.
    plain, light = [], []
    for _ in range(2):
        plain.append(plain_step_time(model, hp, batch, args.steps, args.warmup))
        light.append(lightning_step_time(model, hp, batch, args.steps, args.warmup))
    p, l = min(plain), min(light)
    print(f"\nstage 1 (decoder pre-training), toy models, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps (best of 2)\n")
    print("| loop | ms/step | images/s | vs plain |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| plain PyTorch | {p * 1e3:.1f} | {args.batch_size / p:.0f} | 1.000 |")
    print(f"| Lightning stage | {l * 1e3:.1f} | {args.batch_size / l:.0f} | {l / p:.3f} |")


if __name__ == "__main__":
    main()
