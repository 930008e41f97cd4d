"""Stage 1 end to end on the toy world: it learns to use captions, resumes, and leaves what a researcher needs."""
import json

import torch

from conftest import FAST, compose_cfg
from uae_lightning.cli import run_pipeline


def test_short_run_writes_summary_weights_events_and_checkpoint(tmp_path):
    cfg = compose_cfg(["+experiment=toy_pretrain", *FAST, "stages.pretrain.trainer.max_steps=4",
                       "trainer.checkpoint_every_n_steps=2"])
    summary = run_pipeline(cfg, tmp_path)
    stage_dir = tmp_path / "pretrain"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert set(summary["stages"]["pretrain"]) == {"similarity_complete_caption", "similarity_empty_caption"}
    assert (stage_dir / "weights.safetensors").is_file()
    assert (stage_dir / "checkpoints" / "last.ckpt").is_file()
    events = list((stage_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(stage_dir / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()
    assert {"train/loss", "throughput/images_per_s", "lr-AdamW"} <= set(tags["scalars"])
    assert "preview/original|reconstructions" in tags["images"]
    assert ea.Scalars("train/loss")[0].step == 0 and len(ea.Scalars("train/loss")) == 4


def test_interrupted_stage_resumes_from_last_checkpoint_and_finished_stage_is_reused(tmp_path):
    base = ["+experiment=toy_pretrain", *FAST, "trainer.checkpoint_every_n_steps=3"]
    run_pipeline(compose_cfg([*base, "stages.pretrain.trainer.max_steps=3"]), tmp_path)
    stage_dir = tmp_path / "pretrain"
    # Simulate a job killed after its step-3 checkpoint: the stage never finished.
    (stage_dir / "done.json").unlink()
    (stage_dir / "weights.safetensors").unlink()
    summary = run_pipeline(compose_cfg([*base, "stages.pretrain.trainer.max_steps=6"]), tmp_path)
    ckpt = torch.load(stage_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(stage_dir / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(6))  # steps 3..5 continued, none repeated
    # A finished stage is not trained again: same numbers, weights untouched.
    mtime = (stage_dir / "weights.safetensors").stat().st_mtime_ns
    again = run_pipeline(compose_cfg([*base, "stages.pretrain.trainer.max_steps=6"]), tmp_path)
    assert again == summary and (stage_dir / "weights.safetensors").stat().st_mtime_ns == mtime
    # The resumed run (mid-epoch: 8 batches per epoch) is the uninterrupted run: same data, noise and weights.
    straight = run_pipeline(compose_cfg([*base, "stages.pretrain.trainer.max_steps=6"]), tmp_path / "straight")
    assert straight == summary
    from safetensors.torch import load_file

    a, b = load_file(stage_dir / "weights.safetensors"), load_file(tmp_path / "straight" / "pretrain" / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
