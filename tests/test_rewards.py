import pytest
import torch
from transformers import CLIPImageProcessor, CLIPModel

from conftest import save_tiny_clip, save_tiny_dinov2
from uae_lightning.rewards.backbones import HFBackbone, Similarity, ToyPixels, ToyRegionColours, build_backbone


def test_hf_backbones_load_from_a_folder_like_a_hub_id(tmp_path):
    save_tiny_clip(tmp_path / "clip")
    save_tiny_dinov2(tmp_path / "dino")
    clip, dino = build_backbone(str(tmp_path / "clip")), build_backbone(str(tmp_path / "dino"))
    assert isinstance(clip, HFBackbone) and clip.contrastive and not dino.contrastive
    x = torch.rand(3, 3, 64, 64)  # any resolution: resized to the processor's crop size
    fc, fd = clip(x), dino(x)
    assert fc.shape == (3, 16) and fd.shape == (3, 32)  # projected CLIP features; DINO CLS (pooler) features
    assert torch.allclose(fc.norm(dim=-1), torch.ones(3)) and torch.allclose(fd.norm(dim=-1), torch.ones(3))
    # CLIP features are the model's own get_image_features on the processor's pixels.
    model = CLIPModel.from_pretrained(tmp_path / "clip")
    proc = CLIPImageProcessor.from_pretrained(tmp_path / "clip")
    img = torch.rand(1, 3, 32, 32)
    ref = model.get_image_features(**proc(images=img, do_rescale=False, return_tensors="pt")).pooler_output
    assert torch.allclose(clip(img), torch.nn.functional.normalize(ref, dim=-1), atol=1e-4)


def test_similarity_is_one_for_identical_images_weighted_and_differentiable(tmp_path):
    save_tiny_clip(tmp_path / "clip")
    sim = Similarity({"toy_pixels": 1.0, "toy_regions": 1.0, str(tmp_path / "clip"): 2.0})
    assert sim.weights == {"toy_pixels": 0.25, "toy_regions": 0.25, str(tmp_path / "clip"): 0.5}
    a = torch.rand(4, 3, 32, 32)
    assert torch.allclose(sim(a, a), torch.ones(4), atol=1e-5)
    b = torch.rand(4, 3, 32, 32, requires_grad=True)
    s = sim(b, a)
    assert (s < 0.999).all()
    s.sum().backward()  # the cold start backpropagates through the backbones
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in sim.parameters())


def test_toy_backbones_by_hand():
    black = torch.zeros(1, 3, 32, 32)
    left = black.clone()
    left[..., :, :16] = 1.0
    right = black.clone()
    right[..., :, 16:] = 1.0
    # Centred thumbnails of complementary halves are perfectly anti-correlated.
    assert torch.allclose((ToyPixels()(left) * ToyPixels()(right)).sum(), torch.tensor(-1.0), atol=1e-6)
    # Region statistics see where the colour is; a uniform image has none (zero features after centring).
    assert ToyRegionColours().embed(black).abs().sum() == 0
    assert (ToyRegionColours()(left) * ToyRegionColours()(right)).sum() < 0


def test_unknown_backbones_fail_with_the_accepted_forms():
    with pytest.raises(ValueError, match="toy_pixels"):
        build_backbone("toy_pixelz")
    with pytest.raises(ValueError, match="Hugging Face id / local path"):
        build_backbone("/nonexistent/backbone")
