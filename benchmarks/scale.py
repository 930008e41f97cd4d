"""What a stage costs besides its training steps, on the toy models through the real command-line code path:
checkpoint and stage-output size against the whole model, peak memory per rank while loading, and held-out
evaluation time, with 1 and 2 FSDP2 ranks (CPU, gloo, one thread per rank); and the disk the paper presets' stage
outputs take at paper scale (counted on the paper-size models built on the meta device, no weights).

    python benchmarks/scale.py [--val-size 32] [--width 256]
    python benchmarks/scale.py --paper-only

Prints markdown tables. `--width` sets the toy models' hidden sizes (larger models make the memory columns dominated
by weights rather than by the Python runtime).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))


def _worker(out: Path, overrides: list[str]) -> None:
    """One run of the CLI code path; each rank writes its peak RSS after loading and its held-out test time."""
    import lightning as L
    import torch

    from common import default_config
    import uae_lightning.runner as runner

    torch.set_num_threads(1)
    record = {}

    class Measure(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # the models are built, loaded and sharded
            record["load_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            record["world_size"] = trainer.world_size

        def on_test_start(self, trainer, pl_module):
            record["t_test"] = time.perf_counter()

        def on_test_end(self, trainer, pl_module):
            record["test_s"] = time.perf_counter() - record.pop("t_test")
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    build = runner.build_trainer

    def with_measure(cfg, name, stage_dir):
        trainer = build(cfg, name, stage_dir)
        trainer.callbacks.append(Measure())
        return trainer

    runner.build_trainer = with_measure
    runner.run_pipeline(default_config(overrides), out / "run")


def run(out: Path, overrides: list[str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(HERE), "--worker", str(out), *overrides], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-4000:])
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def complete_bytes(weights: Path, overrides: list[str]) -> int:
    """Size of the complete weights file (every weight, adapters merged) of the auto-encoder a stage output holds."""
    from omegaconf import OmegaConf

    from common import default_config
    from uae_lightning.models.weights import save_weights
    from uae_lightning.pipeline import UAEPipeline

    cfg = default_config(overrides)
    pipe = UAEPipeline.from_weights(weights, OmegaConf.to_container(cfg.model, resolve=True), cfg.data.resolution)
    out = weights.with_name("complete.safetensors")
    save_weights(out, {"encoder": pipe.encoder.state_dict(), "connector": pipe.connector.state_dict(),
                       "decoder": pipe.decoder.state_dict()}, {}, pipe.encoder_lora)
    return out.stat().st_size


def paper_stage_outputs() -> list[str]:
    """Bytes each paper preset's stage writes (its trained parameters, float32 as trained) against a complete file
    of the auto-encoder after it (frozen weights in the presets' bfloat16, trained ones in float32), counted on the
    paper-size models built on the meta device with the presets' LoRA settings."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from omegaconf import OmegaConf
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from common import default_config
    from uae_lightning.models.build import QWEN25_VL_3B, SD35_LARGE_TRANSFORMER, SD35_VAE
    from uae_lightning.models.connector import Connector
    from uae_lightning.models.lora import add_lora

    def count(module, lora: bool = False) -> int:  # named_parameters counts a tied parameter once, as the file does
        return sum(p.numel() for name, p in module.named_parameters() if ("lora_" in name) == lora)

    def adapter(model_fn, cfg) -> int:
        with torch.device("meta"):
            m = model_fn()
        add_lora(m, OmegaConf.to_container(cfg, resolve=True))
        return count(m, lora=True)

    def qwen():
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_3B))

    def dit():
        return SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER)

    with torch.device("meta"):
        enc, transformer, vae = qwen(), dit(), AutoencoderKL(**SD35_VAE)
        conn = Connector(enc.config.text_config.hidden_size, transformer.config.joint_attention_dim)
    presets = {s: default_config([f"+experiment={s}", "init_from=x", "data.manifest=y"]).stages[s].module
               for s in ("pretrain", "cold_start", "g4u", "u4g")}
    assert presets["pretrain"].lora is None and presets["cold_start"].encoder_lora is None
    n_enc, n_dit, n_vae, n_conn = count(enc), count(transformer), count(vae), count(conn)
    captioner = 4 * adapter(qwen, presets["g4u"].lora)
    written = {"pretrain": 4 * (n_dit + n_conn),
               "cold_start": 4 * (adapter(dit, presets["cold_start"].decoder_lora) + n_conn),
               "g4u": captioner, "u4g": 4 * adapter(dit, presets["u4g"].lora)}
    after_pretrain = 2 * (n_enc + n_vae) + 4 * (n_dit + n_conn)
    merged_dit = 2 * (n_enc + n_vae + n_dit) + 4 * n_conn  # adapters merged into the bfloat16 DiT
    complete = {"pretrain": after_pretrain, "cold_start": merged_dit, "g4u": merged_dit + captioner,
                "u4g": merged_dit + captioner}
    gb = 1e9
    rows = [f"| {s} | {written[s] / gb:.2f} GB | {complete[s] / gb:.2f} GB | {written[s] / complete[s]:.1%} |"
            for s in written]
    chain, whole = sum(written.values()), sum(complete.values())
    rows.append(f"| the four stages | {chain / gb:.1f} GB | {whole / gb:.1f} GB | {chain / whole:.1%} |")
    for s in ("g4u", "u4g"):
        rows.append(f"| a 10-run {s} sweep | {10 * written[s] / gb:.1f} GB | {10 * complete[s] / gb:.0f} GB | "
                    f"{written[s] / complete[s]:.1%} |")
    return rows


def print_paper_table() -> None:
    print("\nPaper scale (Qwen2.5-VL-3B + SD3.5-large, the paper presets): what each stage writes\n")
    print("| stage | weights.safetensors (stage output) | complete weights (merged_weights=true) | share |")
    print("|---|---:|---:|---:|")
    print("\n".join(paper_stage_outputs()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--val-size", type=int, default=32)
    p.add_argument("--width", type=int, default=256, help="toy encoder hidden size and DiT width")
    p.add_argument("--out", default="/tmp/uae-scale-bench")
    p.add_argument("--paper-only", action="store_true", help="only the paper-scale disk table (seconds, no runs)")
    args = p.parse_args()
    if args.paper_only:
        print_paper_table()
        return
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    w = args.width
    size = [f"model.encoder.tiny.hidden_size={w}", f"model.encoder.tiny.vision_hidden_size={w // 2}",
            f"model.decoder.tiny.head_dim={w // 4}", "model.decoder.tiny.num_heads=4",
            f"model.decoder.tiny.joint_attention_dim={w}"]
    base = [*size, f"data.val_size={args.val_size}", "data.train_size=64", "data.eval_batch_size=8",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "bench.batch_size=8",
            "callbacks.preview.every_n_steps=1000", "trainer.checkpoint_every_n_steps=2"]
    stages = {
        "pretrain (full DiT + connector)": ["run=[pretrain]", "stages.pretrain.trainer.max_steps=2", "data.batch_size=4"],
        "u4g (LoRA on the DiT)": ["run=[u4g]", "stages.u4g.trainer.max_steps=2", "stages.u4g.data.batch_size=2",
                                   "stages.u4g.module.group_size=2", "stages.u4g.module.num_steps=4",
                                   "stages.u4g.module.train_window=[0,2]"],
    }
    fsdp2 = ["strategy=fsdp2", "strategy.process_group_backend=gloo", "trainer.devices=2"]
    rows_ckpt, rows_run = [], []
    for label, stage in stages.items():
        name = stage[0][5:-1]
        results = {}
        for ranks, extra in ((1, ["trainer.devices=1"]), (2, fsdp2)):
            out = Path(args.out) / f"{name}-{ranks}"
            results[ranks] = run(out, [*base, *stage, *extra])
            stage_dir = out / "run" / name
            results[ranks].append({"ckpt": tree_bytes(stage_dir / "checkpoints" / "last.ckpt"),
                                   "output": tree_bytes(stage_dir / "weights.safetensors"),
                                   "model": complete_bytes(stage_dir / "weights.safetensors", [*base, *stage])})
        sizes = results[1][-1]
        import torch

        ckpt = torch.load(Path(args.out) / f"{name}-1" / "run" / name / "checkpoints" / "last.ckpt",
                          map_location="cpu", weights_only=False)
        trainable = sum(v.numel() for v in ckpt["state_dict"].values())
        rows_ckpt.append(f"| {label} | {trainable / 1e6:.2f} M | {sizes['model'] / 2**20:.1f} | "
                         f"{sizes['output'] / 2**20:.2f} | {sizes['output'] / sizes['model']:.1%} | "
                         f"{results[2][-1]['output'] / 2**20:.2f} | {sizes['ckpt'] / 2**20:.1f} | "
                         f"{sizes['ckpt'] / sizes['model']:.2f} | {results[2][-1]['ckpt'] / 2**20:.1f} |")
        one, two = results[1][0], results[2][:2]
        per_rank = " / ".join(f"{r['load_peak_rss_mb']:.0f}" for r in two)
        slowest = max(r["test_s"] for r in two)
        rows_run.append(f"| {label} | {one['load_peak_rss_mb']:.0f} | {per_rank} | {one['test_s']:.1f} | "
                        f"{slowest:.1f} | {one['test_s'] / slowest:.2f}x |")
    print(f"\nWhat a stage writes vs the whole auto-encoder (toy models, width {w}, float32)\n")
    print("| stage | trained parameters | complete weights (MiB) | weights.safetensors, 1 process (MiB) | "
          "output / complete | weights.safetensors, 2 FSDP2 ranks (MiB) | last.ckpt, 1 process (MiB) | "
          "ckpt / complete | last.ckpt, 2 FSDP2 ranks (MiB, all shards) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows_ckpt))
    print(f"\nLoading and held-out evaluation ({args.val_size} images), 1 process vs 2 FSDP2 ranks, one thread each\n")
    print("| stage | peak RSS at load, 1 process (MiB) | per rank, 2 ranks (MiB) | test, 1 process (s) | "
          "test, 2 ranks (s) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows_run))
    print_paper_table()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()
