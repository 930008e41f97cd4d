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


def openai_clip_image_features(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's VisionTransformer.forward, written from its published structure with torch's own modules
    (nn.MultiheadAttention holds q, k, v packed in in_proj, as the checkpoint does): an independent reference for the
    LongCLIP conversion."""
    from torch import nn

    width = sd["visual.conv1.weight"].shape[0]
    conv = nn.Conv2d(3, width, 14, 14, bias=False)
    conv.weight.data = sd["visual.conv1.weight"]
    x = conv(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]

    def ln(t, name):
        return torch.nn.functional.layer_norm(t, (width,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    x = ln(x, "visual.ln_pre")
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"visual.transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, width // 64, batch_first=True)
        attn.load_state_dict({k.removeprefix(p + "attn."): v for k, v in sd.items() if k.startswith(p + "attn.")})
        h = ln(x, p + "ln_1")
        x = x + attn(h, h, h, need_weights=False)[0]
        h = ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]  # QuickGELU
        i += 1
    return ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]


def test_longclip_raw_checkpoint_converts_to_a_clip_model_with_the_same_features(tmp_path):
    """LongCLIP-L ships a raw state dict in OpenAI layout (no config.json): the backbone converts it on load, and the
    converted CLIPModel's image features equal OpenAI's forward on the raw tensors (a swapped q/k/v chunk, an
    untransposed projection or a wrong activation moves them by ~1e-1)."""
    from uae_lightning.rehearsal import openai_clip_state_dict, save_longclip

    save_longclip(tmp_path / "LongCLIP-L")
    sd = openai_clip_state_dict()
    backbone = build_backbone(str(tmp_path / "LongCLIP-L"))
    assert backbone.contrastive and backbone.preprocess.resize == ("shortest_edge", 224) and backbone.preprocess.crop == (224, 224)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = backbone.model.get_image_features(pixel_values=pixels)
        ours = ours if torch.is_tensor(ours) else ours.pooler_output
        ref = openai_clip_image_features(sd, pixels)
    assert ref.abs().mean() > 1e-2  # the comparison is not between two near-zero vectors
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)
    # The text tower: LongCLIP's 248 positions, the first 20 from CLIP's table and the rest from the interpolated one.
    positions = backbone.model.text_model.embeddings.position_embedding.weight
    assert torch.equal(positions[:20], sd["positional_embedding"][:20])
    assert torch.equal(positions[20:], sd["positional_embedding_res"][20:])


def test_each_backbone_sees_its_images_as_its_own_processor_prepares_them(tmp_path):
    """DINOv2's processor resizes the short side to 256 and centre-crops 224; DINOv3's resizes to 224 x 224. The
    differentiable torch preprocessing must give the processor's pixels (to 1e-5; measured: equal, as the processors
    resize with the same antialiased torch interpolation); resizing DINOv2's input straight to 224, as the bench once
    did, is off by 0.28 on average in normalised pixels."""
    from transformers import AutoImageProcessor

    from uae_lightning.rehearsal import save_dinov2, save_dinov3

    img = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    smooth = torch.nn.functional.avg_pool2d(img, 5, 1, 2)
    for save in (save_dinov2, save_dinov3):
        path = save(tmp_path / save.__name__)
        backbone, proc = build_backbone(str(path)), AutoImageProcessor.from_pretrained(path)
        ref = proc(images=smooth, do_rescale=False, return_tensors="pt")["pixel_values"]
        ours = backbone.preprocess(smooth)
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        assert (ours - ref).abs().max() < 1e-5, save.__name__
    straight = torch.nn.functional.interpolate(smooth, size=(224, 224), mode="bicubic", antialias=True)
    dino2 = build_backbone(str(tmp_path / "save_dinov2"))
    ref = AutoImageProcessor.from_pretrained(tmp_path / "save_dinov2")(images=smooth, do_rescale=False, return_tensors="pt")["pixel_values"]
    assert ((straight - dino2.preprocess.mean) / dino2.preprocess.std - ref).abs().mean() > 0.1


def test_a_backbone_path_may_contain_dots(tmp_path):
    """Backbones given as local paths such as ~/.cache/... or /data/v1.2/clip (a ModuleDict key cannot hold a dot)."""
    path = tmp_path / "v1.2" / ".cache" / "clip"
    save_tiny_clip(path)
    sim = Similarity({str(path): 1.0, "toy_pixels": 1.0})
    a = torch.rand(2, 3, 32, 32)
    assert set(sim.per_backbone(a, a)) == {str(path), "toy_pixels"}
    assert torch.allclose(sim(a, a), torch.ones(2), atol=1e-5)


def test_toy_objects_pays_for_every_fact_a_caption_can_state():
    """On 200 drawn scenes, a wrong shape, size or colour of one object costs toy_objects at least half as much
    similarity as removing that object (measured: 1.05 / 1.10 / 1.09); the thumbnail and the palette pay 0.06 and
    0.03 for a wrong shape, 0.16 and 0.08 for a wrong size."""
    from uae_lightning.rewards.facts import fact_costs

    costs = fact_costs(Similarity({"toy_objects": 1.0, "toy_pixels": 1.0, "toy_palette": 1.0}), scenes=200, seed=0)
    for change in ("shape", "size", "colour"):
        assert costs[change]["toy_objects"] >= 0.5, (change, costs[change])
    assert costs["shape"]["toy_pixels"] < 0.2 and costs["shape"]["toy_palette"] < 0.2  # what toy_objects adds


def test_the_default_reward_pays_for_every_fact_a_caption_can_state(compose_config):
    """Issue 25's bar, on the reward the default run trains with (reward/toy.yaml): on 200 drawn scenes, one object
    drawn with another shape, size or colour (everything else kept) loses at least half the reward that removing
    the object loses (measured: 0.61 / 0.65 / 1.02). The old default (thumbnail, regions, palette) paid 0.04 / 0.12
    for shape and size (benchmarks/reward_facts.py), so a captioner could name them wrongly at almost no cost."""
    from uae_lightning.rewards.facts import fact_costs

    cfg = compose_config()
    reward = Similarity(dict(cfg.reward.backbones))
    costs = fact_costs(reward, scenes=200, seed=0, resolution=cfg.data.resolution, max_objects=cfg.data.max_objects)
    assert costs["removed"]["reward"] > 0.2  # removing an object is a real loss, so the ratios are not noise
    for change in ("shape", "size", "colour"):
        assert costs[change]["reward"] >= 0.5, (change, costs[change])


def test_toy_objects_first_used_in_inference_mode_still_trains():
    """A stage's starting-point test (inference mode) is often the reward's first call, which builds and caches the
    templates; a training step after it must still backpropagate through the reward."""
    from uae_lightning.rewards.backbones import ToyObjects

    reward = Similarity({"toy_objects": 1.0})
    ref = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        reward(torch.rand(2, 3, 32, 32), ref)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(images, ref).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert isinstance(reward.backbones[0], ToyObjects)


def test_toy_objects_reads_coverage_whatever_the_colour_and_finds_each_shape_by_hand():
    from uae_lightning.data import toy
    from uae_lightning.rewards.backbones import ToyObjects

    b = ToyObjects()
    # A pixel half covered by red over the background is read as coverage 0.5 and colour red: background +
    # 0.5 (red - background) lies on red's blend line.
    bg, red = torch.tensor(toy.BACKGROUND) / 255, torch.tensor(toy.COLOURS["red"]) / 255
    pixel = (bg + 0.5 * (red - bg)).view(1, 3, 1, 1)
    coverage, weights = b.coverage(pixel)
    assert coverage.item() == pytest.approx(0.5, abs=1e-4) and weights[0, 0, 0].argmax().item() == list(toy.COLOURS).index("red")
    for shape in toy.SHAPES:
        for size in toy.SIZES:
            for colour in ("green", "white"):
                img = torch.from_numpy(toy.image_array(toy.Scene((toy.ToyObject(shape, colour, size, 4),)), 32).copy())
                probs, _, _, _ = b.cells(img.permute(2, 0, 1)[None].float() / 255)
                p = probs[0, 4]  # the centre cell: [shape, size]
                assert p[toy.SHAPES.index(shape), list(toy.SIZES).index(size)] > 0.8, (shape, size, colour, p)
                assert probs[0, [0, 1, 2, 3, 5, 6, 7, 8]].sum() < 0.01  # empty cells hold nothing
    # Features: the same scene scores 1; the object moved to another cell, or another colour, scores about 0.
    scene = toy.Scene((toy.ToyObject("circle", "red", "large", 0),))
    moved = toy.Scene((toy.ToyObject("circle", "red", "large", 8),))
    recoloured = toy.Scene((toy.ToyObject("circle", "blue", "large", 0),))
    x = torch.stack([torch.from_numpy(toy.image_array(s, 32).copy()).permute(2, 0, 1).float() / 255
                     for s in (scene, moved, recoloured)])
    f = b(x)
    assert (f[0] @ f[0]).item() == pytest.approx(1.0, abs=1e-5)
    assert (f[0] @ f[1]).item() < 0.01
    # A recoloured object keeps its shape and size features: partial**2 * 2 of the squared norm 1 + 3 partial**2.
    expected = 2 * b.partial ** 2 / (1 + 3 * b.partial ** 2)
    assert (f[0] @ f[2]).item() == pytest.approx(expected, abs=0.03)
