"""Preemption under SLURM, with exactly one owner of requeue: this callback.

SLURM sends SIGUSR1 ahead of the time limit or a preemption (`--signal=USR1@90`, set by
conf/hydra/launcher/submitit_slurm.yaml and slurm/templates/). The handler only records the signal; at the next
step boundary every rank agrees, the trainer saves `checkpoints/last.ckpt` (model, optimizer, loop progress,
data position and RNG state), and rank 0 runs `scontrol requeue` for this job. The process then waits for SLURM to
end it. The requeued job re-runs the same command, finds the same deterministic run directory, skips finished
stages and resumes this one from last.ckpt.

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

log = logging.getLogger("uae_lightning")


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: `ARRAYJOB_TASK` inside a job array, else the job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


class Preemption(L.Callback):
    def __init__(self, checkpoint: str | Path, signum: int = signal.SIGUSR1, wait_s: float = 600.0):
        self.checkpoint = Path(checkpoint)
        self.signum = signum
        self.wait_s = wait_s
        self.signalled = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: checkpoint and requeue at the next step boundary", signum)
        self.signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._previous = signal.signal(self.signum, self._handle)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        stop = self.signalled
        if trainer.world_size > 1:  # any rank signalled -> all ranks stop at this same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            if self.checkpoint.is_dir():  # a sharded (distributed) checkpoint is a directory
                shutil.rmtree(self.checkpoint)
            elif self.checkpoint.exists():
                self.checkpoint.unlink()
            os.replace(tmp, self.checkpoint)
            log.warning("saved %s at step %d", self.checkpoint, trainer.global_step)
        trainer.strategy.barrier("uae_preemption")
        job = slurm_job_id()
        if job is None:
            raise RuntimeError(f"signal {self.signum} outside SLURM: checkpoint saved to {self.checkpoint}; re-run to resume")
        if trainer.is_global_zero:
            out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"scontrol requeue {job} failed ({out.stderr.strip()}); checkpoint: {self.checkpoint}")
            log.warning("requeued SLURM job %s; waiting for SLURM to stop this run", job)
        time.sleep(self.wait_s)  # SLURM terminates the job now; returning would let the stage finish early
        raise RuntimeError(f"job {job} was requeued but not stopped within {self.wait_s:.0f} s")
