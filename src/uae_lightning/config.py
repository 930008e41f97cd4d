"""Checks on the composed config that run before any model is built; each error names the key and what is allowed."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

# choices.py only: the command line validates a config before torch and the model libraries are imported.
from uae_lightning.choices import (ADVANTAGE_SCALES, CONDITIONING_MODES, CONVENTIONS, DECODER_ARCHITECTURES, DTYPE_NAMES,
                                   ENCODER_ARCHITECTURES, LOSS_AGGREGATIONS, LR_SCHEDULES, PADDING_MODES, PAPER_BACKBONES,
                                   PROMPT_POSITIONS, SIGMA_SAMPLINGS, TOY_BACKBONES, WEIGHTING_SCHEMES)

from uae_lightning.errors import ConfigError


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid; expected {allowed}")


def _one_of(value, options, key: str) -> None:
    _check(value in options, key, value, f"one of {list(options)}")


def _positive(value, key: str) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"), key, value,
           "a finite number > 0")


def _positive_int(value, key: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value, "an integer > 0")


ROUND_PAIR = ("g4u", "u4g")  # the stages `rounds` repeats, in this order


def stage_runs(cfg: DictConfig) -> list[tuple[str, str, int]]:
    """(directory, stage, round) of every stage the run trains, in order: `run`, with its G4U -> U4G pair repeated
    `rounds` times (Unified-GRPO rounds). Round 1 keeps the stage's name as its directory; round k >= 2 is
    `<stage>_round<k>`. Each starts from the weights of the one before it."""
    rounds = int(cfg.get("rounds", 1) or 1)
    out = [(name, name, 1) for name in cfg.run]
    if rounds > 1:
        names = list(cfg.run)
        at = next(i for i in range(len(names) - 1) if tuple(names[i : i + 2]) == ROUND_PAIR)
        repeats = [(f"{s}_round{k}", s, k) for k in range(2, rounds + 1) for s in ROUND_PAIR]
        out = out[: at + 2] + repeats + out[at + 2 :]
    return out


def round_config(cfg: DictConfig, stage: str, round_: int) -> DictConfig:
    """The config one stage of one round trains with: `stages.<stage>` with `round_settings.r2` ... `r<round>`
    merged over it in order (a setting given for round k holds from round k on, until a later round changes it)."""
    from omegaconf import OmegaConf

    if round_ == 1:
        return cfg
    deltas = [cfg.round_settings[f"r{k}"][stage] for k in range(2, round_ + 1)
              if f"r{k}" in (cfg.get("round_settings") or {}) and stage in cfg.round_settings[f"r{k}"]]
    if not deltas:
        return cfg
    out = cfg.copy()
    OmegaConf.set_struct(out, False)
    out.stages[stage] = OmegaConf.merge(cfg.stages[stage], *deltas)
    return out


PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


def validate(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    for group, key in (("data", "manifest"), ("data", "shards"), ("data", "hf_path")):
        if key in cfg[group].keys() and OmegaConf.is_missing(cfg[group], key):
            raise ConfigError(f"{group}.{key} is not set; give it on the command line ({group}.{key}=...)")
    _check(len(cfg.run) > 0, "run", list(cfg.run), "a non-empty list of stages")
    for name in cfg.run:
        _one_of(name, list(cfg.stages), "run[]")
    _check(len(set(cfg.run)) == len(cfg.run), "run", list(cfg.run),
           "each stage once (repeat the G4U -> U4G pair with rounds=K)")
    rounds = cfg.get("rounds", 1)
    _positive_int(rounds, "rounds")
    names = list(cfg.run)
    if rounds > 1:
        _check(any(tuple(names[i : i + 2]) == ROUND_PAIR for i in range(len(names) - 1)), "rounds", rounds,
               f"1, or a run holding the pair {list(ROUND_PAIR)} one after the other (run={names})")
    if cfg.get("stop_after"):
        _one_of(cfg.stop_after, [f for f, _, _ in stage_runs(cfg)], "stop_after")
    for key, delta in (cfg.get("round_settings") or {}).items():
        _check(key in [f"r{k}" for k in range(2, rounds + 1)], f"round_settings.{key}", "...",
               f"a round of this run: r2 ... r{rounds} (rounds={rounds})" if rounds > 1 else "nothing: rounds=1")
        for stage in delta:
            _one_of(stage, ROUND_PAIR, f"round_settings.{key}")
    d = cfg.data
    _one_of(d.source, ("toy", "manifest", "webdataset", "hf"), "data.source")
    for key in ("resolution", "batch_size", "eval_batch_size"):
        _check(isinstance(d[key], int) and d[key] > 0, f"data.{key}", d[key], "a positive integer")
    if d.source == "toy":
        _check(1 <= d.max_objects <= 9, "data.max_objects", d.max_objects, "1..9 (one object per grid cell)")
        from uae_lightning.data.toy import LEVELS

        for level, w in d.caption_levels.items():
            _one_of(level, LEVELS, "data.caption_levels")
            _check(w >= 0, f"data.caption_levels.{level}", w, "a weight >= 0")
        _check(sum(d.caption_levels.values()) > 0, "data.caption_levels", dict(d.caption_levels), "weights with a positive sum")
    _check(isinstance(d.get("num_workers", 0), int) and d.get("num_workers", 0) >= 0, "data.num_workers",
           d.get("num_workers"), "an integer >= 0")
    t = cfg.trainer
    _one_of(str(t.precision), PRECISIONS, "trainer.precision")
    _positive_int(t.devices, "trainer.devices")
    _positive_int(t.num_nodes, "trainer.num_nodes")
    _positive_int(t.checkpoint_every_n_steps, "trainer.checkpoint_every_n_steps")
    _positive_int(cfg.preemption.lead_s, "preemption.lead_s")
    _check(isinstance(cfg.merged_weights, bool), "merged_weights", cfg.merged_weights, "true or false")
    configured(cfg.callbacks, "callbacks")
    configured(cfg.logger, "logger")
    _check(cfg.preemption.wait_s > 0, "preemption.wait_s", cfg.preemption.wait_s, "a number of seconds > 0")
    if "max_steps" in t:  # each stage has its own length; a global one would be silently replaced
        raise ConfigError(f"trainer.max_steps={t.max_steps} is not used: every stage sets its own length; set "
                          f"stages.<stage>.trainer.max_steps (stages: {list(cfg.stages)})")
    b = cfg.bench
    for key in ("batch_size", "num_steps", "max_new_tokens"):
        _positive_int(b[key], f"bench.{key}")
    if b.get("resolution") is not None:
        _positive_int(b.resolution, "bench.resolution")
    if b.get("max_images") is not None:
        _positive_int(b.max_images, "bench.max_images")
    _check(b.guidance_scale >= 1, "bench.guidance_scale", b.guidance_scale, "a number >= 1 (1: no guidance)")
    _check(len(b.backbones) > 0, "bench.backbones", list(b.backbones), "at least one backbone")
    for name in b.backbones:
        _check_backbone(name, "bench.backbones")
    g = b.get("geneval")
    if g is not None and g.stages:
        if g.stages != "all":
            stages = list(g.stages) if OmegaConf.is_list(g.stages) else [g.stages]
            for s in stages:
                _one_of(s, list(cfg.stages), "bench.geneval.stages")
        _positive_int(g.samples, "bench.geneval.samples")
        if g.get("max_prompts") is not None:
            _positive_int(g.max_prompts, "bench.geneval.max_prompts")
        _check(isinstance(g.seed, int), "bench.geneval.seed", g.seed, "an integer")
        if g.prompts not in ("toy", "official") and not Path(str(g.prompts)).is_file():
            raise ConfigError(f"bench.geneval.prompts={g.prompts!r}: expected toy, official or a JSONL file of "
                              f"prompts in GenEval's format")
        _check(g.prompts != "toy" or g.detector == "toy", "bench.geneval.detector", g.detector,
               "toy for the toy prompts (they name toy shapes, not COCO classes)")
        _check(g.prompts != "official" or g.detector != "toy", "bench.geneval.detector", g.detector,
               "a COCO detector for the official prompts (the toy world has no COCO objects)")
    m = cfg.model
    _one_of(m.condition_padding, PADDING_MODES, "model.condition_padding")
    _one_of(m.encoder.conditioning, CONDITIONING_MODES, "model.encoder.conditioning")
    _one_of(m.encoder.prompt_position, PROMPT_POSITIONS, "model.encoder.prompt_position")
    for key in ("min_pixels", "max_pixels"):
        if m.encoder.get(key) is not None:
            _positive_int(m.encoder[key], f"model.encoder.{key}")
    _one_of(m.encoder.dtype, DTYPE_NAMES, "model.encoder.dtype")
    _one_of(m.decoder.dtype, DTYPE_NAMES, "model.decoder.dtype")
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
        _check_backbone(name, "reward.backbones")
        _positive(w, f"reward.backbones.{name}")
    for name in cfg.run:
        mod = cfg.stages[name].module
        key = f"stages.{name}.module"
        _positive(mod.lr, f"{key}.lr")
        if "max_nonfinite_in_a_row" in mod:
            _positive_int(mod.max_nonfinite_in_a_row, f"{key}.max_nonfinite_in_a_row")
        if "weighting_scheme" in mod:
            _one_of(mod.weighting_scheme, WEIGHTING_SCHEMES, f"{key}.weighting_scheme")
        if "sigma_sampling" in mod:
            _one_of(mod.sigma_sampling, SIGMA_SAMPLINGS, f"{key}.sigma_sampling")
        if "convention" in mod:
            _one_of(mod.convention, CONVENTIONS, f"{key}.convention")
        for k in ("guidance_scale", "eval_guidance_scale"):
            if k in mod:
                _check(mod[k] >= 1, f"{key}.{k}", mod[k], "a number >= 1 (1: no classifier-free guidance)")
        if "caption_dropout" in mod:
            _check(0 <= mod.caption_dropout < 1, f"{key}.caption_dropout", mod.caption_dropout, "a probability in [0, 1)")
        if mod.get("lora"):
            _positive(mod.lora.r, f"{key}.lora.r")
            _positive(mod.lora.alpha, f"{key}.lora.alpha")
        _positive(cfg.stages[name].trainer.max_steps, f"stages.{name}.trainer.max_steps")
        if "checkpoint_every_n_steps" in cfg.stages[name].trainer:
            _positive_int(cfg.stages[name].trainer.checkpoint_every_n_steps, f"stages.{name}.trainer.checkpoint_every_n_steps")
        if "group_size" in mod:
            _check(isinstance(mod.group_size, int) and mod.group_size >= 2, f"{key}.group_size", mod.group_size,
                   "an integer >= 2 (advantages compare samples within a group)")
        for k in ("clip_range_low", "clip_range_high", "clip_range", "temperature", "max_new_tokens", "num_iterations",
                  "micro_batch_size", "decode_steps", "num_steps"):
            if k in mod:
                _positive(mod[k], f"{key}.{k}")
        if mod.get("eval_max_new_tokens") is not None:
            _positive(mod.eval_max_new_tokens, f"{key}.eval_max_new_tokens")
        if "kl_beta" in mod:
            _check(mod.kl_beta >= 0, f"{key}.kl_beta", mod.kl_beta, "a number >= 0")
        if "loss_aggregation" in mod:
            _one_of(mod.loss_aggregation, LOSS_AGGREGATIONS, f"{key}.loss_aggregation")
        if "lr_schedule" in mod:
            _one_of(mod.lr_schedule, LR_SCHEDULES, f"{key}.lr_schedule")
        if "advantage_scale" in mod:
            _one_of(mod.advantage_scale, ADVANTAGE_SCALES, f"{key}.advantage_scale")
        if "noise_level" in mod:
            _check(mod.noise_level >= 0, f"{key}.noise_level", mod.noise_level, "a number >= 0")
        if "sde_type" in mod:
            _one_of(mod.sde_type, ("sde", "cps"), f"{key}.sde_type")
        if "train_fraction" in mod:
            _check(0 < mod.train_fraction <= 1, f"{key}.train_fraction", mod.train_fraction, "a fraction in (0, 1]")
        if mod.get("train_window") is not None:
            w = list(mod.train_window)
            _check(len(w) == 2 and 0 <= w[0] < min(w[1], mod.num_steps), f"{key}.train_window", w,
                   f"[start, stop) with 0 <= start < stop and start < num_steps={mod.num_steps} (stop is capped at num_steps)")
        if "adv_clip" in mod:
            _positive(mod.adv_clip, f"{key}.adv_clip")
        if "grad_last_steps" in mod:
            _check(1 <= mod.grad_last_steps <= mod.num_steps, f"{key}.grad_last_steps", mod.grad_last_steps,
                   f"1..num_steps={mod.num_steps}")


def _check_backbone(name: str, key: str) -> None:
    """Toy names must exist; other names must be a paper short name, a local folder or look like a hub id."""
    import os
    import re

    if name.startswith("toy_"):
        _one_of(name, TOY_BACKBONES, key)
    elif name not in PAPER_BACKBONES and not os.path.isdir(name) and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ConfigError(
            f"{key}: {name!r} is not a toy backbone {sorted(TOY_BACKBONES)}, a paper backbone "
            f"{sorted(PAPER_BACKBONES)}, an existing folder or a Hugging Face id (org/name)"
        )


def configured(group: DictConfig, key: str) -> list[DictConfig]:
    """The entries of a name -> {_target_: ...} group (callbacks, logger), in order, without the ones set to null."""
    out = []
    for name, node in group.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"{key}.{name} must be null or hold a _target_ (the class to instantiate); got {node!r}")
        out.append(node)
    return out
