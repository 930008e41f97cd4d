"""Unified-GRPO rounds: `rounds=K` repeats the G4U -> U4G pair, each stage of each round in its own directory, from
the weights of the stage before it; per-round settings; a kill inside round 2 resumes without redoing round 1; the
cross-stage TensorBoard curves."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

from conftest import FAST, compose_cfg
from uae_lightning.config import round_config, stage_runs, validate
from uae_lightning.errors import ConfigError
from uae_lightning.runner import run_pipeline

# Two rounds of tiny G4U and U4G stages (2 rollout batches each) on random models.
ROUNDS = [*FAST, "run=[g4u,u4g]", "rounds=2", "stages.g4u.data.batch_size=3", "stages.g4u.module.group_size=2",
          "stages.g4u.module.num_iterations=1", "stages.g4u.module.max_new_tokens=8", "stages.g4u.module.decode_steps=2",
          "stages.g4u.module.eval_steps=2", "stages.g4u.trainer.max_steps=2", "stages.g4u.trainer.val_check_interval=1",
          "stages.u4g.data.batch_size=2", "stages.u4g.module.group_size=3", "stages.u4g.module.num_steps=4",
          "stages.u4g.module.eval_steps=2", "stages.u4g.trainer.max_steps=2", "stages.u4g.trainer.val_check_interval=1",
          "stages.u4g.module.max_new_tokens=8", "bench.num_steps=2", "bench.max_new_tokens=8"]


def test_rounds_repeat_the_g4u_u4g_pair_with_per_round_settings():
    cfg = compose_cfg(["rounds=3", "+round_settings.r2.g4u.module.lr=1e-4", "+round_settings.r3.u4g.module.lr=5e-4"])
    validate(cfg)
    assert stage_runs(cfg) == [("pretrain", "pretrain", 1), ("captioner", "captioner", 1),
                               ("cold_start", "cold_start", 1), ("g4u", "g4u", 1), ("u4g", "u4g", 1),
                               ("g4u_round2", "g4u", 2), ("u4g_round2", "u4g", 2),
                               ("g4u_round3", "g4u", 3), ("u4g_round3", "u4g", 3)]
    lr = {(s, r): round_config(cfg, s, r).stages[s].module.lr for _, s, r in stage_runs(cfg)[3:]}
    # r2's G4U setting holds from round 2 on; r3 changes U4G from round 3 on; everything else is the stage's own.
    assert lr == {("g4u", 1): 3e-4, ("u4g", 1): 1e-3, ("g4u", 2): 1e-4, ("u4g", 2): 1e-3, ("g4u", 3): 1e-4,
                  ("u4g", 3): 5e-4}
    assert round_config(cfg, "g4u", 2).stages.g4u.module.group_size == cfg.stages.g4u.module.group_size
    assert cfg.stages.g4u.module.lr == 3e-4  # the run's own config is not changed
    with pytest.raises(ConfigError, match="round_settings.r4"):
        validate(compose_cfg(["rounds=3", "+round_settings.r4.g4u.module.lr=1e-4"]))
    with pytest.raises(ConfigError, match="round_settings.r2"):
        validate(compose_cfg(["rounds=2", "+round_settings.r2.pretrain.module.lr=1e-4"]))
    with pytest.raises(ConfigError, match="rounds"):
        validate(compose_cfg(["rounds=2", "run=[pretrain,g4u]"]))
    with pytest.raises(ConfigError, match="rounds"):
        validate(compose_cfg(["rounds=0"]))


def _base(weights) -> dict:
    with safe_open(str(weights), "pt") as f:
        return json.loads(f.metadata()["base"])


def test_two_rounds_write_every_stage_and_chain_their_weights(tmp_path):
    cfg = compose_cfg([*ROUNDS, "+round_settings.r2.g4u.module.lr=1e-4"])
    summary = run_pipeline(cfg, tmp_path)
    folders = ["g4u", "u4g", "g4u_round2", "u4g_round2"]
    assert list(summary["stages"]) == folders and list(summary["unified_bench"]) == folders
    assert list(summary["geneval"]) == folders
    for folder in folders:
        assert (tmp_path / folder / "done.json").is_file() and (tmp_path / folder / "unified_bench").is_dir()
    done = {f: json.loads((tmp_path / f / "done.json").read_text()) for f in folders}
    assert done["g4u_round2"]["settings"]["stage"]["module"]["lr"] == 1e-4
    assert done["g4u"]["settings"]["stage"]["module"]["lr"] == 3e-4
    # Round 2's G4U starts from round 1's U4G output, bit for bit (its base link names that file and its sha256).
    from uae_lightning.models.weights import declared_fingerprint

    base = _base(tmp_path / "g4u_round2" / "weights.safetensors")
    assert base["path"] == "../u4g/weights.safetensors"
    assert base["fingerprint"] == declared_fingerprint(tmp_path / "u4g" / "weights.safetensors")
    assert _base(tmp_path / "u4g_round2" / "weights.safetensors")["path"] == "../g4u_round2/weights.safetensors"
    # The cross-stage curves: one point per rollout batch of every RL stage on one axis, a marker per stage start.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("run/rollout_reward")] == list(range(8))  # 4 stages x 2 rollout batches
    assert [(e.step, e.value) for e in ea.Scalars("run/stage")] == [(0, 1), (2, 2), (4, 3), (6, 4)]
    assert [e.step for e in ea.Scalars("run/unified_bench")] == [2, 4, 6, 8]
    assert [e.step for e in ea.Scalars("run/heldout_reward")][-1] == 8
    # One row per stage and round: what it added over the stage before it (Unified-Bench: paired per image).
    from uae_lightning.sweeps import per_stage_table

    rows = per_stage_table(tmp_path).splitlines()[2:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == folders

    def per_image(folder):
        lines = (tmp_path / folder / "unified_bench" / "results.jsonl").read_text().splitlines()
        return {r["image"]: 100 * sum(r["scores"].values()) / len(r["scores"]) for r in map(json.loads, lines)}

    before, after = per_image("u4g"), per_image("g4u_round2")
    diff = sum(after[k] - before[k] for k in after) / len(after)
    assert rows[2].split(" | ")[4].startswith(f"{diff:+.2f} ± ")
    gain = summary["stages"]["u4g_round2"]["reward_after"] - summary["stages"]["u4g_round2"]["reward_before"]
    assert rows[3].split(" | ")[1].startswith(f"{gain:+.4f} ± ")
    # The metric against the round, per stage: the sweeps tool's by-round series and plot.
    from uae_lightning.sweeps import by_round, write_round_plot

    [series] = by_round(tmp_path, "reward_after").values()
    assert series == {s: {1: summary["stages"][s]["reward_after"], 2: summary["stages"][f"{s}_round2"]["reward_after"]}
                      for s in ("g4u", "u4g")}
    assert write_round_plot(tmp_path, tmp_path, "unified_bench").stat().st_size > 1000


@pytest.mark.slow
def test_a_run_killed_inside_round_2_resumes_without_redoing_round_1(tmp_path):
    args = [sys.executable, "-m", "uae_lightning", f"hydra.run.dir={tmp_path}", *ROUNDS,
            "stages.g4u.trainer.max_steps=6", "stages.g4u.trainer.checkpoint_every_n_steps=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    last = tmp_path / "g4u_round2" / "checkpoints" / "last.ckpt"  # a mid-stage checkpoint of round 2's G4U
    deadline = time.time() + 600
    while time.time() < deadline and not last.exists() and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (tmp_path / "g4u_round2" / "done.json").exists()
    round1 = {f: (tmp_path / f / "done.json").stat().st_mtime_ns for f in ("g4u", "u4g")}
    out = subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "stage g4u already finished" in log and "stage u4g already finished" in log
    assert "stage g4u: resuming from" in log  # round 2's G4U, from its own last checkpoint
    assert {f: (tmp_path / f / "done.json").stat().st_mtime_ns for f in round1} == round1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["stages"]) == ["g4u", "u4g", "g4u_round2", "u4g_round2"]
