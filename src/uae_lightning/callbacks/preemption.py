"""Preemption under SLURM: one signal handler for the whole process, one owner of requeue.

SLURM sends SIGUSR1 ahead of the time limit or a preemption (`--signal=USR1@<preemption.lead_s>`, set by
conf/hydra/launcher/submitit_slurm.yaml; slurm/templates/ for sbatch). `install()` (called first thing by every
command line: training, bench, pipeline) makes the signal only set a flag, so it never kills the process, whatever
it is doing. The work then stops at its next safe point, where every rank agrees (`agreed()`, a collective):

- training: at the next step boundary the trainer saves `checkpoints/last.ckpt` (model, optimizer, loop progress,
  data position, RNG state) — the `Preemption` callback;
- the held-out test: at the next batch (the training result is already in last.ckpt; the test is re-run);
- Unified-Bench: at the next batch (finished images are already in results.jsonl; the bench resumes after them);
- an export finishes (it takes seconds) and the signal is reported.

The safe point raises `Preempted`; the command line catches it and calls `requeue()`: rank 0 runs `scontrol
requeue` for this job and every rank waits for SLURM to end it. The requeued job re-runs the same command, finds the
same deterministic run directory, skips finished stages and resumes where it stopped.

Lightning's own SLURM requeue is switched off (`SLURMEnvironment(auto_requeue=False)`), and submitit is never sent
its signal and never resubmits (`max_num_timeout: 0`), so nothing else requeues.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("uae_lightning")

_state = {"signalled": False, "installed": set()}


class Preempted(Exception):
    """Raised at a safe point after the preemption signal: what must survive is saved; requeue and end."""


def _handle(signum, frame) -> None:
    log.warning("received signal %d: stopping at the next safe point to requeue", signum)
    _state["signalled"] = True


def install(signum: int = signal.SIGUSR1) -> None:
    """Route `signum` to the flag for the rest of the process (idempotent)."""
    if signum not in _state["installed"]:
        signal.signal(signum, _handle)
        _state["installed"].add(signum)


def signalled() -> bool:
    """This process has received the signal."""
    return _state["signalled"]


def agreed() -> bool:
    """Some rank of the process group has received the signal. A collective when there are several ranks: every rank
    must call it at the same point (the same batch boundary)."""
    flag = _state["signalled"]
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"
        t = torch.tensor([int(flag)], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: `ARRAYJOB_TASK` inside a job array, else the job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(where: str, wait_s: float, rank: int = 0) -> None:
    """After `Preempted`: requeue this SLURM job (rank 0) and wait for SLURM to end the process. Outside SLURM there is
    nothing to requeue: raise, telling the user to re-run the same command to resume."""
    job = slurm_job_id()
    if job is None:
        raise RuntimeError(f"preemption signal outside SLURM during {where}; re-run the same command to resume")
    if rank == 0:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"scontrol requeue {job} failed ({out.stderr.strip()}) during {where}")
        log.warning("requeued SLURM job %s (%s); waiting for SLURM to stop this run", job, where)
    time.sleep(wait_s)  # SLURM terminates the job now; returning would let the run go on
    raise RuntimeError(f"job {job} was requeued but not stopped within {wait_s:.0f} s")


def save_last(trainer: L.Trainer, checkpoint: Path) -> None:
    """Write the trainer's checkpoint to `checkpoint` through a temporary path, so that a kill mid-write keeps the
    previous one (a sharded checkpoint is a directory). Every rank calls it."""
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    trainer.save_checkpoint(tmp)
    if trainer.is_global_zero:
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint)
        elif checkpoint.exists():
            checkpoint.unlink()
        os.replace(tmp, checkpoint)
    trainer.strategy.barrier("uae_save_last")


class Preemption(L.Callback):
    """The training loop's safe points: after a step (checkpoint, then `Preempted`) and after a held-out test batch."""

    def __init__(self, checkpoint: str | Path, signum: int = signal.SIGUSR1):
        self.checkpoint = Path(checkpoint)
        self.signum = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        install(self.signum)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not agreed():
            return
        save_last(trainer, self.checkpoint)
        log.warning("saved %s at step %d", self.checkpoint, trainer.global_step)
        raise Preempted(f"training, step {trainer.global_step}")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx,
                          dataloader_idx: int = 0) -> None:
        if agreed():
            raise Preempted(f"the held-out test, batch {batch_idx}")
