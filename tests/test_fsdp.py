"""FSDP2 (ModelParallelStrategy + fully_shard) on 2 CPU processes (gloo), against 1 process on the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "workers" / "stage_losses.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["data.train_size=64", "data.val_size=8", "stages.u4g.data.val_size=8", "data.eval_batch_size=8", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "bench.batch_size=8"]
FSDP2 = ["strategy=fsdp2", "strategy.process_group_backend=gloo", "trainer.devices=2"]


def worker(out: Path, *overrides: str) -> None:
    res = subprocess.run([sys.executable, str(WORKER), str(out), *overrides], capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_fsdp2_ranks_match_one_process_on_the_same_global_batch(tmp_path):
    """Stage 1, 4 steps, global batch 8: 2 ranks x 4 vs 1 x 8; the 2-rank run is stopped after step 2 and resumed
    from its sharded checkpoint. Each rank reports the same (all-reduced) loss; the losses, the consolidated weights
    and the held-out metrics match the 1-process run to float32 rounding: 1e-5 relative on the loss and the metrics,
    1e-5 absolute on any weight (observed: ~1e-7; a wrong split of data or noise moves the loss by ~1e-2, a resume
    that lost the optimizer state or the data position moves the weights by ~1e-3)."""
    import shutil

    base = ["+experiment=toy_pretrain", *TINY, "data.val_size=7", "trainer.log_every_n_steps=1",
            "trainer.checkpoint_every_n_steps=2"]
    worker(tmp_path / "first", *base, *FSDP2, "data.batch_size=4", "stages.pretrain.trainer.max_steps=2")
    shutil.copytree(tmp_path / "first" / "run", tmp_path / "two" / "run")
    stage = tmp_path / "two" / "run" / "pretrain"
    for name in ("done.json", "weights.safetensors"):  # as if killed after the step-2 checkpoint
        (stage / name).unlink()
    # The sharded checkpoint holds what trains (connector + DiT) and its optimizer state, no frozen encoder weight.
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(stage / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.decoder.") for k in saved)
    assert not any(k.startswith("state_dict.encoder.") for k in saved)
    worker(tmp_path / "two", *base, *FSDP2, "data.batch_size=4", "stages.pretrain.trainer.max_steps=4")
    worker(tmp_path / "one", *base, "trainer.devices=1", "data.batch_size=8", "stages.pretrain.trainer.max_steps=4")
    r0, r1 = (json.loads((tmp_path / "two" / f"pretrain_rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((tmp_path / "one" / "pretrain_rank0.json").read_text())
    first = json.loads((tmp_path / "first" / "pretrain_rank0.json").read_text())
    assert r0["world_size"] == 2 and one["world_size"] == 1
    assert len(r0["losses"]) == 2 and r0["losses"] == r1["losses"]  # steps 3 and 4, after the resume
    assert r0["probe"] == r1["probe"]  # stage 1: one random stream shared by the ranks
    assert first["losses"] + r0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # Sharded checkpoint (a distributed-checkpoint directory), consolidated weights.
    ckpt = stage / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    a = load_file(stage / "weights.safetensors")
    b = load_file(tmp_path / "one" / "run" / "pretrain" / "weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # The held-out test is split over the ranks (4 + 3 of the 7 images; rank 1's second slot is weight-0 padding)
    # and its metrics are the 1-process ones.
    assert (r0["tested"], r1["tested"], one["tested"]) == (4, 3, 7)
    metrics = [json.loads((tmp_path / d / "run" / "pretrain" / "done.json").read_text())["metrics"] for d in ("two", "one")]
    assert metrics[0].keys() == metrics[1].keys() and metrics[0]
    assert all(metrics[0][k] == pytest.approx(metrics[1][k], rel=1e-5) for k in metrics[0])
    # Unified-Bench is split over the ranks too and scores what one process scores (the weights above differ by
    # ~1e-7; 1e-4 relative on the overall score).
    ranks = [json.loads((tmp_path / "two" / f"bench_rank{r}.json").read_text()) for r in (0, 1)]
    counts = [r["images"] for r in ranks]
    # The finished run destroys its process group on each rank (left to the exit, gloo can abort the process).
    assert not any(r["group_left"] for r in ranks)
    assert counts == [4, 3] and json.loads((tmp_path / "one" / "bench_rank0.json").read_text())["images"] == 7
    bench = [json.loads((tmp_path / d / "run" / "pretrain" / "unified_bench" / "summary.json").read_text())
             for d in ("two", "one")]
    assert (bench[0]["processes"], bench[1]["processes"], bench[0]["images"]) == (2, 1, 7)
    assert bench[0]["overall"] == pytest.approx(bench[1]["overall"], rel=1e-4)
    assert not list((stage / "unified_bench").glob("results.jsonl.rank*"))


def test_every_stage_trains_under_fsdp2_in_the_paper_precision_and_exports(tmp_path):
    """The five toy stages, 2 steps each, on 2 ranks, with the paper presets' precision (bf16 frozen weights and
    compute, fp32 trainable weights): generation (G4U captions), SDE rollouts (U4G), LoRA on both models, manual
    optimisation and the per-stage consolidation + Unified-Bench all run sharded. Stage 1 shares one random stream
    over the ranks (global-batch equivalence); G4U and U4G draw different caption samples and SDE noise per rank."""
    from omegaconf import OmegaConf

    from conftest import compose_cfg

    precision = compose_cfg(["+experiment=u4g", "init_from=x", "data.manifest=y"]).trainer.precision
    steps = [f"stages.{s}.trainer.max_steps=2" for s in ("pretrain", "captioner", "cold_start", "g4u", "u4g")]
    overrides = [*TINY, *FSDP2, *steps, "run=[pretrain,captioner,cold_start,g4u,u4g]", "data.batch_size=4",
                 "stages.g4u.data.batch_size=2", "stages.u4g.data.batch_size=2", "stages.g4u.module.group_size=2",
                 "stages.u4g.module.group_size=2", "stages.u4g.module.num_steps=2", f"trainer.precision={precision}",
                 "stages.u4g.module.advantage_scale=batch",  # the paper preset's: the batch std gathered from both ranks
                 "stages.g4u.trainer.val_check_interval=1", "stages.u4g.trainer.val_check_interval=1",  # sharded in-fit evals
                 "model.encoder.dtype=bfloat16", "model.decoder.dtype=bfloat16"]
    worker(tmp_path, *overrides)
    probes = {s: [json.loads((tmp_path / f"{s}_rank{r}.json").read_text())["probe"] for r in (0, 1)]
              for s in ("pretrain", "g4u", "u4g")}
    assert probes["pretrain"][0] == probes["pretrain"][1]
    assert probes["g4u"][0] != probes["g4u"][1] and probes["u4g"][0] != probes["u4g"][1]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["unified_bench"]) == {"pretrain", "captioner", "cold_start", "g4u", "u4g"}
    assert all((run / s / "checkpoints" / "last.ckpt").is_dir() for s in summary["unified_bench"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage, batches in (("g4u", 1), ("u4g", 2)):  # G4U: 2 optimizer steps = 1 rollout batch x 2 inner updates
        ea = EventAccumulator(str(run / stage / "tensorboard"))
        ea.Reload()
        steps = [e.step for e in ea.Scalars("heldout/reward")]
        assert steps == [0, *range(batches), batches], (stage, steps)  # start, one evaluation per batch, final test
    from uae_lightning.pipeline import UAEPipeline

    from safetensors.torch import load_file

    weights = run / "u4g" / "weights.safetensors"
    adapter = load_file(weights)  # U4G's output: the DiT's adapter alone, trained (and so written) in float32
    assert adapter and all(k.startswith("merge.decoder.") and v.dtype == torch.float32 for k, v in adapter.items())
    # The consolidated weights load into plain models (captioner LoRA kept) and the export round-trips; compared in
    # fp32, where greedy captions are reproducible (in bf16 the export's from_pretrained path differs in the last
    # bits and a greedy caption can flip: issue 11's reload check).
    model = OmegaConf.to_container(compose_cfg([*overrides, "model.encoder.dtype=float32",
                                                "model.decoder.dtype=float32"]).model, resolve=True)
    pipe = UAEPipeline.from_weights(weights, model, 32)
    assert pipe.encoder_lora is not None
    export = pipe.save_pretrained(tmp_path / "export")
    images = torch.rand(1, 3, 32, 32)
    assert UAEPipeline.from_pretrained(export).caption(images) == pipe.caption(images)
