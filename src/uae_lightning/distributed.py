"""Where this process stands in the default process group (the training run's ranks), for code outside Lightning's
hooks: the data sampler and the Unified-Bench split."""
from __future__ import annotations

import os

import torch


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard() -> tuple[int, int]:
    """(rank, world) of a work split: the training run's process group when there is one, else the SLURM tasks
    of a job step (SLURM_PROCID / SLURM_NTASKS), else torchrun's RANK / WORLD_SIZE, else one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    for rank, world in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if process_group()[1] > 1:
        torch.distributed.barrier()


def release() -> None:
    """Destroy the default process group at the end of a run, while the interpreter is whole. Lightning does so at
    exit for NCCL only; a gloo group left to the exit can have its worker threads torn down still joinable, and the
    process aborts after a finished run ('terminate called without an active exception', exit code -6)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
