"""Shared fixtures: composing the real Hydra configs, and a tiny toy config that trains in seconds."""
from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

import uae_lightning.cli  # noqa: F401  (registers the run-name resolver the configs use)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download
torch.set_num_threads(2)


def compose_cfg(overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="uae_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


@pytest.fixture
def compose_config():
    return compose_cfg


# Small enough for unit tests of the stages (seconds on 2 cores), same code paths as the default run.
FAST = [
    "data.train_size=64",
    "data.val_size=8",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.preview_every_n_steps=2",
    "callbacks.preview_images=2",
]
