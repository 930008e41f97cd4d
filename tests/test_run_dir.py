"""A run directory is used by one run at a time; a killed run leaves no lock behind."""
import os
import signal
import subprocess
import sys

import pytest

from uae_lightning.runner import RunLockedError, run_lock


def test_a_second_run_stops_at_once_naming_the_holder(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path):
                pass
        out = subprocess.run([sys.executable, "-m", "uae_lightning", f"hydra.run.dir={tmp_path}"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 2 and f"in use by another run (pid {os.getpid()}" in out.stderr + out.stdout
        assert "GPU available" not in out.stderr + out.stdout  # stopped before building anything
    with run_lock(tmp_path):  # released at the end of the block
        pass


def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
    holder = (f"import os, signal; from pathlib import Path; from uae_lightning.runner import run_lock\n"
              f"with run_lock(Path({str(tmp_path)!r})): os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", holder], timeout=120)
    assert out.returncode == -signal.SIGKILL and (tmp_path / ".lock").read_text().startswith("pid ")
    with run_lock(tmp_path):
        pass
