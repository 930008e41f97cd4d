import copy
import os

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from uae_lightning.models.build import QWEN25_VL_3B, SD35_LARGE_TRANSFORMER, build_connector, build_decoder, build_encoder
from uae_lightning.models.lora import add_lora, base_part, merged
from uae_lightning.models.connector import Connector
from conftest import compose_cfg


@pytest.fixture(scope="module")
def toy_models():
    from omegaconf import OmegaConf

    m = OmegaConf.to_container(compose_cfg().model, resolve=True)
    torch.manual_seed(0)
    enc = build_encoder(m["encoder"], 32, "mask")
    dec = build_decoder(m["decoder"], 32, "mask")
    return m, enc, dec, build_connector(m["connector"], enc, dec)


def test_paper_scale_shapes_on_meta_device():
    with torch.device("meta"):
        enc = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_3B))
        dit = SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER)
        conn = Connector(enc.config.text_config.hidden_size, dit.config.joint_attention_dim)
    assert [tuple(l.weight.shape) for l in (conn.net[0], conn.net[2])] == [(8192, 2048), (4096, 8192)]
    n_dit = sum(p.numel() for p in dit.parameters())
    n_enc = sum(p.numel() for p in enc.parameters())
    assert 8.0e9 < n_dit < 8.2e9  # SD3.5-large: 8.06 B
    assert 3.6e9 < n_enc < 3.9e9  # Qwen2.5-VL-3B: 3.75 B
    assert dit.config.pooled_projection_dim == 2048


def test_caption_and_condition_shapes(toy_models):
    _, enc, dec, conn = toy_models
    images = torch.rand(3, 3, 32, 32)
    caps = enc.caption(images, num_return_sequences=2, max_new_tokens=6)
    assert caps.sequences.shape[0] == 6 and len(caps.texts) == 6
    assert caps.completion_mask.shape == (6, caps.sequences.shape[1] - caps.prompt_length)
    hidden, mask = enc.condition(["a red circle", "", "a large blue square at the top left"])
    assert hidden.shape[:2] == mask.shape and hidden.shape[2] == enc.hidden_size
    assert mask.sum(1).tolist()[1] < mask.sum(1).tolist()[0] < mask.sum(1).tolist()[2]
    assert conn(hidden).shape[-1] == dec.joint_attention_dim


def test_masked_conditioning_makes_an_image_independent_of_its_batch(toy_models):
    """With `mask` padding a caption's velocity does not change when a longer caption joins its batch."""
    _, enc, dec, conn = toy_models
    z = torch.randn(1, 3, 32, 32)
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        h1, m1 = enc.condition(["a red circle"])
        alone = dec.velocity(z, sigma, conn(h1), m1)
        h2, m2 = enc.condition(["a red circle", "a large yellow triangle at the bottom right and a small green square"])
        batched = dec.velocity(z.repeat(2, 1, 1, 1), sigma.repeat(2), conn(h2), m2)[:1]
        unmasked = dec.velocity(z.repeat(2, 1, 1, 1), sigma.repeat(2), conn(h2), torch.ones_like(m2))[:1]
    assert torch.allclose(alone, batched, atol=1e-5)
    assert not torch.allclose(alone, unmasked, atol=1e-3)  # attending pads does change the image


def test_ode_sampler_is_deterministic_and_follows_the_schedule(toy_models):
    _, enc, dec, conn = toy_models
    with torch.no_grad():
        h, m = enc.condition(["a red circle"])
        noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        a = dec.sample(conn(h), m, noise, 4)
        b = dec.sample(conn(h), m, noise, 4)
        # One step by hand: x1 = x0 + (sigma1 - sigma0) v(x0, sigma0).
        s = dec.sigmas(1)
        one = dec.sample(conn(h), m, noise, 1)
        by_hand = noise + (s[1] - s[0]) * dec.velocity(noise, s[:1], conn(h), m)
    assert torch.equal(a, b)
    assert torch.allclose(one, by_hand, atol=1e-6)
    assert s[0] == 1.0 and s[-1] == 0.0


def test_lora_merged_on_the_state_dict_is_peft_merge_and_the_same_function(toy_models):
    """The arithmetic merge of a state dict (what consolidating FSDP shards uses) gives, for a bfloat16 base with
    float32 adapters (the stages' dtypes), exactly the weights peft's own merge writes, and the merged plain model
    computes what the adapted one does. A wrong scale (alpha vs alpha / r), a transposed B A or a merge in bfloat16
    breaks the equality."""
    _, _, dec, _ = toy_models
    cfg = {"r": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    transformer = copy.deepcopy(dec.transformer).to(torch.bfloat16)
    transformer.requires_grad_(False)
    add_lora(transformer, cfg)
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # non-trivial adapters (lora_B starts at zero), float32 as the stages train them
        for n, p in transformer.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    plain = merged(transformer.state_dict(), cfg)
    assert not any("lora_" in k or "base_layer" in k for k in plain)
    assert plain.keys() == dec.transformer.state_dict().keys()
    from peft.tuners.tuners_utils import BaseTunerLayer

    by_peft = copy.deepcopy(transformer)
    for m in by_peft.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    peft_sd = {k.replace(".base_layer.", "."): v for k, v in by_peft.state_dict().items() if "lora_" not in k}
    changed = [k for k in plain if not torch.equal(plain[k], dec.transformer.state_dict()[k].to(torch.bfloat16))]
    assert len(changed) == 4 * len(transformer.transformer_blocks)  # to_q/k/v/out.0 weights of every block
    assert all(torch.equal(plain[k], peft_sd[k]) for k in plain)
    # The function: the merged plain model (float32 compute) against the adapted one.
    adapted, plain_model = copy.deepcopy(transformer).float(), copy.deepcopy(dec.transformer)
    plain_model.load_state_dict(plain)
    args = dict(hidden_states=torch.randn(2, 3, 32, 32), encoder_hidden_states=torch.randn(2, 5, dec.joint_attention_dim),
                pooled_projections=torch.zeros(2, 32), timestep=torch.tensor([500.0, 100.0]))
    unadapted = copy.deepcopy(dec.transformer)
    unadapted.load_state_dict({k: v.float() for k, v in base_part(transformer.state_dict()).items()})
    with torch.no_grad():
        ref = adapted(**args).sample
        rounding = (ref - plain_model(**args).sample).abs().max().item()
        effect = (ref - unadapted(**args).sample).abs().max().item()
    # The merged weights are rounded to bfloat16: their error must stay a tenth of what the adapter changes.
    assert rounding < 0.1 * effect


def test_from_pretrained_loads_tiny_saved_models(toy_models, tmp_path):
    """The Hugging Face loading path, on tiny models saved to disk (no download)."""
    m, enc, dec, _ = toy_models
    enc.model.save_pretrained(tmp_path / "enc")
    enc.processor.save_pretrained(tmp_path / "enc")
    dec.transformer.save_pretrained(tmp_path / "dec" / "transformer")
    dec.scheduler.save_pretrained(tmp_path / "dec" / "scheduler")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=3, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "dec" / "vae")
    enc2 = build_encoder({**m["encoder"], "pretrained": str(tmp_path / "enc")}, 32, "mask")
    dec2 = build_decoder({**m["decoder"], "pretrained": str(tmp_path / "dec"), "vae": True}, 32, "mask")
    for a, b in zip(enc.model.state_dict().values(), enc2.model.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        h, mask = enc.condition(["a red circle"])
        h2, _ = enc2.condition(["a red circle"])
    assert torch.allclose(h, h2)
    assert isinstance(dec2.scheduler, FlowMatchEulerDiscreteScheduler)
    assert dec2.latent_size(32) == 16
    x = torch.rand(2, 3, 32, 32)
    z = dec2.encode(x)
    assert z.shape == (2, 3, 16, 16) and dec2.decode(z).shape == (2, 3, 32, 32)


def test_the_empty_prompt_pooled_vector_is_sd3s_computed_once_and_cached(tmp_path, monkeypatch):
    """model.decoder.pooled=sd3_empty_prompt: equal to what diffusers' StableDiffusion3Pipeline.encode_prompt("")
    pools (the reference); the CLIP text encoders load once, later builds read the cache; a changed text-encoder
    checkpoint is recomputed."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from uae_lightning.models import build
    from uae_lightning.rehearsal import save_sd35_large

    sd3 = save_sd35_large(tmp_path / "sd3")
    monkeypatch.setenv("UAE_CACHE_DIR", str(tmp_path / "cache"))
    loads = []
    real = CLIPTextModelWithProjection.from_pretrained.__func__

    def counted(cls, *a, **k):
        loads.append(k.get("subfolder"))
        return real(cls, *a, **k)

    monkeypatch.setattr(CLIPTextModelWithProjection, "from_pretrained", classmethod(counted))
    first = build.empty_prompt_pooled(str(sd3))
    assert loads == ["text_encoder", "text_encoder_2"]
    again = build.empty_prompt_pooled(str(sd3))
    assert loads == ["text_encoder", "text_encoder_2"] and torch.equal(first, again)
    monkeypatch.undo()
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3, text_encoder_3=None, tokenizer_3=None)
    _, _, pooled, _ = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False)
    assert first.shape == pooled[0].shape and torch.allclose(first, pooled[0], atol=1e-6)
    assert first.abs().sum() > 0
    monkeypatch.setenv("UAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(CLIPTextModelWithProjection, "from_pretrained", classmethod(counted))
    weights = next((sd3 / "text_encoder").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    build.empty_prompt_pooled(str(sd3))
    assert len(loads) == 4


def test_an_empty_build_has_the_same_parameters_and_ties_as_the_loaded_one(tmp_path):
    """What a rank that receives its weights from rank 0 builds (models/build.py `empty`): the same state-dict keys,
    shapes and dtypes as the loaded models, parameters on the meta device, real rotary buffers, and tied weights
    still tied (accelerate's meta context unties them; two parameters where rank 0 has one desynchronise FSDP's
    all-gathers)."""
    from omegaconf import OmegaConf

    from uae_lightning.models.build import build_autoencoder
    from uae_lightning.rehearsal import save_qwen2_5_vl, save_sd35_large

    qwen, sd3 = save_qwen2_5_vl(tmp_path / "qwen"), save_sd35_large(tmp_path / "sd3")
    m = OmegaConf.to_container(compose_cfg(["+experiment=pretrain", f"model.encoder.pretrained={qwen}",
                                            f"model.decoder.pretrained={sd3}", "data.manifest=x",
                                            "model.decoder.pooled=zeros"]).model, resolve=True)
    full, empty = build_autoencoder(m, 64), build_autoencoder(m, 64, empty=True)
    for a, b in zip(full, empty):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all((sa[k].shape, sa[k].dtype) == (sb[k].shape, sb[k].dtype) for k in sa)
        assert all(p.is_meta for p in b.parameters()) and not any(p.is_meta for p in a.parameters())
    enc_full, enc_empty = full[0].model, empty[0].model
    assert enc_full.config.tie_word_embeddings
    assert enc_empty.lm_head.weight is enc_empty.get_input_embeddings().weight
    assert len(list(enc_empty.parameters())) == len(list(enc_full.parameters()))
    inv = dict(enc_empty.named_buffers())
    assert inv and all(not b.is_meta for b in inv.values())
