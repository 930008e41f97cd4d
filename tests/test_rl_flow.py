"""Flow-GRPO step math pinned to numbers worked by hand, at noise > 0 and sigma away from 0 and 1.

The worked inputs: x = [1, -2], v = [0.5, 3], eps = [1, -0.5], sigma = 0.6 -> 0.4 (dt = -0.2), a = 0.7.
  std_t^2 = 0.49 * 0.6 / 0.4 = 0.735                     std_t = 0.8573214
  x coefficient  1 + std_t^2 / (2 * 0.6) * dt = 1 - 0.6125 * 0.2 = 0.8775
  v coefficient  (1 + std_t^2 * 0.4 / 1.2) * dt = 1.245 * -0.2 = -0.249
  mu = [0.8775 - 0.1245, -1.755 - 0.747] = [0.753, -2.502]
  step std = sqrt(0.735 * 0.2) = sqrt(0.147) = 0.3834058;  x_next = mu + 0.3834058 * eps = [1.1364058, -2.6937029]
  log p = mean(-eps^2 / 2) - ln 0.3834058 - ln sqrt(2 pi) = -0.3125 + 0.9586616 - 0.9189385 = -0.2727769
(A plain Euler mean would be x + dt v = [0.9, -2.6]; a flipped correction sign gives an x coefficient of 1.1225.)
"""
import math

import pytest
import torch

from uae_lightning.rl.flow_grpo import cps_step, gaussian_logprob, nonzero_advantage, sde_step, step_kl

X = torch.tensor([[1.0, -2.0]]).view(1, 1, 1, 2)
V = torch.tensor([[0.5, 3.0]]).view(1, 1, 1, 2)
EPS = torch.tensor([[1.0, -0.5]]).view(1, 1, 1, 2)
S, S_NEXT = torch.tensor([0.6]), torch.tensor([0.4])


def test_sde_step_by_hand():
    step = sde_step(X, V, S, S_NEXT, 0.7, noise=EPS)
    assert torch.allclose(step.mean.flatten(), torch.tensor([0.753, -2.502]), atol=1e-6)
    assert torch.allclose(step.sample.flatten(), torch.tensor([1.1364058, -2.6937029]), atol=1e-6)
    assert step.log_prob.item() == pytest.approx(-0.2727769, abs=1e-6)
    # Flow-GRPO's KL divides by the unscaled std_t^2; the exact Gaussian KL by the step variance std_t^2 |dt|.
    assert step.kl_std.item() == pytest.approx(0.8573214, abs=1e-6)
    assert sde_step(X, V, S, S_NEXT, 0.7, noise=EPS, convention="gaussian").kl_std.item() == pytest.approx(0.3834058, abs=1e-6)
    # Scoring the stored transition gives the same log-prob (the on-policy ratio is 1).
    again = sde_step(X, V, S, S_NEXT, 0.7, prev_sample=step.sample)
    assert torch.allclose(again.log_prob, step.log_prob, atol=1e-6)


def test_sde_step_at_sigma_one_uses_the_next_sigma():
    # sigma = 1, next 0.9: std_t^2 = 0.49 * 1 / (1 - 0.9) = 4.9; x coefficient 1 - 4.9 / 2 * 0.1 = 0.755;
    # v coefficient (1 + 0) * -0.1; mu = [0.755 - 0.05, -1.51 - 0.3] = [0.705, -1.81].
    step = sde_step(X, V, torch.ones(1), torch.tensor([0.9]), 0.7, noise=EPS)
    assert torch.allclose(step.mean.flatten(), torch.tensor([0.705, -1.81]), atol=1e-6)
    assert step.kl_std.item() == pytest.approx(math.sqrt(4.9), abs=1e-6)
    assert torch.isfinite(step.log_prob).all()


def test_noise_level_zero_is_the_euler_step():
    step = sde_step(X, V, S, S_NEXT, noise_level=0.0, noise=EPS)
    euler = X + (0.4 - 0.6) * V
    assert torch.allclose(step.mean, euler, atol=1e-6) and torch.allclose(step.sample, euler, atol=1e-6)


def test_sampled_steps_have_variance_std_squared_times_minus_dt():
    x = torch.zeros(1, 1, 200, 200)
    torch.manual_seed(0)
    step = sde_step(x, torch.zeros_like(x), torch.tensor([0.6]), torch.tensor([0.4]), 0.7)
    expected = 0.735 * 0.2  # std_t^2 * (-dt)
    assert abs((step.sample - step.mean).var().item() / expected - 1) < 0.03  # 40k samples: relative s.e. ~0.7%


def test_log_prob_is_the_mean_normal_log_density():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    sigma, nxt = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.8, 0.6, 0.4, 0.2])
    step = sde_step(x, v, sigma, nxt, noise_level=0.7, convention="gaussian")
    for i in range(4):
        ref = torch.distributions.Normal(step.mean[i], step.kl_std[i]).log_prob(step.sample[i]).mean()
        assert torch.allclose(step.log_prob[i], ref, atol=1e-5)


def test_cps_step_by_hand():
    # a = 0.5: std = 0.4 sin(pi / 4) = 0.2828427 (std^2 = 0.08), sqrt(0.4^2 - 0.08) = 0.2828427;
    # x0_hat = x - 0.6 v = [0.7, -3.8], x1_hat = x + 0.4 v = [1.2, -0.8];
    # mu = 0.6 x0_hat + 0.2828427 x1_hat = [0.7594113, -2.5062742].
    # Flow-CPS log p = -mean((std eps)^2) = -(0.08 + 0.02) / 2 = -0.05.
    # Gaussian log p = -0.3125 - ln 0.2828427 - 0.9189385 = -0.3125 + 1.2628643 - 0.9189385 = 0.0314258.
    step = cps_step(X, V, S, S_NEXT, 0.5, noise=EPS)
    assert torch.allclose(step.mean.flatten(), torch.tensor([0.7594113, -2.5062742]), atol=1e-6)
    assert torch.allclose(step.sample.flatten(), torch.tensor([1.0422540, -2.6476955]), atol=1e-6)
    assert step.log_prob.item() == pytest.approx(-0.05, abs=1e-6)
    assert step.kl_std is None
    exact = cps_step(X, V, S, S_NEXT, 0.5, noise=EPS, convention="gaussian")
    assert exact.log_prob.item() == pytest.approx(0.0314258, abs=1e-6)
    assert exact.kl_std.item() == pytest.approx(0.2828427, abs=1e-6)
    assert torch.allclose(exact.log_prob, gaussian_logprob(exact.sample, exact.mean, exact.kl_std), atol=1e-6)


def test_cps_last_step_is_finite_under_flow_grpo():
    # sigma_next = 0: the step is deterministic, mu = x0_hat = x - 0.6 v = [0.7, -3.8]; the Flow-CPS log-prob is 0.
    step = cps_step(X, V, S, torch.zeros(1), 0.5, noise=EPS)
    assert torch.allclose(step.mean.flatten(), torch.tensor([0.7, -3.8]), atol=1e-6)
    assert step.log_prob.item() == 0.0


def test_step_kl_by_hand():
    # mu - mu_ref = [0.1, -0.3]: mean square 0.05.
    mu = torch.tensor([0.753, -2.502]).view(1, 1, 1, 2)
    ref = mu - torch.tensor([0.1, -0.3]).view(1, 1, 1, 2)
    flow = step_kl(mu, ref, sde_step(X, V, S, S_NEXT, 0.7).kl_std)
    exact = step_kl(mu, ref, sde_step(X, V, S, S_NEXT, 0.7, convention="gaussian").kl_std)
    assert flow.item() == pytest.approx(0.05 / (2 * 0.735), rel=1e-5)  # 0.0340136
    assert exact.item() == pytest.approx(0.05 / (2 * 0.147), rel=1e-5)  # 0.1700680
    assert step_kl(mu, ref, None).item() == pytest.approx(0.05, rel=1e-5)  # Flow-CPS


def test_kl_scales_differ_by_one_over_dt_on_the_sd35_schedule():
    """On SD3.5-large's 10-step schedule (shift 3) the step-variance KL is 1/|dt| times Flow-GRPO's: 3.7x to 25x."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    sig = sched.sigmas.float()
    ratios = []
    for i in range(9):
        s, n = sig[i : i + 1], sig[i + 1 : i + 2]
        flow = sde_step(X, V, s, n, 0.7).kl_std
        exact = sde_step(X, V, s, n, 0.7, convention="gaussian").kl_std
        ratios.append((flow / exact).item() ** 2)
        assert ratios[-1] == pytest.approx(1 / (s - n).item(), rel=1e-4)
    assert 3.5 < min(ratios) < 4 and 24 < max(ratios) < 26


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        sde_step(X, V, S, S_NEXT, 0.7, convention="exact")


def test_only_zero_advantages_are_dropped():
    assert nonzero_advantage(torch.tensor([0.0, 1e-6, -2.0, 0.0])).tolist() == [False, True, True, False]
