"""Atomic checkpoint files. Lightning's own save goes through an fsspec transaction, which writes the whole file to
the node's $TMPDIR and then moves it: on a cluster that is often another filesystem (the move is a full copy, not
atomic) and a kill mid-write leaves the temp file behind. Here a checkpoint is written beside its final path and
renamed into place; whatever a kill leaves is a `.partial` file that the next start of the stage removes."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

PARTIAL = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{PARTIAL}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # same directory, so the same filesystem: atomic


def remove_partial(folder: Path) -> list[Path]:
    """Delete what an interrupted save left in `folder` (partial files, the preemption save's `.tmp`); returns them."""
    if not folder.is_dir():
        return []
    left = [p for p in folder.iterdir() if p.name.endswith(PARTIAL) or p.name.endswith(".ckpt.tmp")]
    for p in left:
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink()
    return left
