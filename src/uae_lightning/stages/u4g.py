"""Stage 2c — Understanding for Generation (U4G): the decoder is the policy, trained with Flow-GRPO
(PAPER.md "Stage 2c").

Per rollout batch: the frozen encoder captions each image -> G SDE trajectories of T steps per caption (each step a
Gaussian policy; every latent and log-prob stored; with sde_steps=trained only the trained steps are SDE steps and
the others follow the ODE) -> rewards against the source image -> group advantages clipped to
+-adv_clip -> for each trained step: the clipped ratio objective + beta * KL to the reference (the DiT with its LoRA
disabled), backward per step (never one graph over all steps), gradients accumulated over steps x samples, then one
optimizer update per inner iteration. With `reuse_rollout_forward` the first inner iteration takes the policy's
velocities at the trained steps from the rollout itself (their graphs kept), instead of a second forward pass.
"""
from __future__ import annotations

import torch

from uae_lightning.models.decoder import euler_step
from uae_lightning.models.lora import set_adapters_enabled
from uae_lightning.choices import CONVENTIONS
from uae_lightning.rl.flow_grpo import cps_step, nonzero_advantage, sde_step, step_kl
from uae_lightning.rl.grpo import clipped_surrogate, group_advantages
from uae_lightning.stages.base import UAEStage

SDE_TYPES = ("sde", "cps")
# Where a rollout explores: "all" steps are SDE steps (Flow-GRPO); "trained": only the trained steps are, the others
# follow the deterministic ODE (Flow-GRPO-Fast, MixGRPO), so a trajectory's reward varies only through the noise of
# the steps that are trained on.
SDE_STEPS = ("all", "trained")


def rows(negative: tuple[torch.Tensor, torch.Tensor] | None, sl: slice):
    """The negative prompt's conditioning (or None, without CFG) for the trajectories `sl`."""
    return None if negative is None else (negative[0][sl], negative[1][sl])


class U4G(UAEStage):
    def __init__(
        self,
        model: dict,
        resolution: int,
        init_from: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        group_size: int = 24,
        num_steps: int = 10,
        noise_level: float = 0.7,
        sde_type: str = "sde",
        convention: str = "flow_grpo",
        advantage_scale: str = "batch",
        shared_initial_noise: bool = False,
        clip_range: float = 1e-4,
        adv_clip: float = 5.0,
        kl_beta: float = 0.04,
        train_fraction: float = 0.99,
        train_window: tuple[int, int] | None = None,
        sde_steps: str = "all",
        num_iterations: int = 1,
        reuse_rollout_forward: bool = False,
        guidance_scale: float = 4.5,
        negative_prompt: str = "",
        caption_do_sample: bool = False,
        caption_temperature: float = 0.7,
        max_new_tokens: int = 512,
        micro_batch_size: int = 16,
        max_grad_norm: float = 1.0,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        max_nonfinite_in_a_row: int = 5,
        eval_steps: int = 10,
        eval_guidance_scale: float = 1.0,
        eval_seed: int = 1234,
    ):
        super().__init__(model, resolution, init_from)
        if sde_type not in SDE_TYPES:
            raise ValueError(f"stages.u4g.module.sde_type={sde_type!r}; expected one of {SDE_TYPES}")
        if sde_steps not in SDE_STEPS:
            raise ValueError(f"stages.u4g.module.sde_steps={sde_steps!r}; expected one of {SDE_STEPS}")
        if convention not in CONVENTIONS:
            raise ValueError(f"stages.u4g.module.convention={convention!r}; expected one of {CONVENTIONS}")
        self.save_hyperparameters(ignore=["init_from"])
        self.automatic_optimization = False
        self.report_before = True
        self.per_rank_rng = True  # SDE noise differs between ranks
        self.first_update_ratio: torch.Tensor | None = None  # max |ratio - 1| at the first inner update (a check)
        self._captions: dict[tuple[int, int], tuple[str, float]] = {}  # (held-out index, budget) -> (caption, length)

    def configure_trainable(self) -> None:
        if not self.hparams.lora:
            raise ValueError("stages.u4g.module.lora is required: the reference policy is the DiT with its LoRA disabled")
        self.train_decoder(self.hparams.lora, gradient_checkpointing=self.hparams.gradient_checkpointing)
        self.connector.requires_grad_(False)  # only the DiT's adapter is the policy

    def trained_steps(self) -> list[int]:
        """Which denoising steps are trained: a window [start, stop) or the first `train_fraction` of them."""
        h = self.hparams
        if h.train_window:
            start, stop = h.train_window
            return list(range(max(0, start), min(h.num_steps, stop)))
        return list(range(max(1, int(h.num_steps * h.train_fraction))))

    def step(self, x, v, sigma, sigma_next, prev_sample=None):
        fn = sde_step if self.hparams.sde_type == "sde" else cps_step
        return fn(x, v, sigma, sigma_next, self.hparams.noise_level, prev_sample=prev_sample,
                  convention=self.hparams.convention)

    def velocity(self, x, sigma, cond, mask, negative, shared: bool = False):
        """The (guided) velocity. `shared`: the rows come in groups of G that are the same trajectory so far (the first
        step with `shared_initial_noise`: one initial latent and one caption per group), so it is computed once per
        group and repeated; in an update, backward then sums each group's gradients into that one forward."""
        G = self.hparams.group_size
        if shared and G > 1 and len(x) % G == 0:
            one = slice(None, None, G)
            v = self.decoder.guided_velocity(x[one], sigma[one], cond[one], mask[one], self.hparams.guidance_scale,
                                             rows(negative, one))
            return v.repeat_interleave(G, 0)
        return self.decoder.guided_velocity(x, sigma, cond, mask, self.hparams.guidance_scale, negative)

    def shared_step(self, i: int, start: int = 0) -> bool:
        """Whether denoising step i of the rows from `start` on is one trajectory per group (`velocity`'s `shared`):
        the first step with `shared_initial_noise`, in a slice that begins at a group's first row."""
        return self.hparams.shared_initial_noise and i == 0 and start % self.hparams.group_size == 0

    def micro_batches(self, n: int) -> list[slice]:
        """The update's slices of a rollout batch's n trajectories."""
        return [slice(lo, min(lo + self.hparams.micro_batch_size, n)) for lo in range(0, n, self.hparams.micro_batch_size)]

    def heldout_captions(self, images: torch.Tensor, indices: list[int], max_new_tokens: int) -> tuple[list[str], torch.Tensor]:
        """U4G never changes the captioner, so a held-out image's greedy caption is the same at every evaluation: it is
        generated at the first one (the starting point) and reused by the evaluations during training and the final
        test. Captioning can be a collective (an FSDP-sharded encoder), so a batch is reused only where every rank has
        all its captions."""
        keys = [(i, max_new_tokens) for i in indices]
        if self.trainer.strategy.reduce_boolean_decision(all(k in self._captions for k in keys), all=True):
            texts = [self._captions[k][0] for k in keys]
            return texts, torch.tensor([self._captions[k][1] for k in keys], device=images.device)
        texts, lengths = super().heldout_captions(images, indices, max_new_tokens)
        self._captions.update(zip(keys, zip(texts, lengths.tolist())))
        return texts, lengths

    # ---- rollout ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict, keep_graphs: bool = False) -> dict:
        """G trajectories per image, their log-probs and rewards. `keep_graphs`: the policy's velocity at each trained
        step keeps its autograd graph (returned as `velocities`), for an update whose policy has not changed since."""
        h, G = self.hparams, self.hparams.group_size
        images = batch["images"]
        caps = self.encoder.caption(images, do_sample=h.caption_do_sample, temperature=h.caption_temperature,
                                    max_new_tokens=h.max_new_tokens)
        texts = [t for t in caps.texts for _ in range(G)]
        # Each caption (and the negative prompt) is encoded once; its G trajectories share the conditioning.
        with self.encoder.adapter_disabled():
            hidden, mask = self.encoder.condition(caps.texts)
            negative = None
            if h.guidance_scale != 1.0:
                nh, nm = self.encoder.condition([h.negative_prompt])
                negative = (self.connector(nh).expand(len(texts), -1, -1), nm.expand(len(texts), -1))
        cond = self.connector(hidden).repeat_interleave(G, 0)
        mask = mask.repeat_interleave(G, 0)
        size = self.decoder.latent_size(self.resolution)
        n = len(texts)
        if h.shared_initial_noise:
            x = torch.randn(len(images), self.decoder.latent_channels, size, size, device=self.device).repeat_interleave(G, 0)
        else:
            x = torch.randn(n, self.decoder.latent_channels, size, size, device=self.device)
        sigmas = self.decoder.sigmas(h.num_steps, self.device)
        explored = set(self.trained_steps()) if h.sde_steps == "trained" else set(range(h.num_steps))
        graphed = set(self.trained_steps()) if keep_graphs else set()
        slices = self.micro_batches(n)
        latents, logps, velocities = [x], [], {}
        for i in range(h.num_steps):
            s = sigmas[i].expand(n)
            if i in graphed:  # as the update will slice it: per micro-batch, each slice its own graph
                with torch.enable_grad():
                    for sl in slices:
                        velocities[i, sl.start] = self.velocity(x[sl], s[sl], cond[sl], mask[sl], rows(negative, sl),
                                                                self.shared_step(i, sl.start))
                v = torch.cat([velocities[i, sl.start].detach() for sl in slices])
            else:
                v = self.velocity(x, s, cond, mask, negative, self.shared_step(i))
            if i in explored:
                x, logp, _, _ = self.step(x, v, s, sigmas[i + 1].expand(n))
            else:  # the ODE's Euler step; never trained on, so no log-prob
                x, logp = euler_step(x.float(), v.float(), sigmas[i], sigmas[i + 1]), torch.zeros(n, device=self.device)
            latents.append(x)
            logps.append(logp)
        recon = self.decoder.decode(x)
        rewards = self.reward.score(recon, images.repeat_interleave(G, 0))
        return {"texts": texts, "cond": cond, "mask": mask, "negative": negative, "sigmas": sigmas,
                "latents": torch.stack(latents, 1), "logps": torch.stack(logps, 1), "rewards": rewards, "recon": recon,
                "captions": caps.texts, "velocities": velocities}

    # ---- update ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        if not self.count_data(batch):
            return
        h = self.hparams
        with self.timed("rollouts"):
            ro = self.rollout(batch, keep_graphs=h.reuse_rollout_forward)
        if not self.finite_or_skip(ro["rewards"], "reward", h.max_nonfinite_in_a_row):
            return
        # Flow-GRPO: population std per group, or of the whole batch over all ranks (`global_std`); clipped; samples
        # with advantage exactly 0 (a group whose rewards were all equal) are left out of the update.
        everything = self.all_gather(ro["rewards"]).flatten() if self.trainer.world_size > 1 else None
        adv = group_advantages(ro["rewards"], h.group_size, h.advantage_scale, unbiased=False,
                               batch_rewards=everything).clamp(-h.adv_clip, h.adv_clip)
        # Masked rather than removed, so that every rank runs the same forward/backward passes (FSDP's collectives).
        keep = nonzero_advantage(adv).float()
        n_keep = keep.sum().clamp_min(1)
        self.log("advantage/dropped_fraction", 1 - keep.mean())
        steps = self.trained_steps()
        n = len(adv)
        opt, sched = self.optimizers(), self.lr_schedulers()
        transformer = self.decoder.transformer
        per_step = {j: {"logp": [], "ratio": [], "clip": [], "kl": []} for j in steps}
        for it in range(h.num_iterations):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for j in steps:
                sig, sig_next = ro["sigmas"][j], ro["sigmas"][j + 1]
                for sl in self.micro_batches(n):
                    x, x_next = ro["latents"][sl, j], ro["latents"][sl, j + 1]
                    neg = rows(ro["negative"], sl)
                    s = sig.expand(len(x))
                    shared = self.shared_step(j, sl.start)
                    if it == 0 and (j, sl.start) in ro["velocities"]:  # the policy that sampled: the rollout's pass
                        v = ro["velocities"].pop((j, sl.start))
                    else:
                        v = self.velocity(x, s, ro["cond"][sl], ro["mask"][sl], neg, shared)
                    _, logp, mu, kl_std = self.step(x, v, s, sig_next.expand(len(x)), prev_sample=x_next)
                    loss_s, ratio, clipped = clipped_surrogate(logp, ro["logps"][sl, j], adv[sl], h.clip_range, h.clip_range)
                    loss = loss_s
                    if h.kl_beta > 0:
                        with torch.no_grad():
                            set_adapters_enabled(transformer, False)
                            v_ref = self.velocity(x, s, ro["cond"][sl], ro["mask"][sl], neg, shared)
                            set_adapters_enabled(transformer, True)
                            mu_ref = self.step(x, v_ref, s, sig_next.expand(len(x)), prev_sample=x_next).mean
                        kl = step_kl(mu, mu_ref, kl_std)
                        loss = loss + h.kl_beta * kl
                        per_step[j]["kl"].append(kl.mean().item())
                    loss = (loss * keep[sl]).sum() / (n_keep * len(steps))  # mean over kept samples and trained steps
                    if not self.finite_or_skip(loss.detach(), "loss", h.max_nonfinite_in_a_row):
                        opt.zero_grad(set_to_none=True)
                        return
                    self.manual_backward(loss)  # per step and micro-batch: the graph never spans several steps
                    total += loss.item()
                    per_step[j]["logp"].append(logp.mean().item())
                    per_step[j]["ratio"].append(ratio.mean().item())
                    per_step[j]["clip"].append(clipped.float().mean().item())
                    if it == 0:
                        dev = (ratio - 1).abs().max().detach()
                        self.first_update_ratio = dev if self.first_update_ratio is None else torch.maximum(self.first_update_ratio, dev)
            self.clip_gradients(opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            self.log("train/loss", total)
        sched.step()
        self.reward.log_stats(self, ro["rewards"], "reward")
        logs = {"advantage/abs_mean": adv.abs().mean()}
        for j, d in per_step.items():
            for k, vals in d.items():
                if vals:
                    logs[f"timestep_{j:02d}/{k}"] = sum(vals) / len(vals)
        self.log_dict(logs)
        self.log("reward", ro["rewards"].mean(), prog_bar=True, logger=False)

    def preview(self, batch: dict) -> dict:
        """Original | the G SDE reconstructions of its caption (one group per row)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.eval_seed)
            ro = self.rollout(batch)
        G = self.hparams.group_size
        return {"captions": ro["captions"], "reconstructions": ro["recon"].view(len(batch["images"]), G, *ro["recon"].shape[1:])}
