"""Where this process stands in the default process group (the training run's ranks), for code outside Lightning's
hooks: the data sampler and the Unified-Bench split."""
from __future__ import annotations

import torch


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if process_group()[1] > 1:
        torch.distributed.barrier()
