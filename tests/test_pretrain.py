"""Stage 1 end to end on the toy world: it learns to use captions, resumes, and leaves what a researcher needs."""
import json

import pytest
import torch

from conftest import FAST, compose_cfg
from uae_lightning.runner import run_pipeline


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


def test_a_diverging_stage_stops_with_a_checkpoint_and_is_not_marked_done(tmp_path):
    """lr 1e12: the weights turn non-finite, the stage stops (NonFiniteError, a non-zero exit from the CLI) after
    saving checkpoints/nonfinite.ckpt, and writes neither weights nor done.json, so a re-run does not reuse it."""
    import pytest

    from uae_lightning.stages.base import NonFiniteError

    cfg = compose_cfg(["+experiment=toy_pretrain", *FAST, "stages.pretrain.module.lr=1e12",
                       "stages.pretrain.module.warmup_steps=0", "stages.pretrain.trainer.max_steps=20"])
    with pytest.raises(NonFiniteError, match="non-finite"):
        run_pipeline(cfg, tmp_path)
    stage_dir = tmp_path / "pretrain"
    assert (stage_dir / "checkpoints" / "nonfinite.ckpt").is_file()
    assert not (stage_dir / "done.json").exists() and not (stage_dir / "weights.safetensors").exists()
    assert not (tmp_path / "summary.json").exists()


def test_held_out_batches_without_a_usable_image_are_counted_not_fatal(tmp_path):
    """Every held-out file is unreadable: the stage trains, its held-out test logs only the skip counters, and a
    re-run reuses the finished stage."""
    from PIL import Image

    from uae_lightning.runner import run_stage

    rows = []
    for i in range(16):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (32, 32), (16 * i, 0, 255 - 16 * i)).save(path)
        rows.append({"path": str(path), "caption": "a large red circle at the top-left"})
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = [{"path": str(tmp_path / "broken.png"), "caption": "x"}, {"path": str(tmp_path / "missing.png"), "caption": "y"}]
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in bad))
    cfg = compose_cfg(["+experiment=toy_pretrain", "data=manifest", f"data.manifest={tmp_path / 'train.jsonl'}",
                       "data.batch_size=8", "data.eval_batch_size=8", "trainer.enable_progress_bar=false",
                       f"data.val_manifest={tmp_path / 'val.jsonl'}", "data.resolution=32", "data.min_side=8",
                       "data.num_workers=0", "stages.pretrain.trainer.max_steps=2"])
    done = run_stage(cfg, "pretrain", 0, tmp_path / "run", None)
    assert "similarity_complete_caption" not in done["metrics"]
    assert sum(v for k, v in done["metrics"].items() if k.startswith("data/skipped")) == 2
    assert run_stage(cfg, "pretrain", 0, tmp_path / "run", None)["metrics"] == done["metrics"]


def test_a_moved_run_continues_from_its_own_weights(tmp_path):
    """done.json holds paths relative to its stage: after moving a run, the next stage reads the moved weights (an
    absolute path would point at the old place: gone, or, for a copy, another run's weights)."""
    import shutil

    steps = [*FAST, "stages.pretrain.trainer.max_steps=2", "stages.captioner.trainer.max_steps=2"]
    run_pipeline(compose_cfg(["+experiment=toy_pretrain", *steps]), tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    summary = run_pipeline(compose_cfg(["+experiment=toy_captioner", *steps]), tmp_path / "b")
    assert set(summary["stages"]) == {"pretrain", "captioner"}
    assert json.loads((tmp_path / "b" / "pretrain" / "done.json").read_text())["weights"] == "weights.safetensors"


def test_a_finished_stage_is_reused_only_under_its_own_settings(tmp_path):
    """done.json carries the stage's settings: the same directory under other settings (here a learning rate, as a
    changed default would) stops with a message naming the key instead of reusing the old result."""
    import pytest

    from uae_lightning.errors import ConfigError

    base = ["+experiment=toy_pretrain", *FAST, "stages.pretrain.trainer.max_steps=2"]
    run_pipeline(compose_cfg(base), tmp_path)
    with pytest.raises(ConfigError, match="stage.module.lr: 0.001 -> 0.002"):
        run_pipeline(compose_cfg([*base, "stages.pretrain.module.lr=0.002"]), tmp_path)


def test_a_callback_and_a_second_logger_added_from_the_command_line_run(tmp_path):
    """conf/callbacks and conf/logger are name -> _target_ groups: a ModelCheckpoint that keeps every checkpoint and
    a CSV logger beside TensorBoard, added with overrides only, both take effect; the preview callback switched off
    with null leaves no preview image."""
    keep = tmp_path / "keep"
    cfg = compose_cfg(["+experiment=toy_pretrain", *FAST, "stages.pretrain.trainer.max_steps=4",
                       "+callbacks.keep._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                       f"+callbacks.keep.dirpath={keep}", "+callbacks.keep.every_n_train_steps=2",
                       "+callbacks.keep.save_top_k=-1", "callbacks.preview=null",
                       "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger", "+logger.csv.name=csv",
                       "+logger.csv.version=''"])
    run_pipeline(cfg, tmp_path / "run")
    assert len(list(keep.glob("*.ckpt"))) == 2  # steps 2 and 4
    rows = (tmp_path / "run" / "pretrain" / "csv" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in rows[0] and len(rows) > 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run" / "pretrain" / "tensorboard"))
    ea.Reload()
    assert "train/loss" in ea.Tags()["scalars"] and not ea.Tags()["images"]
    import pytest

    from uae_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="callbacks.bad must be null or hold a _target_"):
        run_pipeline(compose_cfg(["+experiment=toy_pretrain", *FAST, "+callbacks.bad.every=2"]), tmp_path / "bad")


@pytest.mark.parametrize("stop_at", [8, 11])
def test_a_run_stopped_at_an_epoch_boundary_or_mid_epoch_resumes_to_the_straight_run(tmp_path, monkeypatch, stop_at):
    """8 batches per epoch. A preemption checkpoint written after the epoch's last batch (step 8) restarts that epoch
    with Lightning's epoch counter unchanged; one written mid-epoch (step 11) resumes inside epoch 2. Either way the
    resumed run trains on the batches an uninterrupted run trains on: same held-out numbers to the last bit. (Before
    the sampler took its position from the trained-batch count, the step-8 case trained on epoch 3's permutation.)"""
    from uae_lightning.callbacks import preemption
    from uae_lightning.callbacks.preemption import Preempted, Preemption

    base = ["+experiment=toy_pretrain", *FAST, "stages.pretrain.trainer.max_steps=13", "callbacks.preview=null"]
    straight = run_pipeline(compose_cfg(base), tmp_path / "straight")
    original = Preemption.on_train_batch_end

    def signal_once(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == stop_at:
            monkeypatch.setitem(preemption._state, "signalled", True)
        return original(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(Preemption, "on_train_batch_end", signal_once)
    with pytest.raises(Preempted, match=f"step {stop_at}"):
        run_pipeline(compose_cfg(base), tmp_path / "stopped")
    monkeypatch.setattr(Preemption, "on_train_batch_end", original)
    monkeypatch.setitem(preemption._state, "signalled", False)
    assert run_pipeline(compose_cfg(base), tmp_path / "stopped") == straight
