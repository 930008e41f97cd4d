"""Run the toy stage-1 pipeline through the real CLI code path; with KILL_AT_SAVE = k > 0, the k-th checkpoint write
is cut short: half a file is written where the checkpoint goes, then the process SIGKILLs itself (what a node failure
or an OOM kill mid-write leaves behind).

    python tests/workers/killed_run.py RUN_DIR KILL_AT_SAVE [hydra overrides...]
"""
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import compose_cfg  # noqa: E402

import uae_lightning.runner as runner  # noqa: E402
from uae_lightning.checkpointing import PARTIAL, AtomicCheckpointIO  # noqa: E402


def main() -> None:
    run_dir, kill_at, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    if kill_at > 0:
        save, calls = AtomicCheckpointIO.save_checkpoint, [0]

        def save_then_die(self, checkpoint, path, storage_options=None):
            calls[0] += 1
            if calls[0] == kill_at:
                path = Path(path)
                with open(path.with_name(f".{path.name}{PARTIAL}"), "wb") as f:
                    f.write(b"\0" * 4096)
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            save(self, checkpoint, path, storage_options)

        AtomicCheckpointIO.save_checkpoint = save_then_die
    runner.run_pipeline(compose_cfg(overrides), run_dir)


if __name__ == "__main__":
    main()
