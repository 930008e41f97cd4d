"""Stage 2b — Generation for Understanding (G4U): the captioner is the policy (PAPER.md "Stage 2b").

Per rollout batch: G captions per image sampled from pi_theta (KV cache) -> each redrawn by the frozen decoder with
the same initial noise within a group -> rewards r_i = reward callbacks (cosine to the original) -> group advantages
-> `num_iterations` updates of the token-level clipped surrogate + beta * k3 KL to the reference (the same encoder
with its LoRA disabled), against the rollout's stored log-probs.
"""
from __future__ import annotations

import json

import torch

from uae_lightning.data import toy
from uae_lightning.rl.grpo import aggregate, clipped_surrogate, dapo_num_tokens, group_advantages, kl_k3
from uae_lightning.stages.base import UAEStage


class G4U(UAEStage):
    def __init__(
        self,
        model: dict,
        resolution: int,
        init_from: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        group_size: int = 8,
        num_iterations: int = 1,
        clip_range_low: float = 0.2,
        clip_range_high: float = 0.28,
        kl_beta: float = 0.0,
        temperature: float = 0.7,
        max_new_tokens: int = 512,
        eval_max_new_tokens: int | None = None,
        loss_aggregation: str = "grpo",
        advantage_scale: str = "group",
        micro_batch_size: int = 64,
        max_grad_norm: float = 1.0,
        decode_steps: int = 10,
        lora: dict | None = None,
        max_nonfinite_in_a_row: int = 5,
        eval_steps: int = 10,
        guidance_scale: float = 1.0,
        eval_guidance_scale: float = 1.0,
        negative_prompt: str = "",
        eval_seed: int = 1234,
    ):
        super().__init__(model, resolution, init_from)
        self.report_before = True  # summary.json gets <metric>_before and <metric>_after
        self.save_hyperparameters(ignore=["init_from"])
        self.automatic_optimization = False  # several updates per rollout batch
        self.per_rank_rng = True  # caption samples and redraw noise differ between ranks
        self.first_update_ratio: torch.Tensor | None = None  # max |ratio - 1| on the first inner update (a check)

    def configure_trainable(self) -> None:
        self.add_encoder_lora(self.hparams.lora)

    # ---- rollout ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        h, G = self.hparams, self.hparams.group_size
        images = batch["images"].repeat_interleave(G, 0)
        caps = self.encoder.caption(images, do_sample=True, temperature=h.temperature, max_new_tokens=h.max_new_tokens)
        # One initial noise per group: within a group only the caption differs.
        noise = torch.randn(len(batch["images"]), self.decoder.latent_channels,
                            *([self.decoder.latent_size(self.resolution)] * 2), device=self.device)
        recon, distinct = self.redraw_distinct(caps.texts, noise, G, h.decode_steps, h.guidance_scale)
        rewards = self.reward.score(recon, images)
        # The sampling policy's log-probs are needed only when the rollout is reused for more than one update: with
        # num_iterations == 1 the update is on-policy and its own (detached) log-probs are the old ones (TRL does the
        # same), which saves one forward pass of the policy over the whole rollout.
        old, ref = [], []
        for s in self.micro_batches(len(images)):
            part = self.slice_captions(caps, s)
            if h.num_iterations > 1:
                old.append(self.encoder.completion_logprobs(part, h.temperature))
            if h.kl_beta > 0:
                with self.encoder.adapter_disabled():
                    ref.append(self.encoder.completion_logprobs(part, h.temperature))
        return {"captions": caps, "rewards": rewards, "old_logp": torch.cat(old) if old else None,
                "ref_logp": torch.cat(ref) if ref else None, "recon": recon, "distinct": distinct}

    def redraw_distinct(self, texts: list[str], noise: torch.Tensor, group_size: int, num_steps: int,
                        guidance_scale: float) -> tuple[torch.Tensor, int]:
        """Redraw the captions of groups of `group_size` (group k starts from `noise[k]`), each distinct caption of a
        group once: within a group equal captions from the same noise give the same image, and sampled groups repeat
        captions often (short captions especially). Returns one image per caption and the number drawn."""
        first: dict[tuple[int, str], int] = {}
        which = [first.setdefault((i // group_size, t), len(first)) for i, t in enumerate(texts)]
        keys = list(first)
        drawn = self.redraw([t for _, t in keys], noise[[g for g, _ in keys]], num_steps, guidance_scale)
        return drawn[torch.tensor(which, device=drawn.device)], len(keys)

    def micro_batches(self, n: int) -> list[slice]:
        m = self.hparams.micro_batch_size
        return [slice(i, min(i + m, n)) for i in range(0, n, m)]

    @staticmethod
    def slice_captions(caps, s: slice):
        from dataclasses import replace

        # Each sequence has its own image (images were repeated per sample), so pixel rows slice by image.
        inputs = dict(caps.prompt_inputs)
        grid = inputs["image_grid_thw"]
        rows = grid.prod(1)
        start, stop = int(rows[: s.start].sum()), int(rows[: s.stop].sum())
        inputs = {k: (v[start:stop] if k == "pixel_values" else v[s]) for k, v in inputs.items()}
        return replace(caps, sequences=caps.sequences[s], completion_mask=caps.completion_mask[s], prompt_inputs=inputs,
                       texts=caps.texts[s])

    # ---- update ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        if not self.count_data(batch):
            return
        h = self.hparams
        with self.timed("rollouts"):
            ro = self.rollout(batch)
        rewards, caps = ro["rewards"], ro["captions"]
        if not self.finite_or_skip(rewards, "reward", h.max_nonfinite_in_a_row):
            return
        adv = group_advantages(rewards, h.group_size, h.advantage_scale)
        mask = caps.completion_mask
        n_tokens = dapo_num_tokens(mask) if h.loss_aggregation == "dapo" else None  # all ranks' tokens (a collective)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        stats: dict[str, list] = {"loss": [], "kl": [], "clip_fraction": [], "ratio_mean": [], "ratio_max": [], "ratio_min": []}
        for it in range(h.num_iterations):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for s in self.micro_batches(len(rewards)):
                m = mask[s]
                logp = self.encoder.completion_logprobs(self.slice_captions(caps, s), h.temperature)
                old = ro["old_logp"][s] if ro["old_logp"] is not None else logp.detach()
                per_tok, ratio, clipped = clipped_surrogate(logp, old, adv[s], h.clip_range_low, h.clip_range_high)
                kl = kl_k3(logp, ro["ref_logp"][s]) if ro["ref_logp"] is not None else torch.zeros_like(logp)
                if h.kl_beta > 0:
                    per_tok = per_tok + h.kl_beta * kl
                # Each micro-batch's share of the whole-batch loss, so accumulation equals one big batch.
                share = (s.stop - s.start) / len(rewards)
                loss = aggregate(per_tok, m, h.loss_aggregation, max_length=h.max_new_tokens, num_tokens=n_tokens)
                loss = loss if h.loss_aggregation == "dapo" else loss * share
                if not self.finite_or_skip(loss.detach(), "loss", h.max_nonfinite_in_a_row):
                    opt.zero_grad(set_to_none=True)
                    return
                self.manual_backward(loss)
                total += loss.item()
                mb = m.bool()
                stats["kl"].append(kl[mb].mean().item() if mb.any() else 0.0)
                stats["clip_fraction"].append(clipped[mb].float().mean().item() if mb.any() else 0.0)
                stats["ratio_mean"].append(ratio[mb].mean().item())
                stats["ratio_max"].append(ratio[mb].max().item())
                stats["ratio_min"].append(ratio[mb].min().item())
                if it == 0:
                    dev = (ratio[mb] - 1).abs().max().detach()
                    self.first_update_ratio = dev if self.first_update_ratio is None else torch.maximum(self.first_update_ratio, dev)
            self.clip_gradients(opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            stats["loss"].append(total)
        sched.step()
        self.log_rollout(batch, ro, adv, stats)

    def log_rollout(self, batch: dict, ro: dict, adv: torch.Tensor, stats: dict) -> None:
        caps = ro["captions"]
        self.reward.log_stats(self, ro["rewards"], "reward")
        lengths = caps.completion_mask.sum(1).float()
        logs = {f"train/{k}": sum(v) / len(v) for k, v in stats.items() if k not in ("ratio_max", "ratio_min")}
        logs.update({"train/ratio_max": max(stats["ratio_max"]), "train/ratio_min": min(stats["ratio_min"]),
                     "advantage/mean": adv.mean(), "advantage/std": adv.std(), "advantage/abs_max": adv.abs().max(),
                     "caption/length_mean": lengths.mean(), "caption/length_max": lengths.max(),
                     "rollout/distinct_fraction": ro["distinct"] / len(caps.texts)})
        if batch["scene"][0]:
            scenes = [s for s in batch["scene"] for _ in range(self.hparams.group_size)]
            logs["caption/informativeness"] = sum(
                toy.informativeness(t, toy.Scene.from_dict(json.loads(s))) for t, s in zip(caps.texts, scenes)) / len(scenes)
        self.log_dict(logs, prog_bar=False)
        self.log("reward", ro["rewards"].mean(), prog_bar=True, logger=False)

    def preview(self, batch: dict) -> dict:
        """One group per image: original | the G reconstructions, captions listed per image."""
        h = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(h.eval_seed)
            ro = self.rollout(batch)
        G = h.group_size
        texts = [" | ".join(ro["captions"].texts[i * G : (i + 1) * G]) for i in range(len(batch["images"]))]
        return {"captions": texts, "reconstructions": ro["recon"].view(len(batch["images"]), G, *ro["recon"].shape[1:])}
