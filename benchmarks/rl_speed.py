"""G4U and U4G on the toy models: rollout throughput, reward time, update time, and the memory of a U4G update
as the number of denoising steps grows (backward per step keeps it flat).

    python benchmarks/rl_speed.py [--batch 8] [--group 8] [--repeats 3]

Prints markdown tables. On CPU, "update activations" is the peak of autograd-saved tensor bytes between two
backward calls (what a graph over all steps would multiply); on a GPU the table adds torch.cuda peak memory.
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from common import SameBatch, default_config
from uae_lightning.data.datamodule import ToyShapes, collate
from uae_lightning.rewards.callback import RewardCallback
from uae_lightning.stages.g4u import G4U
from uae_lightning.stages.u4g import U4G


def fit(stage: L.LightningModule, batch: dict, reward: dict, device: str, rollouts: int) -> dict:
    """Run `rollouts` training steps of a stage on one fixed batch; returns per-phase timings (best of the runs
    after the first, which warms up)."""
    times = {"rollout": [], "step": []}
    rollout = stage.rollout

    def timed_rollout(b):
        t0 = time.perf_counter()
        out = rollout(b)
        times["rollout"].append(time.perf_counter() - t0)
        return out

    stage.rollout = timed_rollout

    class StepTimer(L.Callback):
        def on_train_batch_start(self, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            times["step"].append(time.perf_counter() - self.t0)

    trainer = L.Trainer(accelerator=device, devices=1, max_steps=rollouts, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[RewardCallback(reward), StepTimer()])
    trainer.fit(stage, train_dataloaders=DataLoader(SameBatch(batch, rollouts), batch_size=None))
    return {k: min(v[1:] or v) for k, v in times.items()}


@contextmanager
def saved_activation_peak(stage):
    """Track the largest total of autograd-saved tensor bytes alive between two backward calls."""
    state = {"live": 0, "peak": 0}

    def pack(t):
        state["live"] += t.numel() * t.element_size()
        state["peak"] = max(state["peak"], state["live"])
        return t

    original = stage.manual_backward

    def backward(loss, *a, **k):
        original(loss, *a, **k)
        state["live"] = 0

    stage.manual_backward = backward
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield state
    stage.manual_backward = original


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = default_config()
    model = OmegaConf.to_container(cfg.model, resolve=True)
    reward = dict(cfg.reward.backbones)
    ds = ToyShapes(args.batch, 0, 32, 3, {"short": 1.0})
    batch = collate([ds[i] for i in range(args.batch)])
    batch.pop("skipped")
    batch["images"] = batch["images"].to(device)
    torch.manual_seed(0)

    n = args.batch * args.group
    kw = {k: v for k, v in OmegaConf.to_container(cfg.stages.g4u.module).items() if k != "_target_"}
    kw.update(group_size=args.group, num_iterations=1)
    g4u = G4U(model=model, resolution=32, **kw)
    g4u.configure_model()
    g4u.to(device)
    images = batch["images"].repeat_interleave(args.group, 0)
    t_cap, caps = timed(lambda: g4u.encoder.caption(images, temperature=0.7, max_new_tokens=kw["max_new_tokens"]), args.repeats)
    tokens = int(caps.completion_mask.sum())
    noise = torch.randn(n, 3, 32, 32, device=device)
    t_dec, recon = timed(lambda: g4u.redraw(caps.texts, noise, kw["decode_steps"]), args.repeats)
    scorer = RewardCallback(reward).similarity.to(device)
    t_rew, _ = timed(lambda: scorer(recon, images), args.repeats)
    g = fit(g4u, batch, reward, device, args.repeats + 1)
    print(f"\nG4U, toy models, {args.batch} images x group {args.group} = {n} captions, {device}\n")
    print("| phase | seconds | throughput |\n| --- | ---: | ---: |")
    print(f"| caption rollout (KV cache) | {t_cap:.3f} | {n / t_cap:.0f} captions/s, {tokens / t_cap:.0f} tokens/s |")
    print(f"| redraw ({kw['decode_steps']} ODE steps) | {t_dec:.3f} | {n / t_dec:.0f} images/s |")
    print(f"| reward | {t_rew:.4f} | {n / t_rew:.0f} images/s |")
    print(f"| rollout (captions + redraw + reward + old log-probs) | {g['rollout']:.3f} | {n / g['rollout']:.0f} captions/s |")
    print(f"| update (1 iteration) | {g['step'] - g['rollout']:.3f} | |")

    print(f"\nU4G, toy models, {args.batch} captions x group {args.group} trajectories, {device}\n")
    print("| T | rollout s | rollout images/s | update s | update activations (MiB) | device peak (MiB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for steps in (4, 8, 16):
        kw = {k: v for k, v in OmegaConf.to_container(cfg.stages.u4g.module).items() if k != "_target_"}
        kw.update(group_size=args.group, num_steps=steps, micro_batch_size=n, train_window=None)  # all but the last step
        u4g = U4G(model=model, resolution=32, **kw)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with saved_activation_peak(u4g) as mem:
            u = fit(u4g, batch, reward, device, args.repeats + 1)
        dev_peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device == "cuda" else "n/a (CPU)"
        print(f"| {steps} | {u['rollout']:.3f} | {n / u['rollout']:.0f} | {u['step'] - u['rollout']:.3f} | "
              f"{mem['peak'] / 2**20:.1f} | {dev_peak} |")


if __name__ == "__main__":
    main()
