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


def resume_settings(path: Path, settings: dict) -> dict[str, tuple]:
    """The settings a resumable output folder was made with: written to `path` (JSON, atomically) the first time;
    later, what differs from them, {key: (there, now)} (empty when a resume may go on)."""
    import json

    if path.is_file():
        old = json.loads(path.read_text())
        return {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return {}
