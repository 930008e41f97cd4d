"""Stage-1 noise levels as diffusers' SD3 training script draws them: u from the weighting density, mapped through the
training scheduler's shifted sigmas (SD3.5-large: shift 3.0)."""
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from uae_lightning.models.build import build_decoder
from uae_lightning.models.flow import sample_t, sigmas_from_density


def test_u_maps_to_the_shifted_training_sigma_by_hand():
    # index = floor(1000 u); the unshifted sigma there is (1000 - index) / 1000, shifted: 3 s / (1 + 2 s).
    # u = 0.5 -> s = 0.5 -> 0.75;  u = 0.25 -> s = 0.75 -> 0.9;  u = 0.9 -> s = 0.1 -> 0.25.
    train = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    got = sigmas_from_density(torch.tensor([0.5, 0.25, 0.9]), train, "scheduler")
    assert torch.allclose(got, torch.tensor([0.75, 0.9, 0.25]), atol=1e-6)
    assert torch.equal(sigmas_from_density(torch.tensor([0.3]), train, "density"), torch.tensor([0.3]))


def test_logit_normal_through_shift_three_has_median_three_quarters():
    """20k draws: median 0.75 (the unshifted median is 0.5) and P(sigma > 0.75) = 0.5 (0.14 unshifted); the sampling
    error of either is ~0.004, the margins are 0.02."""
    g = torch.Generator().manual_seed(0)
    u = sample_t(20000, "logit_normal", 0.0, 1.0, 1.29, "cpu", generator=g)
    sig = sigmas_from_density(u, FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas, "scheduler")
    assert abs(sig.median().item() - 0.75) < 0.02
    assert abs((sig > 0.75).float().mean().item() - 0.5) < 0.02


def test_the_configured_shift_wins_over_the_checkpoint_scheduler(tmp_path):
    SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                          pooled_projection_dim=8, pos_embed_max_size=8).save_pretrained(tmp_path / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(tmp_path / "scheduler")
    cfg = {"pretrained": str(tmp_path), "dtype": "float32", "vae": False, "shift": 3.0, "pooled": "zeros"}
    decoder = build_decoder(cfg, 16, "mask")
    assert decoder.train_sigmas()[500].item() == 0.75
    decoder.sigmas(10)  # sampling moves the scheduler's own sigmas; the training sigmas stay
    assert decoder.train_sigmas()[500].item() == 0.75
