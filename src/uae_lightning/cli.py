"""The command line: compose the config, check it, then run its stages (runner.py).

    python -m uae_lightning                              # the embedded toy pipeline (CPU, minutes, no download)
    python -m uae_lightning +experiment=pretrain data.manifest=/data/train.jsonl

Only Hydra and the config checks are imported up front: `--help`, `--cfg job`, a misspelt key or an invalid value
answer in about a second; torch, Lightning and the model libraries (several seconds) load once the config is valid.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import uae_lightning.quiet  # noqa: F401  (first: silences third-party notices)
from uae_lightning.config import validate
from uae_lightning.errors import ConfigError, fail
from uae_lightning.slurm import check_allocation, register_resolvers


def run_name(override_dirname: str) -> str:
    """Directory name for a set of overrides: readable when short, hashed when long, "default" when empty. `key=value`
    becomes `key-value`, overrides are joined by `+`, and every other character outside [A-Za-z0-9_.-] becomes `-`, so a
    path into a run is a plain Hydra value: `init_from=runs/<name>/<stage>/weights.safetensors` needs no quotes."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "-", override_dirname.replace("+", "").replace(",", "+")) or "default"
    if len(name) > 96:
        name = f"{name[:80]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


OmegaConf.register_new_resolver("uae_run_name", run_name, replace=True)
register_resolvers()  # uae_slurm_* for conf/hydra/launcher/submitit_slurm.yaml


@hydra.main(version_base="1.3", config_path="pkg://uae_lightning.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)  # before the heavy imports: an invalid value is reported at once
        check_allocation(cfg)
    except ConfigError as err:
        fail(err)
    from uae_lightning import runner

    runner.run(cfg, Path(HydraConfig.get().runtime.output_dir))
