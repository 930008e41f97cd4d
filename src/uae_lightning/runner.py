"""Running a composed config: its stages in order, each in its own deterministic directory, then summary.json.

The command line (cli.py) checks the config, then imports this module (torch, Lightning, the model libraries) and
calls `run`. A stage that finished (done.json present) is skipped on a re-run; one that was interrupted resumes from
checkpoints/last.ckpt. The run ends by writing summary.json and printing its table.
"""
from __future__ import annotations

import json
import fcntl
import logging
import math
import os
import socket
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
import shutil
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from uae_lightning import quiet
from uae_lightning.bench.core import run_bench
from uae_lightning.distributed import barrier, release
from uae_lightning.bench.io import save_png
from uae_lightning.callbacks import preemption
from uae_lightning.callbacks.preemption import Preempted, Preemption, save_last, slurm_job_id
from uae_lightning.checkpointing import AtomicCheckpointIO, remove_partial
from uae_lightning.config import configured, round_config, stage_runs, validate
from uae_lightning.errors import USER_ERRORS, ConfigError, fail
from uae_lightning.pipeline import UAEPipeline, bench_settings
from uae_lightning.slurm import check_allocation, slurm_nodes, slurm_tasks
from uae_lightning.rewards.callback import RewardCallback
from uae_lightning.stages.base import NonFiniteError

log = logging.getLogger("uae_lightning")
quiet.hide_loading_bars()


def _merged(base: DictConfig, delta) -> DictConfig:
    """`base` updated with a stage's `delta` (which may add keys, e.g. trainer.max_steps)."""
    extra = OmegaConf.to_container(delta, resolve=True) if delta is not None else {}
    return OmegaConf.merge(OmegaConf.to_container(base, resolve=True), extra)


def build_strategy(cfg: DictConfig):
    """conf/strategy/: "auto" (Lightning's choice) or "fsdp2" (ModelParallelStrategy + fully_shard)."""
    s = cfg.strategy
    if s.name == "auto":
        return "auto"
    if s.name == "fsdp2":
        from uae_lightning.models.fsdp import TrainableStateStrategy

        dp = s.data_parallel_size
        if dp == "auto":  # every process shards data (Lightning's own "auto" would mean one group per node)
            dp = slurm_tasks(cfg.trainer.devices) * slurm_nodes(cfg.trainer.num_nodes) // s.tensor_parallel_size
        return TrainableStateStrategy(data_parallel_size=dp, tensor_parallel_size=s.tensor_parallel_size,
                                      save_distributed_checkpoint=s.save_distributed_checkpoint,
                                      process_group_backend=s.process_group_backend)
    raise ConfigError(f"strategy.name={s.name!r}; expected 'auto' or 'fsdp2'")


def build_trainer(cfg: DictConfig, name: str, stage_dir: Path) -> L.Trainer:
    trainer_cfg = OmegaConf.to_container(_merged(cfg.trainer, cfg.stages[name].trainer))
    every = trainer_cfg.pop("checkpoint_every_n_steps")
    trainer_cfg["enable_progress_bar"] = quiet.progress_bars(trainer_cfg["enable_progress_bar"])
    # What every stage needs: the reward backbones, last.ckpt, the preemption safe points (callbacks/preemption.py:
    # the one owner of checkpoint-and-requeue). Then the configured ones (conf/callbacks/, conf/logger/).
    callbacks = [RewardCallback(cfg.reward.backbones, cfg.backbone_sources)]
    callbacks += [instantiate(node) for node in configured(cfg.callbacks, "callbacks")]
    callbacks += [
        ModelCheckpoint(dirpath=stage_dir / "checkpoints", every_n_train_steps=every, save_last=True, save_top_k=0),
        Preemption(stage_dir / "checkpoints" / "last.ckpt"),
    ]
    loggers = [instantiate(node, save_dir=str(stage_dir)) for node in configured(cfg.logger, "logger")]
    plugins = []
    if slurm_job_id() is not None and SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if cfg.strategy.name == "auto":  # FSDP2 checkpoints are distributed-checkpoint directories, written by torch
        plugins.append(AtomicCheckpointIO())
    return L.Trainer(default_root_dir=str(stage_dir), callbacks=callbacks, logger=loggers or False, plugins=plugins,
                     strategy=build_strategy(cfg), **trainer_cfg)


def stage_settings(cfg: DictConfig, name: str) -> dict:
    """What a finished stage's result depends on (besides its input weights): reused only when these match."""
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.create({
        "seed": cfg.seed, "model": cfg.model, "data": _merged(cfg.data, cfg.stages[name].get("data")),
        "stage": cfg.stages[name], "precision": cfg.trainer.precision}), resolve=True)))


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted({*old, *new})
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# Keys of the data config that do not change the held-out split (only how training batches are drawn and shaped).
TRAIN_ONLY_DATA_KEYS = ("batch_size", "eval_batch_size", "num_workers", "train_size", "caption_levels")


def heldout_key(cfg: DictConfig, name: str, module) -> dict | None:
    """What a stage's held-out numbers depend on besides its weights: two stages with equal keys, the second starting
    from the first's weights, measure the same starting point (None: the stage's test is its own)."""
    own = module.heldout_settings()
    if own is None:
        return None
    data = OmegaConf.to_container(_merged(cfg.data, cfg.stages[name].get("data")), resolve=True)
    return json.loads(json.dumps({"test": own, "data": {k: v for k, v in data.items() if k not in TRAIN_ONLY_DATA_KEYS},
                                  "model": OmegaConf.to_container(cfg.model, resolve=True),
                                  "reward": OmegaConf.to_container(cfg.reward, resolve=True),
                                  "precision": cfg.trainer.precision}))


def held_out_test(trainer: L.Trainer, module, datamodule) -> dict:
    """The stage's held-out test: {"metrics": mean per metric, "per_image": {metric: {index: value}}}."""
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return {"metrics": {k: float(v) for k, v in metrics.items() if not k.startswith("heldout/")},
            "per_image": {k: {str(i): v for i, v in vals.items()} for k, vals in module.heldout_values.items()}}


def paired_gains(before: dict, after: dict) -> dict[str, tuple[float, float, int]]:
    """Per metric measured on the same images before and after: (mean gain, its standard error, images)."""
    out = {}
    for k, b in before["per_image"].items():
        a = after["per_image"].get(k, {})
        common = sorted(set(a) & set(b), key=int)
        if len(common) < 2:
            continue
        d = torch.tensor([a[i] - b[i] for i in common], dtype=torch.float64)
        out[k] = (float(d.mean()), float(d.std() / math.sqrt(len(d))), len(d))
    return out


def run_stage(cfg: DictConfig, name: str, index: int, stage_dir: Path, init_from: str | None,
              previous: dict | None = None) -> dict:
    """Train one stage (or resume it), evaluate it on held-out data, save its weights; returns its done.json.
    `previous`: the result of the stage that wrote `init_from` (its held-out test may be this stage's starting point)."""
    done_file = stage_dir / "done.json"
    settings = stage_settings(cfg, name)
    if done_file.exists():
        done = json.loads(done_file.read_text())
        changed = differences(done.get("settings", {}), settings)
        if changed:
            raise ConfigError(f"{stage_dir} holds stage {name} finished with other settings ({', '.join(changed[:6])}); "
                              f"give this run another name= (or delete that stage's folder to train it again)")
        log.info("stage %s already finished in %s; reusing it", name, stage_dir)
        # Paths in done.json are relative to the stage directory, so a run can be moved or copied.
        return {**done, "weights": str(stage_dir / done["weights"]), "heldout": stage_dir / "heldout.json"}
    stage_dir.mkdir(parents=True, exist_ok=True)
    for left in remove_partial(stage_dir / "checkpoints"):
        log.warning("stage %s: removed %s, left by an interrupted checkpoint write", name, left.name)
    L.seed_everything(cfg.seed + index, workers=True, verbose=False)
    data_cfg = _merged(cfg.data, cfg.stages[name].get("data"))
    datamodule = instantiate(data_cfg, _convert_="all")
    module = instantiate(
        cfg.stages[name].module,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        resolution=data_cfg.resolution,
        init_from=init_from,
        _convert_="all",
    )
    trainer = build_trainer(cfg, name, stage_dir)
    last = stage_dir / "checkpoints" / "last.ckpt"
    before_file = stage_dir / "before.json"
    key = heldout_key(cfg, name, module)
    before = json.loads(before_file.read_text()) if module.report_before and before_file.exists() else None
    if before is not None and "metrics" not in before:  # written by an earlier version: the means only
        before = {"metrics": before, "per_image": {}}
    if module.report_before and before is None:
        before = reusable_test(previous, init_from, key)
        if before is not None:
            log.info("stage %s: starting point = the held-out test that ended stage %s (same weights, same test)",
                     name, previous["name"])
            for logger in trainer.loggers:  # the held-out curves start at step 0, as a measured starting point would
                logger.log_metrics({f"heldout/{k}": v for k, v in before["metrics"].items() if "/" not in k}, step=0)
        else:
            log.info("stage %s: measuring the starting point on held-out data", name)
            with phase(module, "starting-point test"):
                before = held_out_test(trainer, module, datamodule)
        write_json(before_file, before)
    if last.exists():
        log.info("stage %s: resuming from %s", name, last)
    with phase(module, "training, other"):  # checkpoints, logging, previews; rollouts and steps are counted apart
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None)
    own = next(cb for cb in trainer.checkpoint_callbacks if Path(cb.dirpath) == last.parent)  # (a user may add others)
    if own._last_global_step_saved != trainer.global_step:
        # The stage's final state, so that a preemption during the test or the bench does not train again.
        save_last(trainer, last)
    log.info("stage %s: trained to step %d; held-out test", name, trainer.global_step)
    with phase(module, "final test"):
        after = held_out_test(trainer, module, datamodule)
    metrics = after["metrics"]
    if before is not None:
        metrics = {**{f"{k}_before": v for k, v in before["metrics"].items()},
                   **{f"{k}_after": v for k, v in metrics.items()},
                   **{f"{k}_gain_se": se for k, (_, se, _) in paired_gains(before, after).items()}}
    weights = stage_dir / "weights.safetensors"
    with phase(module, "save weights"):
        module.save_weights(weights, merged=cfg.merged_weights)  # every rank (a sharded model is gathered); rank 0 writes
    if trainer.is_global_zero:
        for old in ("unified_bench", "geneval"):  # scores of older weights of this stage
            shutil.rmtree(stage_dir / old, ignore_errors=True)
        write_json(stage_dir / "heldout.json", {"key": key, "weights": weights.name, **after})
        result = {"metrics": metrics, "weights": weights.name, "settings": settings, "global_step": trainer.global_step,
                  "data": dict(module.data_counts), "timings": stage_timings(module)}
        done_file.write_text(json.dumps(result, indent=2))
    return {"metrics": metrics, "weights": str(weights), "heldout": stage_dir / "heldout.json",
            "timings": stage_timings(module)}


@contextmanager
def phase(module, name: str):
    """Time a phase of a stage into module.timings, less what the module timed itself meanwhile (building the models,
    rollouts, training steps, evaluations during training), so that no second is counted twice."""
    def timed_inside() -> float:  # rollouts are inside the training steps: not counted twice
        return sum(v for k, v in module.timings.items() if k != "rollouts")

    inner = timed_inside()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        own = time.perf_counter() - t0 - (timed_inside() - inner)
        module.timings[name] = module.timings.get(name, 0.0) + own


def stage_timings(module) -> dict[str, float]:
    """Seconds per phase; rollouts are part of the training steps, so "train steps" becomes "updates" (the rest)."""
    t = dict(module.timings)
    if "rollouts" in t and "train steps" in t:
        t["updates"] = t.pop("train steps") - t["rollouts"]
    return {k: round(v, 2) for k, v in t.items()}


TIMING_COLUMNS = ["build", "starting-point test", "train steps", "rollouts", "updates", "evaluations in training",
                  "training, other", "final test", "save weights", "Unified-Bench", "GenEval"]


def timing_table(timings: dict[str, dict[str, float]]) -> str:
    """Where the time went: seconds per stage and phase, and each stage's total."""
    cols = [c for c in TIMING_COLUMNS if any(c in t for t in timings.values())]
    cols += sorted({c for t in timings.values() for c in t} - set(cols))
    head = ["stage", *cols, "total"]
    rows = [[stage, *[f"{t[c]:.1f}" if c in t else "-" for c in cols], f"{sum(t.values()):.1f}"]
            for stage, t in timings.items()]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "-" * len(fmt(head)), *map(fmt, rows)])


def stage_line(metrics: dict) -> str:
    """A stage's metrics in one line: `name value`, or `name before -> after (gain +- paired standard error)`."""
    parts = []
    for k, v in metrics.items():
        if k.startswith("data/") or k.endswith("_gain_se") or k.endswith("_before"):
            continue
        if k.endswith("_after"):
            base = k[: -len("_after")]
            b, se = metrics.get(f"{base}_before"), metrics.get(f"{base}_gain_se")
            gain = f" ({v - b:+.4f} +- {se:.4f})" if se is not None else ""
            parts.append(f"{base} {b:.4f} -> {v:.4f}{gain}")
        else:
            parts.append(f"{k} {v:.4f}")
    return ", ".join(parts)


def write_json(path: Path, value) -> None:
    if rank_zero_only.rank == 0:
        path.write_text(json.dumps(value))


def reusable_test(previous: dict | None, init_from: str | None, key: dict | None) -> dict | None:
    """The previous stage's final held-out test, if it measured exactly what this stage's first test would: the
    weights this stage starts from (the file it wrote), with the same test settings, data and reward. Every rank
    reads the file (rank 0 wrote it before the barrier of the previous stage's bench)."""
    if previous is None or key is None or init_from is None or not Path(previous["heldout"]).exists():
        return None
    saved = json.loads(Path(previous["heldout"]).read_text())
    same_weights = Path(init_from) == Path(previous["heldout"]).parent / saved.get("weights", "")
    return {k: saved[k] for k in ("metrics", "per_image")} if same_weights and saved.get("key") == key else None


def reference_images(cfg: DictConfig, folder: Path, resolution: int) -> Path:
    """The folder Unified-Bench reads: `bench.images`, or the data's held-out split (its first `bench.max_images`)
    written once (by rank 0) as PNGs at the bench resolution. Called for every stage's bench resolution before any
    stage trains (check_heldout), so a held-out split without a usable image stops the run before training."""
    if cfg.bench.images:
        return Path(cfg.bench.images)
    folder = folder / str(resolution)
    marker = folder / "complete"
    if marker.exists():
        return folder
    datamodule = instantiate(cfg.data, resolution=resolution, _convert_="all")
    datamodule.setup("test")
    n = min(len(datamodule.val_set), cfg.bench.max_images or len(datamodule.val_set))
    skipped = Counter()
    for i in range(n):  # every rank counts; rank 0 writes
        item = datamodule.val_set[i]
        if "image" not in item:  # unreadable held-out files are counted by the stages, not benchmarked
            skipped[item.get("skip", "unusable")] += 1
        elif rank_zero_only.rank == 0:
            save_png(item["image"].float() / 255.0, folder / f"{i:05d}.png")
    if skipped.total() == n:
        d = cfg.data
        given = next((f"data.{k}={d[k]}" for k in ("val_manifest", "val_shards", "hf_val_split") if d.get(k)), None)
        origin = next((f"data.{k}={d[k]}" for k in ("manifest", "shards", "hf_path") if d.get(k)), None)
        source = given or (f"{origin} with data.val_fraction={d.val_fraction}" if origin else f"data.source={d.source}")
        raise ConfigError(f"the held-out split ({source}) has no usable image among its first {n} ({dict(skipped)}): "
                          "the held-out test and Unified-Bench need some; fix those files or choose another split")
    if rank_zero_only.rank == 0:
        marker.touch()
    return folder


def check_heldout(cfg: DictConfig, run_dir: Path) -> None:
    """Before any stage trains: the held-out images every stage's Unified-Bench reads exist (reference_images)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for resolution in sorted({bench_settings(config, name)["resolution"] for name in cfg.run}):
        reference_images(cfg, run_dir / "bench_images", resolution)


def bench_stage(cfg: DictConfig, run_dir: Path, name: str, weights: str, folder: str | None = None) -> dict:
    """Unified-Bench of a finished stage's weights (resumes if interrupted); returns its summary. Every rank of the
    run takes part: the images are split over the ranks (bench.core.run_bench), each holding a full copy of the
    models, so no rank idles in a collective while one redraws the whole set."""
    barrier()  # rank 0 has written weights.safetensors
    out = run_dir / (folder or name) / "unified_bench"
    settings = bench_settings(OmegaConf.to_container(cfg, resolve=True), name)
    pipe = UAEPipeline.from_bench_settings(weights, OmegaConf.to_container(cfg.model, resolve=True), settings)
    pipe.to("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    log.info("stage %s: Unified-Bench at %d px, %d steps, CFG %s", name, settings["resolution"],
             settings["num_steps"], settings["guidance_scale"])
    images = reference_images(cfg, run_dir / "bench_images", settings["resolution"])
    barrier()  # ... and the reference images
    return run_bench(pipe, images, out, progress=quiet.progress_bars(cfg.trainer.enable_progress_bar), fresh=True)


def geneval_stages(cfg: DictConfig) -> list[str]:
    """The stages of this run after which GenEval is scored (`bench.geneval.stages`: all, a list, or []), every
    round of them."""
    g = cfg.bench.get("geneval")
    if g is None or not g.stages:
        return []
    return list(cfg.run) if g.stages == "all" else [s for s in cfg.run if s in list(g.stages)]


def geneval_stage(cfg: DictConfig, run_dir: Path, name: str, weights: str, folder: str | None = None) -> dict:
    """GenEval of a finished stage's weights with the bench's sampling settings: every rank draws its share of the
    prompts (resuming), rank 0 scores them into <stage>/geneval/ and logs the scores to TensorBoard; returns the
    summary on every rank."""
    from uae_lightning.bench import geneval
    from uae_lightning.bench.detectors import build_scorer

    g = cfg.bench.geneval
    stage_dir = run_dir / (folder or name)
    out = stage_dir / "geneval"
    settings = bench_settings(OmegaConf.to_container(cfg, resolve=True), name)
    pipe = UAEPipeline.from_bench_settings(weights, OmegaConf.to_container(cfg.model, resolve=True), settings)
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    pipe.to(device)
    prompts = geneval.read_prompts(g.prompts)
    indices = geneval.subset(prompts, g.max_prompts)
    log.info("stage %s: GenEval, %d prompts (%s%s) x %d images", name, len(indices), g.prompts,
             "" if len(indices) == len(prompts) else f", a subset of {len(prompts)}", g.samples)
    if rank_zero_only.rank == 0 and (out / geneval.GENERATION).is_file():
        made = json.loads((out / geneval.GENERATION).read_text())
        if made != geneval.generation_settings(pipe, len(prompts), g.samples, g.seed, None, str(g.prompts), indices):
            log.info("stage %s: GenEval settings changed; drawing its images again", name)
            shutil.rmtree(out)
    barrier()
    geneval.generate(pipe, prompts, out, g.samples, settings["batch_size"], g.seed, progress=False,
                     prompt_source=str(g.prompts), indices=indices)
    del pipe
    barrier()  # every image is on disk
    summary = None
    if rank_zero_only.rank == 0:
        logged = (out / geneval.SUMMARY).is_file()  # a reused stage's scores are already in its TensorBoard
        scorer = build_scorer(g.detector, cfg.backbone_sources.get("clip"), device)
        summary = geneval.score(out, scorer, progress=quiet.progress_bars(cfg.trainer.enable_progress_bar))
        summary["subset"] = len(indices) < len(prompts)
        geneval.atomic_write(out / geneval.SUMMARY, json.dumps(summary, indent=2))
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(stage_dir / "tensorboard")) if not logged else nullcontext() as writer:
            for tag, value in ({"overall": summary["overall"], **summary["tags"]}.items() if writer else ()):
                writer.add_scalar(f"geneval/{tag}", value, 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [summary]
        torch.distributed.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary


# The cross-stage curves (<run dir>/tensorboard): per-rollout-batch and held-out metrics of every stage on one axis,
# cumulative RL steps (rollout batches of G4U and U4G); stages without rollouts add no steps.
RUN_CURVES = {"reward/mean": "run/rollout_reward", "caption/length_mean": "run/rollout_caption_length",
              "caption/informativeness": "run/rollout_informativeness", "heldout/reward": "run/heldout_reward",
              "heldout/informativeness": "run/heldout_informativeness",
              "heldout/caption_length": "run/heldout_caption_length"}


def write_run_curves(run_dir: Path, folders: list[str], summary: dict) -> None:
    """Rewrite <run dir>/tensorboard from the finished stages' own events (so a resumed run never logs a point
    twice): every RUN_CURVES metric at (RL steps before the stage) + its step, `run/stage` (the stage's number) at
    each stage's first step as a marker, and each stage's Unified-Bench and GenEval at its last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = run_dir / "tensorboard"
    shutil.rmtree(out, ignore_errors=True)
    offset = 0
    with SummaryWriter(str(out)) as writer:
        for number, folder in enumerate(folders, 1):
            events = EventAccumulator(str(run_dir / folder / "tensorboard"), size_guidance={"scalars": 0})
            events.Reload()
            tags = set(events.Tags().get("scalars", []))
            writer.add_scalar("run/stage", number, offset)
            writer.add_text("run/stages", f"{folder} starts at RL step {offset}", offset)
            rollouts = len(events.Scalars("reward/mean")) if "reward/mean" in tags else 0
            for tag, name in RUN_CURVES.items():
                if tag not in tags:
                    continue
                for e in events.Scalars(tag) if rollouts else events.Scalars(tag)[-1:]:  # a stage without rollouts: its end
                    writer.add_scalar(name, e.value, offset + (e.step if rollouts else 0))
            offset += rollouts
            for key in ("unified_bench", "geneval"):
                if summary.get(key, {}).get(folder) is not None:
                    writer.add_scalar(f"run/{key}", summary[key][folder], offset)


def strict_json(value):
    """`value` with every non-finite float replaced by None: summary.json stays valid JSON (no bare NaN)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_table(summary: dict) -> str:
    rows = [(stage, k, v) for stage, metrics in summary["stages"].items() for k, v in metrics.items()]
    rows += [(stage, "unified_bench", v) for stage, v in summary["unified_bench"].items()]
    rows += [(stage, "geneval", v) for stage, v in summary.get("geneval", {}).items()]
    width = max([len(f"{s}  {k}") for s, k, _ in rows] + [10])
    lines = [f"{'stage  metric':<{width}}  value", "-" * (width + 10)]
    lines += [f"{f'{s}  {k}':<{width}}  {v:.4f}" if v is not None else f"{f'{s}  {k}':<{width}}  not finite" for s, k, v in rows]
    return "\n".join(lines)


class RunLockedError(RuntimeError):
    pass


@contextmanager
def run_lock(run_dir: Path):
    """Hold run_dir/.lock while a run uses the directory (rank 0 only: the other ranks are the same run). A second
    process stops at once, naming the holder; the lock is the kernel's (flock), so a killed run leaves none behind."""
    if rank_zero_only.rank != 0:
        yield
        return
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunLockedError(f"{run_dir} is in use by another run ({f.read().strip() or 'unknown holder'}); wait "
                                 "for it to end, or give this run another name= or paths.runs_dir=") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_sources(cfg: DictConfig) -> None:
    """Before any stage trains: every pretrained model and backbone the run will use must be found and readable
    (configs, processors, LongCLIP's state dict memory-mapped; weights load when each is used). A wrong id or path
    stops the run now with the key that names it, not after a stage has trained."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoConfig, AutoProcessor

    from uae_lightning.rewards.backbones import check_backbone

    def check(key: str, value: str, load) -> None:
        try:
            load()
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}={value!r} cannot be loaded ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0][:300]})") from e

    enc, dec = cfg.model.encoder, cfg.model.decoder
    if enc.pretrained:
        check("model.encoder.pretrained", enc.pretrained, lambda: (AutoConfig.from_pretrained(enc.pretrained),
                                                                    AutoProcessor.from_pretrained(enc.pretrained)))
    if dec.pretrained:
        parts = [(SD3Transformer2DModel, "transformer"), (FlowMatchEulerDiscreteScheduler, "scheduler")]
        parts += [(AutoencoderKL, "vae")] if dec.vae else []
        for cls, sub in parts:
            check("model.decoder.pretrained", dec.pretrained, lambda: cls.load_config(dec.pretrained, subfolder=sub))
        if dec.pooled == "sd3_empty_prompt":
            for sub in ("text_encoder", "text_encoder_2"):
                check("model.decoder.pretrained", dec.pretrained,
                      lambda: AutoConfig.from_pretrained(dec.pretrained, subfolder=sub))
    sources = OmegaConf.to_container(cfg.backbone_sources)
    g = cfg.bench.get("geneval")
    if g is not None and g.stages and g.detector != "toy":
        check("bench.geneval.detector", g.detector, lambda: (AutoConfig.from_pretrained(g.detector),
                                                             AutoProcessor.from_pretrained(g.detector)))
        clip = sources.get("clip", "openai/clip-vit-large-patch14")
        check("backbone_sources.clip (GenEval's colour classifier)", clip,
              lambda: (AutoConfig.from_pretrained(clip), AutoProcessor.from_pretrained(clip)))
    for key, names in (("reward.backbones", list(cfg.reward.backbones)), ("bench.backbones", list(cfg.bench.backbones))):
        for name in names:
            try:
                check_backbone(name, sources)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}" + (f" (backbone_sources.{name})" if name in sources else "")) from e


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict:
    validate(cfg)
    check_allocation(cfg)
    check_sources(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        check_heldout(cfg, run_dir)
        summary = _run_stages(cfg, run_dir)
    release()  # every stage and bench is done on every rank
    return summary


def _run_stages(cfg: DictConfig, run_dir: Path) -> dict:
    summary: dict = {"stages": {}, "unified_bench": {}}
    after = geneval_stages(cfg)
    if after:
        summary["geneval"] = {}
    timings: dict[str, dict[str, float]] = {}  # seconds per stage and phase (timings.json; not results)
    init_from, previous = cfg.init_from, None
    runs = stage_runs(cfg)
    for index, (folder, name, round_) in enumerate(runs):
        log.info("=== stage %d/%d: %s%s ===", index + 1, len(runs), name, f" (round {round_})" if round_ > 1 else "")
        stage_cfg = round_config(cfg, name, round_)
        result = run_stage(stage_cfg, name, index, run_dir / folder, init_from, previous)
        previous = {**result, "name": folder}
        summary["stages"][folder] = result["metrics"]
        init_from = result["weights"]
        t0 = time.perf_counter()
        summary["unified_bench"][folder] = bench_stage(stage_cfg, run_dir, name, init_from, folder)["overall"]
        if result.get("timings") is not None:
            timings[folder] = {**result["timings"], "Unified-Bench": round(time.perf_counter() - t0, 2)}
        extra = ""
        if name in after:
            t0 = time.perf_counter()
            scores = geneval_stage(stage_cfg, run_dir, name, init_from, folder)
            summary["geneval"][folder] = scores["overall"]
            extra = f"; GenEval {scores['overall']:.4f}"
            if folder in timings:
                timings[folder]["GenEval"] = round(time.perf_counter() - t0, 2)
        log.info("stage %s done: %s; Unified-Bench %.2f%s", folder, stage_line(result["metrics"]),
                 summary["unified_bench"][folder], extra)
        if rank_zero_only.rank == 0 and "tensorboard" in (cfg.logger or {}) and cfg.logger.tensorboard is not None:
            write_run_curves(run_dir, [f for f, _, _ in runs[: index + 1]], summary)
        if folder == cfg.get("stop_after"):
            log.info("stopping after stage %s (stop_after)", folder)
            break
    if rank_zero_only.rank != 0:
        return summary
    path = run_dir / "summary.json"
    path.write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
    summary = strict_json(summary)
    table = ""
    if timings:
        (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
        table = f"\n\nwhere the time went (seconds; {run_dir / 'timings.json'}):\n{timing_table(timings)}"
    print("\n" + format_table(summary) + table + f"\n\nsummary: {path}\ntensorboard --logdir {run_dir}")
    return summary


def run(cfg: DictConfig, run_dir: Path) -> None:
    """The command line's run: the pipeline, with SLURM's preemption signal routed to a requeue and the errors a
    user can cause and fix reported in one line (errors.fail)."""
    preemption.install()  # from here on SIGUSR1 stops the run at a safe point, never kills it
    try:
        run_pipeline(cfg, run_dir)
    except Preempted as stop:
        preemption.requeue(str(stop), cfg.preemption.wait_s, rank_zero_only.rank)
    except (*USER_ERRORS, NonFiniteError, RunLockedError) as err:
        fail(err, 1 if isinstance(err, NonFiniteError) else 2)
