"""GPU check: paper-size, random-initialised models (Qwen2.5-VL-3B encoder, SD3.5-large DiT + VAE) through G4U and U4G
training steps under FSDP2 (ModelParallelStrategy, one process) in bf16, timed phase by phase, next to the plain-
library anchors of ../shared/reference/gpu-anchors.md. Nothing is downloaded: weights are random and the reward is
a weight-free backbone (the reward's cost is negligible next to the models).

    python benchmarks/gpu_check.py                 # one GPU, about 5 minutes
    python benchmarks/gpu_check.py --toy           # the same code path on CPU with the toy models (a dry run)

Prints one markdown table; every number is the best of the timed steps after a warm-up step.
"""
from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from common import SameBatch, default_config
from uae_lightning.models.encoder import Encoder
from uae_lightning.rewards.callback import RewardCallback
from uae_lightning.stages.g4u import G4U
from uae_lightning.stages.u4g import U4G

# ../shared/reference/gpu-anchors.md (one H200, plain libraries, bf16)
ANCHORS = {
    "caption": "850 tokens/s (generate, batch 32, 256 new tokens)",
    "redraw": "4.38 img/s (10 steps, 512², batch 16)",
    "dit_train": "12.1 img/s fwd+bwd (512², batch 4)",
    "memory": "fits one 80 GB GPU with LoRA",
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PhaseTimer:
    """Wraps a stage's methods to time them (synchronised), keeping every call's duration."""

    def __init__(self, device: str):
        self.device, self.times = device, {}

    def wrap(self, obj, name: str, label: str, on_result=None):
        """Time `obj.name` (an instance, or a class: then every instance); returns a function that undoes it."""
        fn = getattr(obj, name)

        def timed(*a, **k):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync(self.device)
            self.times.setdefault(label, []).append(time.perf_counter() - t0)
            if on_result is not None:
                on_result(out)
            return out

        setattr(obj, name, timed)
        return lambda: setattr(obj, name, fn)

    def best(self, label: str) -> float:
        v = self.times[label]
        return min(v[1:] or v)


def run(stage: L.LightningModule, images: torch.Tensor, steps: int, device: str, precision: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1,
                                     process_group_backend="nccl" if device == "cuda" else "gloo")
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, strategy=strategy,
                        precision=precision, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[RewardCallback({"toy_pixels": 1.0})])
    batch = {"images": images, "scene": [""] * len(images), "skipped": {}}  # what a manifest batch holds
    trainer.fit(stage, train_dataloaders=DataLoader(SameBatch(batch, steps), batch_size=None))


def build(cls, name: str, overrides: list[str], toy: bool, resolution: int, group: int, max_new_tokens: int, device: str):
    """A stage with the paper experiment's hyper-parameters (the toy ones with --toy), its rollout and training
    step timed."""
    paper = [f"+experiment={name}", "init_from=null", "data.manifest=unused"]
    cfg = default_config([*overrides, *([] if toy else paper)])
    kw = {k: v for k, v in OmegaConf.to_container(cfg.stages[name].module, resolve=True).items() if k != "_target_"}
    kw.update(group_size=group, max_new_tokens=max_new_tokens, num_iterations=1)
    stage = cls(model=OmegaConf.to_container(cfg.model, resolve=True), resolution=resolution, **kw)
    timer = PhaseTimer(device)
    timer.wrap(stage, "rollout", "rollout")
    timer.wrap(stage, "training_step", "step")
    return stage, kw, timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="toy models on CPU (checks the script, not the GPU)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per stage (the first warms up)")
    ap.add_argument("--g4u-images", type=int, default=4)
    ap.add_argument("--g4u-group", type=int, default=8)
    ap.add_argument("--u4g-images", type=int, default=1)
    ap.add_argument("--u4g-group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    device = "cpu" if args.toy else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --toy for a CPU dry run")
    if args.toy:
        overrides, resolution, precision = [], 32, "32-true"
    else:
        overrides = ["model=paper", "model.encoder.pretrained=null", "model.decoder.pretrained=null",
                     "model.decoder.pooled=zeros"]
        resolution, precision = 512, "bf16-true"
    torch.manual_seed(0)
    rows = []

    # ---- G4U: the captioner is the policy ------------------------------------------------------------------------
    stage, kw, timer = build(G4U, "g4u", overrides, args.toy, resolution, args.g4u_group, args.max_new_tokens, device)
    images = torch.rand(args.g4u_images, 3, resolution, resolution)
    tokens: list[int] = []  # the encoder is built inside the trainer, so its class method is timed
    undo = timer.wrap(Encoder, "caption", "caption", on_result=lambda out: tokens.append(int(out.completion_mask.sum())))
    timer.wrap(stage, "redraw", "redraw")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        run(stage, images, args.steps, device, precision)
    finally:
        undo()
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "n/a (CPU)"
    n = args.g4u_images * args.g4u_group
    t_cap = timer.best("caption")
    tokens = tokens[-1]
    rows += [
        ("G4U caption rollout", f"{n} captions", f"{t_cap:.2f} s", f"{tokens / t_cap:.0f} tokens/s, {n / t_cap:.1f} captions/s", ANCHORS["caption"]),
        ("G4U redraw", f"{n} images, {kw['decode_steps']} steps", f"{timer.best('redraw'):.2f} s", f"{n / timer.best('redraw'):.2f} img/s", ANCHORS["redraw"]),
        ("G4U update", f"{n} captions", f"{timer.best('step') - timer.best('rollout'):.2f} s", "", ""),
        ("G4U peak memory", "", "", peak, ANCHORS["memory"]),
    ]
    del stage
    if device == "cuda":
        torch.cuda.empty_cache()

    # ---- U4G: the DiT is the policy ----------------------------------------------------------------------------
    stage, kw, timer = build(U4G, "u4g", overrides, args.toy, resolution, args.u4g_group, args.max_new_tokens, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(stage, torch.rand(args.u4g_images, 3, resolution, resolution), args.steps, device, precision)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "n/a (CPU)"
    n = args.u4g_images * args.u4g_group
    trained = len(stage.trained_steps())
    update = timer.best("step") - timer.best("rollout")
    rows += [
        ("U4G rollout (caption + SDE)", f"{n} images, {kw['num_steps']} steps", f"{timer.best('rollout'):.2f} s", f"{n / timer.best('rollout'):.2f} img/s", ANCHORS["redraw"]),
        ("U4G update", f"{n} images x {trained} trained steps", f"{update:.2f} s", f"{n * trained / update:.1f} img-steps/s fwd+bwd", ANCHORS["dit_train"]),
        ("U4G peak memory", "", "", peak, ANCHORS["memory"]),
    ]

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (toy models)"
    print(f"\nGPU check: {name}, FSDP2 (1 process), {precision}, {resolution}², random weights, torch {torch.__version__}\n")
    print("| phase | work | time | throughput / memory | plain-library anchor (H200) |")
    print("| --- | --- | ---: | ---: | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
