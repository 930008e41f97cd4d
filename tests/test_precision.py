"""Mixed precision as the references train: frozen weights and compute in bf16, trainable weights (and AdamW state) in
fp32, so that small updates are not rounded away."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

import uae_lightning.runner as runner
from conftest import FAST, compose_cfg
from uae_lightning.models.build import build_autoencoder

pytestmark = pytest.mark.slow

BF16 = ["model.encoder.dtype=bfloat16", "model.decoder.dtype=bfloat16", "trainer.accelerator=cpu",
        "stages.pretrain.module.lr=1e-5", "stages.pretrain.module.warmup_steps=0", "stages.pretrain.trainer.max_steps=1"]


def changed_share(precision: str, tmp_path: Path) -> float:
    """Share of the connector's and DiT's weights that one AdamW step at lr 1e-5 changed (Adam's first step moves
    every weight with a gradient by ~lr)."""
    cfg = compose_cfg(["+experiment=toy_pretrain", *FAST, *BF16, f"trainer.precision={precision}"])
    runner.run_stage(cfg, "pretrain", 0, tmp_path / precision, None)
    trained = load_file(tmp_path / precision / "weights.safetensors")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    _, connector, decoder = build_autoencoder(model, cfg.data.resolution)  # the stage's own initialisation
    before = {f"connector.{k}": v for k, v in connector.state_dict().items()}
    before.update({f"decoder.{k}": v for k, v in decoder.state_dict().items() if k.startswith("transformer.")})
    moved = sum(int((trained[k].float() != v.float()).sum()) for k, v in before.items() if v.dim() == 2)
    total = sum(v.numel() for v in before.values() if v.dim() == 2)
    return moved / total


def test_paper_precision_keeps_small_updates_that_bf16_true_rounds_away(tmp_path):
    """Paper presets' precision: > 90 % of the matrix weights move after one step at lr 1e-5 (every weight with a
    non-zero gradient should). Under bf16-true an update of 1e-5 survives only on weights below ~2.6e-3 in magnitude
    (bf16's half-spacing there): < 25 % move (observed 7 %)."""
    precision = compose_cfg(["+experiment=pretrain"]).trainer.precision
    assert changed_share(precision, tmp_path) > 0.9
    assert changed_share("bf16-true", tmp_path) < 0.25
