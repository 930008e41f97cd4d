"""SLURM glue: the launcher's resource resolvers (conf/hydra/launcher/submitit_slurm.yaml) and the check, inside
the job, that the allocation matches the trainer."""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from uae_lightning.errors import ConfigError


def _count(devices, key: str = "trainer.devices") -> int:
    if isinstance(devices, bool):
        devices = None
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        return int(devices)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    raise ConfigError(
        f"{key}={devices!r}: under hydra/launcher=submitit_slurm the number of processes per node must be explicit "
        f"(SLURM starts one task per device); set {key} to an integer, e.g. {key}=4"
    )


def slurm_nodes(num_nodes) -> int:
    return _count(num_nodes, "trainer.num_nodes")


def slurm_tasks(devices) -> int:
    return _count(devices)


def slurm_gpus(accelerator: str, devices) -> int:
    """GPUs per node: trainer.devices for accelerator gpu/cuda, none otherwise (auto and cpu request no GPU)."""
    return _count(devices) if str(accelerator) in ("gpu", "cuda") else 0


def launch_mode(launcher_target: str) -> str | None:
    """hydra.mode: MULTIRUN for the SLURM launcher (it only runs in multirun mode), else decided by -m as usual."""
    return "MULTIRUN" if launcher_target.endswith("SlurmLauncher") else None


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("uae_launch_mode", launch_mode, replace=True)
    OmegaConf.register_new_resolver("uae_slurm_nodes", slurm_nodes, replace=True)
    OmegaConf.register_new_resolver("uae_slurm_tasks", slurm_tasks, replace=True)
    OmegaConf.register_new_resolver("uae_slurm_gpus", slurm_gpus, replace=True)


def check_allocation(cfg: DictConfig) -> None:
    """Inside a SLURM job: the tasks SLURM started must be the processes the trainer expects (an explicit
    hydra.launcher override that disagrees with trainer.devices / num_nodes would otherwise hang or under-use)."""
    ntasks, nnodes = os.environ.get("SLURM_NTASKS"), os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    if ntasks is None or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    want_nodes, want_tasks = _count(cfg.trainer.num_nodes, "trainer.num_nodes"), _count(cfg.trainer.devices)
    if int(ntasks) != want_nodes * want_tasks or (nnodes and int(nnodes) != want_nodes):
        raise ConfigError(
            f"SLURM started {ntasks} task(s) on {nnodes} node(s), but trainer.num_nodes={want_nodes} x "
            f"trainer.devices={want_tasks} processes are expected; let hydra.launcher.nodes / tasks_per_node follow "
            f"the trainer (do not override them) or change trainer.num_nodes / trainer.devices"
        )
