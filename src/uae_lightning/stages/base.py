"""What every stage shares: building encoder/connector/decoder in `configure_model` (so FSDP can shard them),
loading the previous stage's weights, data-quality counters, throughput, and saving the stage's final weights.

Each stage file (pretrain.py, ...) holds its own algorithm top to bottom; this file holds no algorithm.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

from uae_lightning.choices import LR_SCHEDULES
from uae_lightning.data import toy
from uae_lightning.models.build import build_autoencoder
from uae_lightning.models.lora import add_lora
from uae_lightning.models.fsdp import (fill_from_rank0, full_state_dict, gathered_parameters, is_sharded,
                                      mixed_precision_policy, shard_autoencoder)
from uae_lightning.models.weights import encoder_adapter_config, load_weights, root_identity, save_weights, tied_keys
from uae_lightning.pipeline import redraw
from uae_lightning.rewards.callback import RewardCallback

log = logging.getLogger("uae_lightning")


def _as_tuples(x):
    """random.setstate needs tuples; a checkpoint round trip may have turned them into lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning rate of update `step` (0-based) over the configured one: a linear warm-up to 1 at update
    `warmup_steps` - 1 (the first update already trains, at 1 / warmup_steps); then `constant` stays at 1, `linear`
    falls as 1 - p and `cosine` as 0.5 (1 + cos(pi p)), p = (step + 1 - warmup) / (total + 1 - warmup), so that both are
    0.5 half-way through the decay and every update, the last included, still trains. Without a warm-up, `linear` is
    transformers' get_linear_schedule_with_warmup (TRL's default): (total - step) / total."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}; expected one of {LR_SCHEDULES}")
    warm = max(1, warmup_steps)
    if step + 1 < warm or schedule == "constant":
        return min(1.0, (step + 1) / warm)
    progress = min(1.0, (step + 1 - warm) / max(1, total_steps + 1 - warm))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteError(RuntimeError):
    pass


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream in the RL stages: the stage seed plus the rank (accelerate's
    `set_seed(seed, device_specific=True)`, which TRL uses), so rank 0 keeps the single-process stream."""
    return seed + rank


class UAEStage(L.LightningModule):
    def __init__(self, model: dict, resolution: int, init_from: str | None = None):
        super().__init__()
        self.model_cfg = model
        self.resolution = resolution
        self.init_from = init_from
        self.encoder = self.connector = self.decoder = None
        self.data_counts: Counter = Counter()
        self._t0: float | None = None
        # Seconds spent per phase inside Lightning's loops (building the models, rollouts, training steps, the
        # evaluations during training): the CLI adds its own phases and prints where the time went.
        self.timings: dict[str, float] = {}
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.encoder_lora: dict | None = None  # config of the captioner's LoRA adapter, when the encoder has one
        # Every LoRA adapter on the models, {"encoder" | "decoder": config}: a sharded model is rebuilt from these to
        # hold its gathered weights (save_weights).
        self.adapters: dict[str, dict] = {}
        self.report_before = False  # stages that improve an existing auto-encoder report metrics before and after
        # RL stages sample captions and SDE noise per rank: each rank gets its own random stream (seeded from the run
        # seed and its rank, as TRL's device-specific seeds) so ranks do not draw the same samples. Stage 1 keeps
        # one shared stream (global_draw), which makes N processes equal one process on the same global batch.
        self.per_rank_rng = False
        # Checkpoints hold what training changes (trainable parameters, optimizer, loop, data position, RNG); the frozen
        # weights come back from the pretrained ids and init_from when the stage is rebuilt (on_save_checkpoint).
        self.strict_loading = False

    # ---- models --------------------------------------------------------------------------------------------------
    @contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0

    def configure_model(self) -> None:
        if self.encoder is not None:
            return
        with self.timed("build"):
            self._build_models()

    def _build_models(self) -> None:
        # Under FSDP2 with several ranks, only rank 0 builds the models with their weights (pretrained read, init_from
        # read, random init); the others build them empty and receive their shards from rank 0 (fill_from_rank0).
        sharded = self.device_mesh is not None
        broadcast = sharded and self.trainer.world_size > 1
        empty = broadcast and self.global_rank != 0
        if empty:
            log.info("rank %d: building the models without weights; rank 0 sends each rank its shards", self.global_rank)
        self.encoder, self.connector, self.decoder = build_autoencoder(self.model_cfg, self.resolution, empty)
        if self.init_from:
            if empty:  # the adapter's structure only; its weights come with the others
                self.encoder_lora = encoder_adapter_config(self.init_from)
                if self.encoder_lora is not None:
                    add_lora(self.encoder.model, self.encoder_lora)
                    self.adapters["encoder"] = dict(self.encoder_lora)
            else:
                self.load_weights(self.init_from)
        self.encoder.requires_grad_(False)
        self.connector.requires_grad_(False)
        self.decoder.requires_grad_(False)
        self.configure_trainable()
        # Trainable parameters (and so their AdamW state) in float32, whatever the frozen weights' dtype: a 1e-5
        # update of a ~0.02 weight is below bfloat16's resolution there (diffusers' cast_training_params,
        # Flow-GRPO). Under `bf16-mixed` the compute is bfloat16 (autocast, or FSDP2's MixedPrecisionPolicy);
        # `bf16-true` casts everything, trainable weights included, to bfloat16 after this.
        for p in self.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if sharded:  # ModelParallelStrategy (conf/strategy/fsdp2.yaml): FSDP2 over data parallel
            models = [self.encoder, self.connector, self.decoder]
            full = [m.state_dict() for m in models] if broadcast and not empty else None
            shard_autoencoder(self.encoder, self.connector, self.decoder, self.device_mesh["data_parallel"],
                              mixed_precision_policy(self.trainer.precision))
            if broadcast:
                fill_from_rank0(models, full, self.trainer.strategy.root_device)
                del full

    def configure_trainable(self) -> None:
        """Unfreeze what this stage trains (everything starts frozen)."""
        raise NotImplementedError

    def add_encoder_lora(self, lora: dict) -> None:
        """LoRA on the encoder's language model (the captioner), unless one came with init_from: then that adapter
        keeps training, and "adapter disabled" still means the model before any captioner RL."""
        if self.encoder_lora is None:
            add_lora(self.encoder.model, lora)
            self.encoder_lora = self.adapters["encoder"] = dict(lora)
        for n, p in self.encoder.model.named_parameters():
            p.requires_grad_("lora_" in n)

    def train_decoder(self, lora: dict | None, gradient_checkpointing: bool) -> None:
        """Connector + DiT train: the whole DiT, or LoRA adapters on it when `lora` is set."""
        self.connector.requires_grad_(True)
        transformer = self.decoder.transformer
        if lora:
            add_lora(transformer, lora)  # the base weights stay frozen
            self.adapters["decoder"] = dict(lora)
        else:
            transformer.requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

    def save_weights(self, path: str | Path, merged: bool = False) -> None:
        """The stage's result, what the next stage (or an export) starts from (format: models/weights.py): what this
        stage trained, on top of the weights it started from (`init_from`, or the models as configured); with `merged`,
        every weight with the adapters merged. Every rank must call it: sharded (FSDP) models are first gathered into
        full state dicts on CPU (a collective); rank 0 writes."""
        models = {"encoder": self.encoder, "connector": self.connector, "decoder": self.decoder}
        trained = None if merged else self.trainable_keys()
        if trained is not None:  # the trained parameters only (under FSDP2, only they are gathered)
            states = {name: gathered_parameters(m, {k[len(name) + 1 :] for k in trained if k.startswith(name + ".")})
                      for name, m in models.items()}
        elif any(is_sharded(m) for m in models.values()):
            states = {name: full_state_dict(m) for name, m in models.items()}
        else:
            states = {name: m.state_dict() for name, m in models.items()}
        if self.global_rank == 0:
            save_weights(path, states, self.adapters, self.encoder_lora, trained=trained, base=self.init_from,
                         root=root_identity(self.model_cfg), tied=tied_keys(models))

    def load_weights(self, path: str | Path) -> None:
        self.encoder_lora = load_weights(path, self.encoder, self.connector, self.decoder, self.model_cfg)
        if self.encoder_lora is not None:
            self.adapters["encoder"] = dict(self.encoder_lora)

    def configure_optimizers(self):
        """AdamW on whatever `configure_trainable` unfroze, with the stage's learning-rate schedule (hparams lr,
        weight_decay, warmup_steps, lr_schedule; see `lr_factor`). The schedule steps once per training batch: an RL
        stage's batch is `num_iterations` optimizer updates of trainer.max_steps, so it has max_steps / num_iterations."""
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        h = self.hparams
        total = max(1, self.trainer.max_steps // h.get("num_iterations", 1))  # config.py: max_steps > 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, h.warmup_steps, total, h.lr_schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- shared bookkeeping ------------------------------------------------------------------------------------
    @property
    def reward(self) -> RewardCallback:
        for cb in self.trainer.callbacks:
            if isinstance(cb, RewardCallback):
                return cb
        raise RuntimeError("this stage needs a RewardCallback in `callbacks` (config group callbacks/)")

    def count_data(self, batch: dict) -> bool:
        """Accumulate the batch's skip/conversion counters and log them; False if nothing in it is usable."""
        self.data_counts.update(batch.get("skipped", {}))
        for k, v in self.data_counts.items():
            # Running totals: the largest value is the total. batch_size is given because a batch whose every sample
            # was skipped holds nothing Lightning could infer it from.
            self.log(f"data/{k}", float(v), batch_size=1, reduce_fx="max")
        return "images" in batch

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._t0 is not None and "images" in batch:
            dt = time.perf_counter() - self._t0
            self.timings["train steps"] = self.timings.get("train steps", 0.0) + dt
            self.log("throughput/images_per_s", len(batch["images"]) / dt)
        self.check_weights_finite()

    def check_weights_finite(self) -> None:
        """A finite loss can still step the weights to NaN/inf (e.g. a huge learning rate): that ends the stage like
        too many non-finite losses in a row, before anything trains on (or is saved from) broken weights."""
        from torch.distributed.tensor import DTensor

        bad = any(not torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                  for p in self.parameters() if p.requires_grad)
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank's shard
            self.stop_nonfinite(f"non-finite trainable weights after step {self.global_step}")

    def finite_or_skip(self, value: torch.Tensor, what: str, max_in_a_row: int) -> bool:
        """False (and counted) if `value` has a NaN/inf: the caller skips the update. `max_in_a_row` skipped steps
        in a row save a checkpoint and stop the run with NonFiniteError."""
        if torch.isfinite(value).all():
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        self.log("nonfinite/skipped_steps", float(self.nonfinite_total))
        if self.nonfinite_in_a_row >= max_in_a_row:
            self.stop_nonfinite(f"{self.nonfinite_in_a_row} steps in a row had a non-finite {what} (step "
                                f"{self.global_step}; the limit is max_nonfinite_in_a_row={max_in_a_row})")
        return False

    def stop_nonfinite(self, what: str) -> None:
        """Save checkpoints/nonfinite.ckpt for inspection and stop the stage with NonFiniteError (the stage is not
        marked done, no weights are written, the run exits non-zero)."""
        ckpt = Path(self.trainer.default_root_dir) / "checkpoints" / "nonfinite.ckpt"
        self.trainer.save_checkpoint(ckpt)
        raise NonFiniteError(f"{what}; stopped after saving {ckpt}. Lower the learning rate or inspect the data.")

    def global_draw(self, draw, n_local: int) -> torch.Tensor:
        """Per-sample randomness for this rank's `n_local` samples, drawn for the whole global batch from the RNG
        every rank shares (all ranks are seeded alike) and sliced to this rank's samples: N processes with batch B
        draw exactly what one process with batch N x B draws (the sampler gives rank r global samples r, r+N, ...).
        `draw(n)` returns a tensor whose first dimension is n."""
        attached = self._trainer is not None
        world, rank = (self.trainer.world_size, self.global_rank) if attached else (1, 0)
        values = draw(n_local * world)
        return values.view(n_local, world, *values.shape[1:])[:, rank]

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.per_rank_rng:
            # Before a resume restores the saved per-rank streams (on_load_checkpoint), so both start alike.
            torch.manual_seed(rank_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_rank))

    def trainable_keys(self) -> set[str]:
        """State-dict keys of what this stage trains (names as in `self.state_dict()`, sharded or not)."""
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self, state_dict: dict) -> dict:
        """`state_dict` cut to the trainable parameters; a trainable parameter missing from it is an error (a key
        naming mismatch would otherwise checkpoint nothing and resume from the initial weights)."""
        keys = self.trainable_keys()
        missing = sorted(keys - state_dict.keys())
        if missing:
            raise RuntimeError(f"trainable parameters missing from the state dict: {missing[:5]}")
        return {k: v for k, v in state_dict.items() if k in keys}

    # Resuming must continue the random stream too: an interrupted run then matches an uninterrupted one. Every rank
    # calls this (Lightning builds the checkpoint dict on all ranks, one writes it), so each rank's stream is kept.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rng = {"torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
               "python_rng": random.getstate()}
        per_rank = [rng]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            per_rank = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(per_rank, rng)
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = self.trainable_state(checkpoint["state_dict"])
        checkpoint["uae_state"] = {"rng": per_rank, "data_counts": dict(self.data_counts),
                                   "nonfinite_total": self.nonfinite_total}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A single-file checkpoint: it must hold every trainable parameter and nothing else (strict_loading is off so
        # that the frozen weights may be absent). Sharded checkpoints are checked by TrainableStateStrategy.
        if "state_dict" in checkpoint:
            keys, saved = self.trainable_keys(), set(checkpoint["state_dict"])
            if saved != keys:
                raise RuntimeError(f"the checkpoint does not hold this stage's trainable parameters (missing "
                                   f"{sorted(keys - saved)[:5]}, unexpected {sorted(saved - keys)[:5]}); was it "
                                   "written by another stage or with other LoRA settings?")
        state = checkpoint.get("uae_state")
        if not state:
            return
        per_rank = state["rng"]
        if len(per_rank) != self.trainer.world_size:
            raise RuntimeError(f"the checkpoint holds the random streams of {len(per_rank)} ranks; this run has "
                               f"{self.trainer.world_size} (resume with the same trainer.devices x trainer.num_nodes)")
        rng = per_rank[self.global_rank]
        torch.set_rng_state(rng["torch_rng"])
        if rng["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda_rng"])
        random.setstate(_as_tuples(rng["python_rng"]))
        self.data_counts = Counter(state["data_counts"])
        self.nonfinite_total = state["nonfinite_total"]

    def sample_noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        size = self.decoder.latent_size(self.resolution)
        return torch.randn(n, self.decoder.latent_channels, size, size, generator=g).to(self.device)

    def redraw(self, texts: list[str], noise: torch.Tensor, num_steps: int, guidance_scale: float | None = None) -> torch.Tensor:
        """Caption text -> image from given noise, through the text bottleneck (pipeline.redraw), with classifier-free
        guidance against the stage's `negative_prompt`: `guidance_scale`, or the stage's `eval_guidance_scale`."""
        h = self.hparams
        scale = h.eval_guidance_scale if guidance_scale is None else guidance_scale
        return redraw(self.encoder, self.connector, self.decoder, texts, noise, num_steps, scale, h.negative_prompt)

    def image_noise(self, batch: dict, seed: int) -> torch.Tensor:
        """Held-out noise, one draw per image from `seed` + the image's index in the split: the same for an image
        whichever rank and batch it falls in."""
        return self.decoder.seeded_noise([seed + i for i in batch["index"]], self.resolution).to(self.device)

    # Held-out metrics: per-image values summed (padding weighs 0) on each rank, then over all ranks at the end of the
    # test; logged as sum / count, so N ranks report what one process reports. The per-image values are kept too
    # (`heldout_values`, gathered from every rank): a stage that reports before/after metrics states its gain with
    # the paired standard error over the images. The same evaluation runs a few times during training (Lightning's
    # validation loop, `trainer.val_check_interval`), logged under heldout/ on the training curves' step axis.
    def on_test_epoch_start(self) -> None:
        self._eval_sums: dict[str, list[float]] = {}
        self._eval_values: dict[str, dict[int, float]] = {}

    def on_validation_epoch_start(self) -> None:
        self._val_t0 = time.perf_counter()
        self.on_test_epoch_start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.test_step(batch, batch_idx)

    def eval_metric(self, name: str, values: torch.Tensor, batch: dict) -> None:
        w = batch["weight"].to(values.device, torch.float64)
        total = self._eval_sums.setdefault(name, [0.0, 0.0])
        total[0] += float((values.detach().double() * w).sum())
        total[1] += float(w.sum())
        per_image = self._eval_values.setdefault(name, {})
        for i, v, keep in zip(batch["index"], values.detach().double().tolist(), w.tolist()):
            if keep > 0:
                per_image[int(i)] = v

    def heldout_settings(self) -> dict | None:
        """What this stage's held-out test computes, besides the weights, the held-out data and the reward: stages with
        equal settings measure the same numbers, so a stage's starting point is the previous stage's final test of the
        same weights (runner.run_stage). None: a test no other stage shares."""
        h = self.hparams
        return {"metrics": "captioning", "eval_steps": h.eval_steps, "eval_seed": h.eval_seed,
                "eval_guidance_scale": h.eval_guidance_scale, "negative_prompt": h.negative_prompt,
                "max_new_tokens": self.eval_max_new_tokens()}

    def eval_max_new_tokens(self) -> int:
        """The greedy caption budget of the held-out test: the stage's `eval_max_new_tokens`, if it has one apart from
        its training budget (G4U samples with `max_new_tokens`), else `max_new_tokens`."""
        h = self.hparams
        return h.get("eval_max_new_tokens") or h.max_new_tokens

    def _reduce_eval(self) -> dict[str, float]:
        names = set(self._eval_sums)
        values = self._eval_values
        if self.trainer.world_size > 1:
            every = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(every, values)
            values = {}
            for part in every:
                for name, per_image in part.items():
                    values.setdefault(name, {}).update(per_image)
            names = set(values) | names
        names = sorted(names)
        totals = torch.tensor([self._eval_sums.get(k, [0.0, 0.0]) for k in names], dtype=torch.float64,
                              device=self.device).reshape(-1, 2)
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(totals)
        self.heldout_values = {k: dict(sorted(v.items())) for k, v in values.items()}
        return {name: total / count for name, (total, count) in zip(names, totals.tolist()) if count > 0}

    def on_test_epoch_end(self) -> None:
        for name, value in self._reduce_eval().items():
            self.log(name, value, sync_dist=True)  # equal on every rank: quiets Lightning's advice
            self.log(f"heldout/{name}", value, sync_dist=True)  # the curve the in-training evaluations continue

    def on_validation_epoch_end(self) -> None:
        for name, value in self._reduce_eval().items():
            self.log(f"heldout/{name}", value, sync_dist=True)
        self.timings["evaluations in training"] = (self.timings.get("evaluations in training", 0.0)
                                                   + time.perf_counter() - self._val_t0)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out metrics of the whole auto-encoder (stages with other metrics override this)."""
        if not self.count_data(batch):
            return
        h = self.hparams
        for k, v in self.captioning_metrics(batch, h.eval_steps, h.eval_seed, self.eval_max_new_tokens()).items():
            self.eval_metric(k, v, batch)

    def heldout_captions(self, images: torch.Tensor, indices: list[int], max_new_tokens: int) -> tuple[list[str], torch.Tensor]:
        """Greedy captions of held-out images (`indices`: their places in the split) and their lengths in tokens."""
        caps = self.encoder.caption(images, do_sample=False, max_new_tokens=max_new_tokens)
        return caps.texts, caps.completion_mask.sum(1).float()

    @torch.no_grad()
    def captioning_metrics(self, batch: dict, num_steps: int, seed: int, max_new_tokens: int) -> dict[str, torch.Tensor]:
        """The auto-encoder on held-out images: greedy caption -> redraw (fixed noise) -> reward; plus caption
        length and, for toy images, informativeness against the scene's ground truth."""
        images = batch["images"]
        texts, lengths = self.heldout_captions(images, [int(i) for i in batch["index"]], max_new_tokens)
        recon = self.redraw(texts, self.image_noise(batch, seed), num_steps)
        out = {"reward": self.reward.score(recon, images), "caption_length": lengths}
        if batch["scene"][0]:
            out["informativeness"] = torch.tensor(
                [toy.informativeness(t, toy.Scene.from_dict(json.loads(s))) for t, s in zip(texts, batch["scene"])],
                device=images.device)
        return out
