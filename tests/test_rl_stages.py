"""Cold start and G4U mechanics on tiny runs from random initialisation (seconds each)."""
import math

import pytest
import torch

from conftest import FAST, compose_cfg
from uae_lightning.runner import run_pipeline
from uae_lightning.rewards.callback import RewardCallback
from uae_lightning.stages.base import NonFiniteError
from uae_lightning.stages.g4u import G4U

G4U_FAST = [*FAST, "run=[g4u]", "stages.g4u.data.batch_size=3", "stages.g4u.module.group_size=2",
            "stages.g4u.module.micro_batch_size=4", "stages.g4u.module.max_new_tokens=8", "stages.g4u.module.decode_steps=2",
            "stages.g4u.module.eval_steps=2"]


def record_first_update_ratio(monkeypatch, stage_cls) -> list[float]:
    """Max |ratio - 1| over the first inner update of every rollout batch of `stage_cls`, as training runs."""
    seen = []
    original = stage_cls.training_step

    def spy(self, batch, batch_idx):
        self.first_update_ratio = None
        original(self, batch, batch_idx)
        seen.append(float(self.first_update_ratio))

    monkeypatch.setattr(stage_cls, "training_step", spy)
    return seen


def test_g4u_first_inner_update_is_on_policy_and_summary_reports_before_and_after(tmp_path, monkeypatch):
    seen = record_first_update_ratio(monkeypatch, G4U)
    # max_steps counts optimizer updates: 2 rollout batches x 2 inner iterations.
    cfg = compose_cfg([*G4U_FAST, "stages.g4u.trainer.max_steps=4", "stages.g4u.module.num_iterations=2",
                       "stages.g4u.module.kl_beta=0.04"])
    summary = run_pipeline(cfg, tmp_path)["stages"]["g4u"]
    assert len(seen) == 2 and max(seen) < 1e-5  # every token of every rollout batch, micro-batched (2 slices of <= 4)
    assert {f"{k}_{when}" for k in ("reward", "informativeness", "caption_length")
            for when in ("before", "after", "gain_se")} == set(summary)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "g4u" / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"reward/mean", "reward/std", "reward/min", "reward/max", "advantage/mean", "advantage/std", "train/kl",
            "train/clip_fraction", "train/ratio_mean", "caption/length_mean", "caption/informativeness"} <= tags
    assert ea.Scalars("train/kl")[-1].value >= 0
    assert "preview/original|reconstructions" in ea.Tags()["images"]


def test_g4u_keeps_its_adapter_apart_so_the_decoder_input_is_unchanged(tmp_path):
    """After G4U the weights carry the captioner adapter separately; conditioning (adapter disabled) is the same
    function as before G4U, captioning (adapter enabled) is not."""
    run_pipeline(compose_cfg([*G4U_FAST, "stages.g4u.trainer.max_steps=2", "stages.g4u.module.lr=0.05"]), tmp_path)
    from uae_lightning.stages.g4u import G4U as Stage

    cfg = compose_cfg(G4U_FAST)
    from omegaconf import OmegaConf

    kw = {k: v for k, v in OmegaConf.to_container(cfg.stages.g4u.module).items() if k != "_target_"}
    trained = Stage(model=OmegaConf.to_container(cfg.model), resolution=32, init_from=str(tmp_path / "g4u" / "weights.safetensors"), **kw)
    trained.configure_model()
    fresh = Stage(model=OmegaConf.to_container(cfg.model), resolution=32, **kw)
    fresh.configure_model()
    assert trained.encoder_lora is not None
    texts = ["a red circle at the top-left", "a square"]
    with torch.no_grad(), trained.encoder.adapter_disabled(), fresh.encoder.adapter_disabled():
        assert torch.allclose(trained.encoder.condition(texts)[0], fresh.encoder.condition(texts)[0], atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(trained.encoder.condition(texts)[0], fresh.encoder.condition(texts)[0], atol=1e-4)


def test_non_finite_rewards_are_skipped_counted_and_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = RewardCallback.score

    def nan_after_first(self, images, references):
        calls["n"] += 1
        r = original(self, images, references)
        return r if calls["n"] <= 1 else torch.full_like(r, float("nan"))

    monkeypatch.setattr(RewardCallback, "score", nan_after_first)
    cfg = compose_cfg([*G4U_FAST, "stages.g4u.trainer.max_steps=10", "stages.g4u.module.max_nonfinite_in_a_row=3"])
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite reward"):
        run_pipeline(cfg, tmp_path)
    ckpt = torch.load(tmp_path / "g4u" / "checkpoints" / "nonfinite.ckpt", map_location="cpu", weights_only=False)
    # The held-out "before" measurement used the one finite score(); the next 3 rollouts were all NaN.
    assert ckpt["global_step"] == 0  # no update was applied from a NaN reward
    assert not (tmp_path / "g4u" / "done.json").exists()


def test_cold_start_trains_through_the_last_sampler_steps_only(tmp_path):
    cfg = compose_cfg([*FAST, "run=[cold_start]", "stages.cold_start.trainer.max_steps=2", "stages.cold_start.module.num_steps=4",
                       "stages.cold_start.module.grad_last_steps=1", "stages.cold_start.module.checkpoint_steps=true",
                       "stages.cold_start.module.eval_steps=2", "stages.cold_start.module.max_new_tokens=8",
                       "stages.cold_start.module.lr=1e-2"])
    summary = run_pipeline(cfg, tmp_path)["stages"]["cold_start"]
    assert summary["reward_before"] != summary["reward_after"]  # the decoder moved
    assert summary["caption_length_before"] == summary["caption_length_after"]  # the captioner did not


def test_g4u_config_mistakes_fail_naming_the_key():
    from uae_lightning.config import validate
    from uae_lightning.errors import ConfigError

    for override, key in [("stages.g4u.module.group_size=1", "group_size"), ("stages.g4u.module.clip_range_low=0", "clip_range_low"),
                          ("stages.g4u.module.loss_aggregation=mean", "loss_aggregation"),
                          ("stages.g4u.module.kl_beta=-1", "kl_beta"),
                          ("stages.cold_start.module.grad_last_steps=20", "grad_last_steps"),
                          ("+reward.backbones.not-a-model=1", "reward.backbones")]:
        with pytest.raises(ConfigError, match=key):
            validate(compose_cfg([override]))


U4G_FAST = [*FAST, "run=[u4g]", "stages.u4g.data.batch_size=2", "stages.u4g.module.group_size=3",
            "stages.u4g.module.micro_batch_size=4", "stages.u4g.module.max_new_tokens=8", "stages.u4g.module.num_steps=4",
            "stages.u4g.module.eval_steps=2"]


def test_u4g_first_inner_update_is_on_policy_at_every_trained_step(tmp_path, monkeypatch):
    from uae_lightning.stages.u4g import U4G

    seen = record_first_update_ratio(monkeypatch, U4G)
    # The update computes its own forward here (with the rollout's, the ratio is 1 by construction: tested below).
    cfg = compose_cfg([*U4G_FAST, "stages.u4g.trainer.max_steps=2", "stages.u4g.module.kl_beta=0.04",
                       "stages.u4g.module.train_window=null", "stages.u4g.module.reuse_rollout_forward=false"])
    summary = run_pipeline(cfg, tmp_path)["stages"]["u4g"]
    assert len(seen) == 2 and max(seen) < 1e-5
    assert {"reward_before", "reward_after", "reward_gain_se"} <= set(summary)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "u4g" / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    # int(4 * 0.99) = 3 trained steps, each with its own log-prob, ratio, clip fraction and KL.
    assert {f"timestep_{j:02d}/{k}" for j in range(3) for k in ("logp", "ratio", "clip", "kl")} <= tags
    assert "timestep_03/ratio" not in tags


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_u4g_first_update_reuses_the_rollout_forward_and_trains_the_same(tmp_path, monkeypatch, num_iterations):
    """reuse_rollout_forward (the toy's default): the rollout keeps the policy's graph at the trained steps, in the
    update's micro-batches, and the first inner update backpropagates through it instead of a second forward pass;
    later inner updates (the policy has moved) compute their own. 2 images x 3 trajectories, 4 steps all trained,
    micro-batches of 4 + 2 rows, KL on: per rollout batch, with grad, 4 steps x 2 slices = 8 DiT passes either way;
    the reference's 8 passes without grad; the rollout's own 4 passes only when it keeps no graph. The adapter the
    two runs train agrees. Handing the first update a detached velocity (no gradient from the ratio term), another
    slice's velocity, or the first iteration's graph to the second fails here."""
    from safetensors.torch import load_file

    from uae_lightning.models.decoder import Decoder
    from uae_lightning.stages.u4g import U4G

    calls = []
    guided = Decoder.guided_velocity
    monkeypatch.setattr(Decoder, "guided_velocity",
                        lambda self, x, *a, **k: calls.append((len(x), torch.is_grad_enabled())) or guided(self, x, *a, **k))
    per_step, trained = {}, {}
    original = U4G.training_step
    for reuse in (True, False):
        def step(self, batch, batch_idx, reuse=reuse):
            calls.clear()
            original(self, batch, batch_idx)
            per_step.setdefault(reuse, []).append(list(calls))

        monkeypatch.setattr(U4G, "training_step", step)
        cfg = compose_cfg([*U4G_FAST, "stages.u4g.trainer.max_steps=2", "stages.u4g.module.kl_beta=0.04",
                           f"stages.u4g.module.num_iterations={num_iterations}",
                           f"stages.u4g.module.reuse_rollout_forward={reuse}"])
        run_pipeline(cfg, tmp_path / str(reuse))
        trained[reuse] = load_file(tmp_path / str(reuse) / "u4g" / "weights.safetensors")
    graph = [(4, True), (2, True)]  # one trained step's policy passes, per micro-batch
    reference = [(4, False), (2, False)]
    later = (graph + reference) * 4 * (num_iterations - 1)  # later inner iterations: policy, then reference, per slice
    reused = graph * 4 + reference * 4 + later
    recomputed = [(2, False), (6, False), (6, False), (6, False)] + [(4, True), (4, False), (2, True), (2, False)] * 4 + later
    batches = 2 // num_iterations  # max_steps counts optimizer updates: rollout batches x num_iterations
    assert [sorted(c) for c in per_step[True]] == [sorted(reused)] * batches
    assert [sorted(c) for c in per_step[False]] == [sorted(recomputed)] * batches
    assert trained[True].keys() == trained[False].keys()
    for k, w in trained[True].items():
        assert torch.allclose(w, trained[False][k], rtol=1e-4, atol=1e-6), k
    assert max(w.abs().max() for k, w in trained[True].items() if "lora_B" in k) > 0  # the adapter did train


def test_u4g_trained_steps_fraction_and_window():
    from uae_lightning.stages.u4g import U4G

    cfg = compose_cfg()
    from omegaconf import OmegaConf

    kw = {k: v for k, v in OmegaConf.to_container(cfg.stages.u4g.module).items() if k != "_target_"}
    make = lambda **o: U4G(model=OmegaConf.to_container(cfg.model), resolution=32, **{**kw, **o})  # noqa: E731
    assert make(num_steps=10, train_fraction=0.99, train_window=None).trained_steps() == list(range(9))
    assert make(num_steps=10, train_fraction=0.5, train_window=None).trained_steps() == list(range(5))
    assert make(num_steps=10, train_window=(2, 5)).trained_steps() == [2, 3, 4]
    assert make(num_steps=3, train_window=(0, 4)).trained_steps() == [0, 1, 2]  # stop capped at num_steps


def _u4g_rollout(monkeypatch, overrides: list[str]):
    """A toy U4G stage (2 images x 3 trajectories, 4 steps) and one rollout of it."""
    from omegaconf import OmegaConf

    from uae_lightning.stages.u4g import U4G

    cfg = compose_cfg([*U4G_FAST, *overrides])
    kw = {k: v for k, v in OmegaConf.to_container(cfg.stages.u4g.module).items() if k != "_target_"}
    stage = U4G(model=OmegaConf.to_container(cfg.model), resolution=32, **kw)
    stage.configure_model()
    reward = RewardCallback(cfg.reward.backbones, OmegaConf.to_container(cfg.backbone_sources))
    monkeypatch.setattr(U4G, "reward", property(lambda self: reward))
    torch.manual_seed(0)
    return stage, stage.rollout({"images": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))})


@pytest.mark.parametrize("shared", [True, False])
def test_u4g_trajectories_of_a_caption_share_their_initial_noise_when_asked(monkeypatch, shared):
    """shared_initial_noise (the toy's default; Flow-GRPO's sample.same_latent, off in the paper preset): a caption's
    G trajectories start from one latent, different images from different ones, and the trajectories still part at
    the first SDE step; off, every trajectory starts from its own latent."""
    _, ro = _u4g_rollout(monkeypatch, [f"stages.u4g.module.shared_initial_noise={shared}"])
    start = ro["latents"][:, 0].flatten(1)  # [2 images x 3 trajectories, D]
    same_within = [torch.equal(start[3 * i], start[3 * i + j]) for i in range(2) for j in (1, 2)]
    assert same_within == [shared] * 4
    assert not torch.equal(start[0], start[3])
    assert not torch.equal(ro["latents"][0, 1], ro["latents"][1, 1])  # explored from the first step on
    paper = compose_cfg(["+experiment=u4g", "data.manifest=m.jsonl", "init_from=w.safetensors"])
    assert compose_cfg([]).stages.u4g.module.shared_initial_noise is True
    assert paper.stages.u4g.module.shared_initial_noise is False


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_u4g_computes_a_shared_first_step_once_per_group_with_the_same_velocities_and_gradients(monkeypatch, guidance):
    """With shared_initial_noise a group's G trajectories are one trajectory until the first SDE step, so the rollout
    and the update compute that step's velocity on one row per group and repeat it. The rollout's first DiT call is on
    2 rows (2 images x 3 trajectories), the others on 6; velocities and LoRA gradients equal those computed on all 6
    rows, without CFG and with it (the negative prompt's rows are sliced too). Slicing the wrong rows (x[:2] instead of
    x[::3]), or repeating them in the wrong order (repeat instead of repeat_interleave), changes both; a micro-batch
    that does not hold whole groups is computed row by row."""
    from uae_lightning.models.decoder import Decoder

    sizes = []
    guided = Decoder.guided_velocity
    monkeypatch.setattr(Decoder, "guided_velocity", lambda self, x, *a, **k: sizes.append(len(x)) or guided(self, x, *a, **k))
    stage, ro = _u4g_rollout(monkeypatch, ["stages.u4g.module.shared_initial_noise=true", "stages.u4g.module.sde_steps=all",
                                           f"stages.u4g.module.guidance_scale={guidance}"])
    assert sizes == [2, 6, 6, 6]
    assert (ro["negative"] is None) == (guidance == 1.0)
    x0, n = ro["latents"][:, 0], 6
    s = ro["sigmas"][0].expand(n)
    lora = [p for p in stage.decoder.transformer.parameters() if p.requires_grad]
    out = {}
    for shared in (True, False):
        sizes.clear()
        v = stage.velocity(x0, s, ro["cond"], ro["mask"], ro["negative"], shared)
        _, logp, _, _ = stage.step(x0, v, s, ro["sigmas"][1].expand(n), prev_sample=ro["latents"][:, 1])
        # per-row weights, so that a gradient summed over the wrong rows differs
        grads = torch.autograd.grad((logp * torch.arange(1.0, n + 1)).sum(), lora)
        out[shared] = (v.detach(), torch.cat([g.flatten() for g in grads]), list(sizes))
    assert out[True][2] == [2] and out[False][2] == [6]
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert out[True][1].abs().max() > 0 and torch.allclose(out[True][1], out[False][1], rtol=1e-4, atol=1e-6)
    sizes.clear()
    neg = None if ro["negative"] is None else (ro["negative"][0][:4], ro["negative"][1][:4])
    stage.velocity(x0[:4], s[:4], ro["cond"][:4], ro["mask"][:4], neg, True)  # 4 rows: not whole groups of 3
    assert sizes == [4]


@pytest.mark.parametrize("sde_steps", ["all", "trained"])
def test_u4g_rollouts_explore_only_at_the_trained_steps_when_asked(monkeypatch, sde_steps):
    """sde_steps=trained (Flow-GRPO-Fast, MixGRPO): with train_window [1, 3) of 4 steps, steps 0 and 3 are the Euler
    ODE step x + (sigma_next - sigma) v exactly (recomputed here from the stored latents) with log-prob 0, and steps
    1 and 2 are SDE steps; with sde_steps=all no step is the ODE's. A rollout that ignores the option, or explores
    outside the window, or lets the window's noise leak into the ODE steps' log-probs fails."""
    stage, ro = _u4g_rollout(monkeypatch, ["stages.u4g.module.train_window=[1,3]", f"stages.u4g.module.sde_steps={sde_steps}"])
    latents, sigmas, n = ro["latents"], ro["sigmas"], ro["latents"].shape[0]
    assert n == 2 * 3 and latents.shape[1] == 4 + 1
    ode_steps = []
    with torch.no_grad():
        for i in range(4):
            v = stage.velocity(latents[:, i], sigmas[i].expand(n), ro["cond"], ro["mask"], None)
            euler = latents[:, i] + (sigmas[i + 1] - sigmas[i]) * v
            if torch.allclose(latents[:, i + 1], euler, atol=1e-5):
                ode_steps.append(i)
                assert (ro["logps"][:, i] == 0).all()
            else:
                assert (ro["logps"][:, i] != 0).all()
    assert ode_steps == ([0, 3] if sde_steps == "trained" else [])


def test_u4g_gradient_checkpointing_recomputes_the_dit_blocks_with_the_same_gradients():
    """stages.u4g.module.gradient_checkpointing (on in the paper preset): every DiT block goes through the
    checkpoint function, and the LoRA gradients equal those without it."""
    from omegaconf import OmegaConf

    from uae_lightning.stages.u4g import U4G

    cfg = compose_cfg()
    kw = {k: v for k, v in OmegaConf.to_container(cfg.stages.u4g.module).items() if k != "_target_"}
    grads, calls = [], []
    for on in (False, True):
        stage = U4G(model=OmegaConf.to_container(cfg.model), resolution=32, **{**kw, "gradient_checkpointing": on})
        torch.manual_seed(0)  # the same LoRA initialisation both times
        stage.configure_model()
        dit = stage.decoder.transformer
        assert dit.is_gradient_checkpointing == on
        if on:
            inner = dit._gradient_checkpointing_func
            dit._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(2, 3, 32, 32, generator=g)
        cond = torch.randn(2, 5, dit.config.joint_attention_dim, generator=g)
        stage.decoder.velocity(z, torch.tensor([0.7, 0.3]), cond, torch.ones(2, 5, dtype=torch.bool)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in dit.named_parameters() if p.requires_grad]))
    assert len(calls) == cfg.model.decoder.tiny.num_layers
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("num_iterations, kl_beta, passes", [(1, 0.0, 1), (1, 0.04, 2), (2, 0.0, 3)])
def test_g4u_makes_one_policy_pass_per_micro_batch_when_on_policy(tmp_path, monkeypatch, num_iterations, kl_beta, passes):
    """Forward passes of the encoder over the rollout per G4U rollout batch: with num_iterations 1 the update's own
    log-probs are the old ones (one pass per micro-batch, plus one reference pass when the KL is on); with 2 the
    sampling policy's log-probs are stored first (1 + 2 passes). 3 images x group 2 = 6 sequences, micro-batches of
    4 -> 2 slices."""
    from uae_lightning.models.encoder import Encoder

    calls, per_step = [], []
    original_logprobs, original_step = Encoder.completion_logprobs, G4U.training_step

    def count(self, captions, temperature):
        calls.append(len(captions.texts))
        return original_logprobs(self, captions, temperature)

    def step(self, batch, batch_idx):
        calls.clear()
        original_step(self, batch, batch_idx)
        per_step.append(list(calls))

    monkeypatch.setattr(Encoder, "completion_logprobs", count)
    monkeypatch.setattr(G4U, "training_step", step)
    cfg = compose_cfg([*G4U_FAST, f"stages.g4u.trainer.max_steps={num_iterations}", f"stages.g4u.module.kl_beta={kl_beta}",
                       f"stages.g4u.module.num_iterations={num_iterations}"])
    run_pipeline(cfg, tmp_path)
    assert per_step == [[4, 2] * passes]


def test_g4u_redraws_each_distinct_caption_of_a_group_once(compose_config):
    """A rollout group shares one initial noise, so equal captions in a group give equal images: each distinct
    (group, caption) is redrawn once and copied. Pinned: the number of captions drawn, and images and rewards equal
    (1e-5) to redrawing every caption. A bug keying by caption alone (across groups, i.e. across noises) would draw 3
    here, not 4, and give group 1's "a square" group 0's image."""
    from omegaconf import OmegaConf

    cfg = compose_config(G4U_FAST)
    kw = {k: v for k, v in OmegaConf.to_container(cfg.stages.g4u.module).items() if k != "_target_"}
    stage = G4U(model=OmegaConf.to_container(cfg.model), resolution=32, **kw)
    stage.configure_model()
    reward = RewardCallback(cfg.reward.backbones, OmegaConf.to_container(cfg.backbone_sources))
    texts = ["a red circle", "a square", "a red circle", "a red circle",   # group 0: 2 distinct
             "a square", "a square", "a blue square", "a square"]         # group 1: 2 distinct
    noise = torch.randn(2, stage.decoder.latent_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    drawn = []
    original = stage.redraw

    def counting(texts, *args):
        drawn.append(list(texts))
        return original(texts, *args)

    stage.redraw = counting
    with torch.no_grad():
        images, n = stage.redraw_distinct(texts, noise, 4, 3, 1.0)
        every = original(texts, noise.repeat_interleave(4, 0), 3, 1.0)
    assert n == 4 and drawn == [["a red circle", "a square", "a square", "a blue square"]]
    assert torch.allclose(images, every, atol=1e-5)
    references = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(reward.score(images, references), reward.score(every, references), atol=1e-5)
    assert not torch.allclose(images[1], images[4], atol=1e-3)  # same caption, other group (noise): another image


@pytest.mark.parametrize("same_test", [True, False])
def test_a_stage_starts_from_the_previous_stages_final_test_when_it_measures_the_same(tmp_path, monkeypatch, same_test):
    """G4U's starting point is cold start's final held-out test (same weights, same test settings): the numbers are
    copied, not measured again, so the run makes 3 held-out tests, not 4. With another test setting (G4U redraws with
    3 steps, cold start with 2) the starting point is measured."""
    import uae_lightning.runner as runner

    calls = []
    original = runner.held_out_test
    monkeypatch.setattr(runner, "held_out_test", lambda *a: calls.append(1) or original(*a))
    cfg = compose_cfg([*G4U_FAST, "run=[cold_start,g4u]", "stages.cold_start.trainer.max_steps=1",
                       "stages.cold_start.module.num_steps=2", "stages.cold_start.module.grad_last_steps=1",
                       "stages.cold_start.module.eval_steps=2", "stages.cold_start.module.max_new_tokens=8",
                       "stages.g4u.module.eval_max_new_tokens=8", "stages.g4u.trainer.max_steps=2",
                       f"stages.g4u.module.eval_steps={2 if same_test else 3}"])
    summary = run_pipeline(cfg, tmp_path)["stages"]
    assert len(calls) == (3 if same_test else 4)
    for k in ("reward", "caption_length", "informativeness"):
        same = summary["g4u"][f"{k}_before"] == summary["cold_start"][f"{k}_after"]
        assert same if same_test else (k != "reward" or not same)


def test_paired_gain_and_its_standard_error_by_hand():
    """Per-image differences 1, 0, 3 (image 3 only measured before: left out): mean 4/3, sample std
    sqrt(((-1/3)^2 + (-4/3)^2 + (5/3)^2) / 2) = sqrt(7/3), standard error sqrt(7/3) / sqrt(3) = 0.881917."""
    from uae_lightning.runner import paired_gains

    before = {"per_image": {"reward": {"0": 1.0, "1": 2.0, "2": 4.0, "3": 9.0}}}
    after = {"per_image": {"reward": {"0": 2.0, "1": 2.0, "2": 7.0}}}
    gain, se, n = paired_gains(before, after)["reward"]
    assert n == 3 and gain == pytest.approx(4 / 3) and se == pytest.approx(0.881917, abs=1e-6)


def test_u4g_captions_each_held_out_image_once_and_reuses_the_same_captions(tmp_path, monkeypatch):
    """U4G's captioner is frozen, so its held-out evaluations (the starting point, two during training, the final test)
    caption each image once: only the first evaluation's batches reach the encoder. Each reused caption and length is
    what a fresh greedy decoding of that image gives."""
    from uae_lightning.models.encoder import Encoder
    from uae_lightning.stages.u4g import U4G

    caption = Encoder.caption
    calls = []
    monkeypatch.setattr(Encoder, "caption", lambda self, *a, **k: calls.append(1) or caption(self, *a, **k))
    cached = U4G.heldout_captions
    captioned = []  # per held-out batch, in order: did it reach the encoder?

    def checking(self, images, indices, max_new_tokens):
        before = len(calls)
        texts, lengths = cached(self, images, indices, max_new_tokens)
        captioned.append(len(calls) > before)
        fresh = caption(self.encoder, images, do_sample=False, max_new_tokens=max_new_tokens)  # not counted
        assert texts == fresh.texts and lengths.tolist() == fresh.completion_mask.sum(1).float().tolist()
        return texts, lengths

    monkeypatch.setattr(U4G, "heldout_captions", checking)
    # 8 held-out images in batches of 3, 3 and 2 (U4G's 16x of data.val_size=8 would be 128, so it is set here).
    cfg = compose_cfg([*U4G_FAST, "data.eval_batch_size=3", "stages.u4g.data.val_size=8", "stages.u4g.trainer.max_steps=4",
                       "stages.u4g.trainer.val_check_interval=2"])
    run_pipeline(cfg, tmp_path)
    # The starting point captions its 3 batches; the two evaluations during training read the first 2 batches
    # (the toy's limit_val_batches) and the final test all 3, reusing the captions.
    assert captioned == [True] * 3 + [False] * (2 + 2 + 3)


def test_lr_factor_by_hand():
    """Warm-up 5 of 80 updates. The linear warm-up: 0.2 at update 0, 0.8 at 3, 1 at 4. Cosine from there:
    p = (step + 1 - 5) / 76, so p = 0.5 at update 42 gives exactly 0.5, and update 79 (p = 75/76) gives
    0.5 (1 - cos(pi / 76)) = 0.000427, small but not 0 (a decay to 0 at the last update would waste it).
    Constant stays at 1. An unknown schedule is refused."""
    from uae_lightning.stages.base import lr_factor

    assert [lr_factor(s, 5, 80, "cosine") for s in (0, 3, 4)] == pytest.approx([0.2, 0.8, 1.0])
    assert lr_factor(42, 5, 80, "cosine") == pytest.approx(0.5)
    assert lr_factor(79, 5, 80, "cosine") == pytest.approx(0.000427, abs=1e-6)
    assert lr_factor(5, 5, 80, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 76)))
    assert [lr_factor(s, 5, 80, "constant") for s in (0, 4, 42, 79)] == pytest.approx([0.2, 1.0, 1.0, 1.0])
    # Linear from the same peak: 1 - p, so 0.5 at update 42 and 1/76 at the last.
    assert [lr_factor(s, 5, 80, "linear") for s in (0, 4, 42, 79)] == pytest.approx([0.2, 1.0, 0.5, 1 / 76])
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, 5, 80, "exponential")


def test_g4u_paper_preset_decays_the_learning_rate_as_trl_s_grpo_does():
    """TRL's GRPOConfig changes only the learning rate's default, so its schedule is TrainingArguments': linear to 0
    over max_steps, no warm-up. The preset says so itself (the toy's stage config warms up and stays constant), and
    its factors at each update are those of transformers' get_linear_schedule_with_warmup(0, T)."""
    from transformers import get_linear_schedule_with_warmup

    from uae_lightning.stages.base import lr_factor

    paper = compose_cfg(["+experiment=g4u", "data.manifest=m.jsonl", "init_from=w.safetensors"]).stages.g4u.module
    assert (paper.lr_schedule, paper.warmup_steps) == ("linear", 0)
    toy = compose_cfg([]).stages.g4u.module
    assert (toy.lr_schedule, toy.warmup_steps > 0) == ("constant", True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, 0, 7)
    reference = []
    for _ in range(7):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert reference == pytest.approx([(7 - s) / 7 for s in range(7)])
    assert [lr_factor(s, paper.warmup_steps, 7, paper.lr_schedule) for s in range(7)] == pytest.approx(reference)


def test_u4g_paper_preset_trains_at_flow_grpo_s_constant_learning_rate_from_the_first_update():
    """Flow-GRPO's train_sd3.py: plain AdamW, no warm-up, no scheduler. The preset is a delta over the toy's stage
    config, which warms U4G up over 5 rollout batches, so the preset must say warmup_steps 0 itself."""
    paper = compose_cfg(["+experiment=u4g", "data.manifest=m.jsonl", "init_from=w.safetensors"]).stages.u4g.module
    assert (paper.lr_schedule, paper.warmup_steps) == ("constant", 0)
    assert compose_cfg([]).stages.u4g.module.warmup_steps > 0


@pytest.mark.parametrize("stage", ["u4g", "g4u"])
def test_an_rl_stage_trains_at_the_cosine_learning_rates_over_its_rollout_batches(tmp_path, stage):
    """4 rollout batches of 2 updates each (max_steps 8, num_iterations 2), warm-up 1, lr 1e-3: the schedule steps once
    per rollout batch, so the batches train at 1e-3 x (1, 0.8536, 0.5, 0.1464), 0.5 (1 + cos(pi k / 4)) for k = 0..3,
    as logged by the learning-rate monitor. A schedule that counted optimizer updates instead (8) would log
    (1, 0.962, 0.854, 0.691)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fast = U4G_FAST if stage == "u4g" else G4U_FAST
    cfg = compose_cfg([*fast, f"stages.{stage}.trainer.max_steps=8", f"stages.{stage}.module.num_iterations=2",
                       f"stages.{stage}.module.warmup_steps=1", f"stages.{stage}.module.lr=1e-3",
                       f"stages.{stage}.module.lr_schedule=cosine", f"stages.{stage}.trainer.log_every_n_steps=1",
                       f"stages.{stage}.trainer.val_check_interval=100"])
    run_pipeline(cfg, tmp_path)
    ea = EventAccumulator(str(tmp_path / stage / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    lrs = [e.value for e in ea.Scalars("lr-AdamW")]
    assert lrs == pytest.approx([1e-3, 8.5355e-4, 5e-4, 1.4645e-4], rel=1e-4)
