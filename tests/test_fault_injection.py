"""SIGKILL at seeded random moments (and twice in the middle of a checkpoint write): every re-run finishes with the
same summary as an uninterrupted run and leaves no partial file."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "workers" / "killed_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
RUN = ["+experiment=toy_pretrain", "data.train_size=32", "data.val_size=8", "data.batch_size=8",
       "data.eval_batch_size=8", "trainer.enable_progress_bar=false", "trainer.checkpoint_every_n_steps=2",
       "stages.pretrain.trainer.max_steps=8", "bench.batch_size=8"]


def run(run_dir: Path, kill_at_save: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), str(run_dir), str(kill_at_save), *RUN], capture_output=True,
                          text=True, timeout=600, env=ENV)


def strays(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*") if p.name.endswith((".partial", ".tmp"))]


def test_killed_runs_resume_to_the_uninterrupted_summary(tmp_path):
    """Stage 1 for 8 steps (crossing an epoch), a checkpoint every 2 steps, then its held-out test and Unified-Bench.
    Kills: three at seeded random times within the uninterrupted run's duration (after the ~6 s import), two inside
    the 2nd and the 4th (last) checkpoint writes. Each killed run is re-run once, without faults, to the end."""
    start = time.perf_counter()
    ref = run(tmp_path / "ref")
    duration = time.perf_counter() - start
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())
    rng = random.Random(0)
    kills = [("time", rng.uniform(6.0, duration)) for _ in range(3)] + [("save", 2), ("save", 4)]
    for i, (how, when) in enumerate(kills):
        run_dir = tmp_path / f"killed{i}"
        if how == "time":
            proc = subprocess.Popen([sys.executable, str(WORKER), str(run_dir), "0", *RUN], env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(when)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            killed = run(run_dir, when)
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
            assert strays(run_dir)  # the cut-short write is there before the re-run
        again = run(run_dir)
        assert again.returncode == 0, (how, when, again.stderr[-3000:])
        assert json.loads((run_dir / "summary.json").read_text()) == expected, (how, when)
        assert strays(run_dir) == [], (how, when)
