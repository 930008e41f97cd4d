"""Flow-GRPO step math: limits, the Gaussian log-density, the sampled variance, the sigma = 1 edge."""
import torch

from uae_lightning.rl.flow_grpo import cps_step, gaussian_logprob, sde_step, step_kl


def _inputs(seed=0, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_noise_level_zero_is_the_euler_step():
    x, v = _inputs()
    sigma, nxt = torch.full((4,), 0.6), torch.full((4,), 0.5)
    x_next, _, mu, std = sde_step(x, v, sigma, nxt, noise_level=0.0, noise=torch.randn_like(x))
    euler = x + (0.5 - 0.6) * v
    assert torch.allclose(mu, euler, atol=1e-6) and torch.allclose(x_next, euler, atol=1e-6)
    assert (std == 0).all()


def test_log_prob_is_the_mean_normal_log_density():
    x, v = _inputs(1)
    sigma, nxt = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.8, 0.6, 0.4, 0.2])
    x_next, logp, mu, std = sde_step(x, v, sigma, nxt, noise_level=0.7)
    for i in range(4):
        ref = torch.distributions.Normal(mu[i], std[i]).log_prob(x_next[i]).mean()
        assert torch.allclose(logp[i], ref, atol=1e-5)
    # std_t * sqrt(-dt) by hand for sample 0: 0.7 * sqrt(0.9 / 0.1) * sqrt(0.1)
    assert torch.allclose(std[0], torch.tensor(0.7 * (0.9 / 0.1) ** 0.5 * 0.1 ** 0.5))
    # Scoring the stored transition gives the same log-prob (on-policy ratio 1).
    _, again, _, _ = sde_step(x, v, sigma, nxt, 0.7, prev_sample=x_next)
    assert torch.allclose(again, logp, atol=1e-6)


def test_sampled_steps_have_variance_std_squared_times_minus_dt():
    x = torch.zeros(1, 1, 200, 200)
    v = torch.zeros_like(x)
    torch.manual_seed(0)
    x_next, _, mu, std = sde_step(x, v, torch.tensor([0.6]), torch.tensor([0.4]), 0.7)
    expected = (0.7**2) * (0.6 / 0.4) * 0.2  # std_t^2 * (-dt)
    assert abs((x_next - mu).var().item() / expected - 1) < 0.03  # 40k samples: relative s.e. ~0.7%
    assert torch.allclose(std**2, torch.tensor([expected]))


def test_step_at_sigma_one_is_finite():
    x, v = _inputs(2)
    x_next, logp, mu, std = sde_step(x, v, torch.ones(4), torch.full((4,), 0.9), 0.7)
    assert torch.isfinite(x_next).all() and torch.isfinite(logp).all() and torch.isfinite(std).all()
    assert torch.allclose(std, torch.full((4,), 0.7 * (1 / 0.1) ** 0.5 * 0.1 ** 0.5))


def test_cps_step_by_hand():
    x, v = _inputs(3)
    x_next, logp, mu, std = cps_step(x, v, torch.full((4,), 0.6), torch.full((4,), 0.5), 0.5)
    s = 0.5 * torch.sin(torch.tensor(0.25 * torch.pi))
    x0, x1 = x - 0.6 * v, x + 0.4 * v
    assert torch.allclose(mu, x0 * 0.5 + x1 * torch.sqrt(0.25 - s**2), atol=1e-6)
    assert torch.allclose(std, s.expand(4))
    assert torch.allclose(logp, gaussian_logprob(x_next, mu, std), atol=1e-6)


def test_step_kl_by_hand():
    mu = torch.zeros(2, 1, 2, 2)
    ref = torch.ones(2, 1, 2, 2) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    assert torch.allclose(step_kl(mu, ref, torch.tensor([1.0, 2.0])), torch.tensor([0.5, 4 / 8]))
