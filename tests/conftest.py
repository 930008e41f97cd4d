"""Shared fixtures: composing the real Hydra configs, and a tiny toy config that trains in seconds."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

import uae_lightning.cli  # noqa: F401  (registers the run-name resolver the configs use)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download
os.environ.setdefault("UAE_CACHE_DIR", tempfile.mkdtemp(prefix="uae-test-cache-"))  # computed constants (models/build.py)
torch.set_num_threads(2)


def compose_cfg(overrides: list[str] | None = None):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="uae_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


@pytest.fixture
def compose_config():
    return compose_cfg


# A line of third-party noise in a run's output (stdout and stderr, as piped to a file or a SLURM log): a warning
# printed by the warnings module (it names its source file under site-packages), a tip, hint or deprecation notice, a
# progress bar (a terminal's, not a log's: tqdm's or Lightning's rich one).
NOISE = re.compile(r"site-packages|Warning|warn\(|💡|[Dd]eprecat|HINT|Tip:|\d+%\||━|\]\[tensorboard\]")


def noise_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE.search(line)]


# Small enough for unit tests of the stages (seconds on 2 cores), same code paths as the default run.
FAST = [
    "data.train_size=64",
    "data.val_size=8",
    "stages.u4g.data.val_size=8",  # U4G's own held-out set is 16x data.val_size (conf/stage/u4g.yaml)
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.preview.every_n_steps=2",
    "callbacks.preview.num_images=2",
    "bench.geneval.max_prompts=6",  # GenEval after every stage, one toy prompt per tag
    "bench.geneval.samples=1",
]


def random_toy_pipeline(folder, lora: dict | None = None, **kwargs):
    """The toy config's models with random weights (seed 0) as a pipeline, saved through a stage-output file in
    `folder`; with `lora`, the captioner gets that adapter with non-zero weights (so an export must carry it)."""
    from omegaconf import OmegaConf

    from uae_lightning.models.build import build_connector, build_decoder, build_encoder
    from uae_lightning.models.lora import add_lora
    from uae_lightning.models.weights import save_weights
    from uae_lightning.pipeline import UAEPipeline

    m = OmegaConf.to_container(compose_cfg().model, resolve=True)
    torch.manual_seed(0)
    enc, dec = build_encoder(m["encoder"], 32, "mask"), build_decoder(m["decoder"], 32, "mask")
    conn = build_connector(m["connector"], enc, dec)
    if lora is not None:
        add_lora(enc.model, lora)
        with torch.no_grad():
            for n, p in enc.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    weights = folder / "weights.safetensors"
    save_weights(weights, {"encoder": enc.state_dict(), "connector": conn.state_dict(), "decoder": dec.state_dict()},
                 {"encoder": lora} if lora else {}, lora)
    return UAEPipeline.from_weights(weights, m, 32, **kwargs)


def save_tiny_clip(path):
    """A tiny random CLIP (model + image processor) saved like a hub checkpoint."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def save_tiny_dinov2(path):
    """A tiny random DINOv2 saved like a hub checkpoint."""
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=32, patch_size=8)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A SLURM cluster that answers (slurm/local/start.sh; `.ci/run` starts one). Skipped without one, unless
    UAE_REQUIRE_SLURM=1 (set by .ci/run), which turns the skip into a failure."""
    if not _cluster_up():
        if os.environ.get("UAE_REQUIRE_SLURM") == "1":
            pytest.fail("UAE_REQUIRE_SLURM=1 but no SLURM cluster answers (bash slurm/local/start.sh; source its env)")
        pytest.skip("no SLURM cluster (start one with: bash slurm/local/start.sh && source /tmp/uae-slurm/env)")
