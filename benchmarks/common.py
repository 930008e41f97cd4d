"""Helpers shared by the benchmark scripts: the composed default config and a loader that repeats one batch."""
from __future__ import annotations

from torch.utils.data import Dataset


def default_config(overrides: list[str] | None = None):
    from hydra import compose, initialize_config_module

    import uae_lightning.cli  # noqa: F401  (registers the run-name resolver)

    with initialize_config_module(config_module="uae_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


class SameBatch(Dataset):
    """Yields one fixed batch `n` times, so compared loops see identical inputs."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch
