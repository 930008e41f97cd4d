"""Checks on the composed config that run before any model is built; each error names the key and what is allowed."""
from __future__ import annotations

from omegaconf import DictConfig

from uae_lightning.models.build import DECODER_ARCHITECTURES, DTYPES, ENCODER_ARCHITECTURES
from uae_lightning.models.encoder import CONDITIONING_MODES, PADDING_MODES
from uae_lightning.models.flow import WEIGHTING_SCHEMES
from uae_lightning.rewards.backbones import BACKBONES


class ConfigError(ValueError):
    pass


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid; expected {allowed}")


def _one_of(value, options, key: str) -> None:
    _check(value in options, key, value, f"one of {list(options)}")


def _positive(value, key: str) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, key, value, "a number > 0")


def validate(cfg: DictConfig) -> None:
    _check(len(cfg.run) > 0, "run", list(cfg.run), "a non-empty list of stages")
    for name in cfg.run:
        _one_of(name, list(cfg.stages), "run[]")
    d = cfg.data
    _one_of(d.source, ("toy", "manifest"), "data.source")
    for key in ("resolution", "batch_size", "eval_batch_size"):
        _check(isinstance(d[key], int) and d[key] > 0, f"data.{key}", d[key], "a positive integer")
    if d.source == "toy":
        _check(1 <= d.max_objects <= 9, "data.max_objects", d.max_objects, "1..9 (one object per grid cell)")
        from uae_lightning.data.toy import LEVELS

        for level, w in d.caption_levels.items():
            _one_of(level, LEVELS, "data.caption_levels")
            _check(w >= 0, f"data.caption_levels.{level}", w, "a weight >= 0")
        _check(sum(d.caption_levels.values()) > 0, "data.caption_levels", dict(d.caption_levels), "weights with a positive sum")
    m = cfg.model
    _one_of(m.condition_padding, PADDING_MODES, "model.condition_padding")
    _one_of(m.encoder.conditioning, CONDITIONING_MODES, "model.encoder.conditioning")
    _one_of(m.encoder.dtype, DTYPES, "model.encoder.dtype")
    _one_of(m.decoder.dtype, DTYPES, "model.decoder.dtype")
    _positive(m.encoder.max_condition_tokens, "model.encoder.max_condition_tokens")
    if not m.encoder.pretrained:
        _one_of(m.encoder.architecture, ENCODER_ARCHITECTURES, "model.encoder.architecture")
    if not m.decoder.pretrained:
        _one_of(m.decoder.architecture, DECODER_ARCHITECTURES, "model.decoder.architecture")
        if m.decoder.architecture == "toy":
            patch = m.decoder.tiny.patch_size
            _check(d.resolution % patch == 0, "data.resolution", d.resolution, f"a multiple of model.decoder.tiny.patch_size={patch}")
        if m.encoder.architecture == "toy":
            step = m.encoder.tiny.patch_size * m.encoder.tiny.merge_size
            _check(d.resolution % step == 0, "data.resolution", d.resolution, f"a multiple of patch_size*merge_size={step}")
    _positive(m.connector.hidden_multiplier, "model.connector.hidden_multiplier")
    _check(len(cfg.reward.backbones) > 0, "reward.backbones", dict(cfg.reward.backbones), "at least one backbone: weight")
    for name, w in cfg.reward.backbones.items():
        if name.startswith("toy_"):
            _one_of(name, BACKBONES, "reward.backbones")
        _positive(w, f"reward.backbones.{name}")
    for name in cfg.run:
        mod = cfg.stages[name].module
        key = f"stages.{name}.module"
        _positive(mod.lr, f"{key}.lr")
        if "weighting_scheme" in mod:
            _one_of(mod.weighting_scheme, WEIGHTING_SCHEMES, f"{key}.weighting_scheme")
        if "caption_dropout" in mod:
            _check(0 <= mod.caption_dropout < 1, f"{key}.caption_dropout", mod.caption_dropout, "a probability in [0, 1)")
        if mod.get("lora"):
            _positive(mod.lora.r, f"{key}.lora.r")
            _positive(mod.lora.alpha, f"{key}.lora.alpha")
        _positive(cfg.stages[name].trainer.max_steps, f"stages.{name}.trainer.max_steps")
