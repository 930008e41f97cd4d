"""GRPO math against numbers worked out by hand."""
import math

import pytest
import torch

from uae_lightning.rl.grpo import aggregate, clipped_surrogate, group_advantages, kl_k3, token_logprobs


def test_group_advantages_by_hand():
    # Group 1: rewards 1, 3 -> mean 2, unbiased std sqrt(2); group 2: all equal -> zero advantage, not NaN.
    r = torch.tensor([1.0, 3.0, 5.0, 5.0])
    a = group_advantages(r, 2, "group", eps=0.0 + 1e-4)
    s = math.sqrt(2)
    assert torch.allclose(a, torch.tensor([-1 / (s + 1e-4), 1 / (s + 1e-4), 0.0, 0.0]))
    # Batch scale: std of [1,3,5,5] = sqrt(11/3) (unbiased).
    b = group_advantages(r, 2, "batch")
    sb = math.sqrt(((1 - 3.5) ** 2 + (3 - 3.5) ** 2 + 2 * (5 - 3.5) ** 2) / 3)
    assert torch.allclose(b, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (sb + 1e-4))
    assert torch.equal(group_advantages(r, 2, "none"), torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert torch.isfinite(group_advantages(torch.ones(8), 4)).all() and group_advantages(torch.ones(8), 4).abs().sum() == 0


def test_flow_grpo_advantages_use_the_population_std_of_the_group_or_of_all_ranks():
    # Groups [1, 2] and [3, 6]: means 1.5 and 4.5, population std 0.5 and 1.5 (np.std, Flow-GRPO's stat tracker);
    # the unbiased std would be 0.7071 and 2.1213.
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    a = group_advantages(r, 2, "group", unbiased=False)
    assert torch.allclose(a, torch.tensor([-0.5 / 0.5001, 0.5 / 0.5001, -1.5 / 1.5001, 1.5 / 1.5001]))
    # global_std: population std of the whole batch, mean 3, variance (4 + 1 + 0 + 9) / 4 = 3.5.
    b = group_advantages(r, 2, "batch", unbiased=False)
    assert torch.allclose(b, torch.tensor([-0.5, 0.5, -1.5, 1.5]) / (math.sqrt(3.5) + 1e-4))
    # Over 2 ranks the batch std is that of the rewards gathered from both: here [1, 2, 3, 6] and [10, 10].
    gathered = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0])
    c = group_advantages(r, 2, "batch", unbiased=False, batch_rewards=gathered)
    assert torch.allclose(c, torch.tensor([-0.5, 0.5, -1.5, 1.5]) / (gathered.std(correction=0) + 1e-4))


def test_group_advantages_reject_bad_shapes_and_modes():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match="expected one of"):
        group_advantages(torch.ones(4), 2, "std")


def test_clipped_surrogate_by_hand():
    # ratio = e^{log 1.5} = 1.5 with A = +1, eps_high 0.2: min(1.5, 1.2) = 1.2 -> loss -1.2, clipped.
    # ratio 0.5 with A = +1, eps_low 0.2: min(0.5, 0.8) = 0.5 -> loss -0.5, not clipped.
    # ratio 0.5 with A = -1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped.
    # ratio 1.1 with A = -2, eps_high 0.28: min(-2.2, -2.2) -> loss 2.2, not clipped.
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.1]]))
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, ratio, clipped = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert torch.allclose(ratio, torch.tensor([[1.5, 0.5], [0.5, 1.1]]))
    assert torch.allclose(loss, torch.tensor([[-1.28, -0.5], [0.8, 1.1]]))
    assert clipped.tolist() == [[True, False], [True, False]]
    # Asymmetric clip: with eps_high=0.28 the first token is clipped at 1.28, not 1.2.
    loss2, _, _ = clipped_surrogate(logp[:1, :1], old[:1, :1], torch.tensor([1.0]), 0.2, 0.2)
    assert torch.allclose(loss2, torch.tensor([[-1.2]]))


def test_kl_k3_by_hand():
    # d = ref - logp = log 2: e^d - d - 1 = 2 - log 2 - 1.
    logp = torch.tensor([0.0, 0.3])
    ref = torch.tensor([math.log(2), 0.3])
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([1 - math.log(2), 0.0]))
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_loss_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "grpo").item() == pytest.approx((6 / 3 + 4 / 1) / 2)  # 3.0
    assert aggregate(loss, mask, "bnpo").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "dr_grpo", max_length=5).item() == pytest.approx(10 / (2 * 5))
    assert aggregate(loss, mask, "dapo", num_tokens=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="max_length"):
        aggregate(loss, mask, "dr_grpo")
    with pytest.raises(ValueError, match="expected one of"):
        aggregate(loss, mask, "mean")


def test_token_logprobs_use_the_sampling_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    assert token_logprobs(logits, tokens).item() == pytest.approx(math.log(3 / 4))
    # At T = 0.5 the logits double: p = 9 / 10.
    assert token_logprobs(logits, tokens, 0.5).item() == pytest.approx(math.log(9 / 10))
