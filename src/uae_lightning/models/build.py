"""Build the encoder, connector and decoder from config: tiny random toy models, random models of the paper's
architectures (for shape tests and GPU benchmarks), or Hugging Face checkpoints by id or local path.

All three routes construct the same classes (Qwen2_5_VLForConditionalGeneration, SD3Transformer2DModel,
AutoencoderKL, FlowMatchEulerDiscreteScheduler), so the toy run exercises the paper-scale code paths.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import AutoConfig, AutoProcessor, GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from uae_lightning.choices import DECODER_ARCHITECTURES, DTYPE_NAMES, ENCODER_ARCHITECTURES
from uae_lightning.data.tokenizer import build_toy_processor
from uae_lightning.models.connector import Connector
from uae_lightning.models.decoder import Decoder
from uae_lightning.models.encoder import Encoder

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # "float32" -> torch.float32, ...

# Qwen2.5-VL-3B-Instruct's published config (hidden 2048), for random-initialised paper-size models.
QWEN25_VL_3B = dict(
    text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=True,
)
# SD3.5-large's MMDiT (8.06 B parameters) and VAE configs.
SD35_LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                              attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                              caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                              qk_norm="rms_norm")
SD35_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r}; expected one of {list(DTYPES)}")
    return DTYPES[name]


def toy_encoder_config(tiny: dict[str, Any], tokenizer) -> Qwen2_5_VLConfig:
    h, heads = tiny["hidden_size"], tiny["num_heads"]
    half = h // heads // 2  # mrope sections (temporal, height, width) must add up to head_dim / 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=4 * h,
                         num_hidden_layers=tiny["num_layers"], num_attention_heads=heads,
                         num_key_value_heads=tiny["num_kv_heads"], max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.pad_token_id, initializer_range=tiny["init_std"]),
        vision_config=dict(depth=tiny["vision_depth"], hidden_size=tiny["vision_hidden_size"],
                           intermediate_size=2 * tiny["vision_hidden_size"], num_heads=tiny["vision_num_heads"],
                           patch_size=tiny["patch_size"], spatial_merge_size=tiny["merge_size"], temporal_patch_size=2,
                           out_hidden_size=h, window_size=tiny["patch_size"] * tiny["merge_size"] * 4,
                           fullatt_block_indexes=list(range(tiny["vision_depth"])), initializer_range=tiny["init_std"]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        # Untied: the output head is not on the text path that conditions the decoder, so the toy captioner can
        # train it (a frozen random head caps the logits near +-1 and the captioner could never be confident).
        tie_word_embeddings=False,
        initializer_range=tiny["init_std"],
    )


@contextmanager
def weightless(empty: bool):
    """With `empty`, models built inside have their parameters on the meta device (no memory, no initialisation,
    no read) while buffers stay real: rotary frequencies and other non-persistent buffers are computed as usual."""
    if not empty:
        yield
        return
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def build_encoder(cfg: dict, resolution: int, condition_padding: str, empty: bool = False) -> Encoder:
    """`cfg` is `model.encoder`: `pretrained` (id or path) wins; otherwise `architecture` builds random weights.
    `empty`: the same model without weights (`weightless`), for a rank that receives them from rank 0."""
    dtype = _dtype(cfg["dtype"], "model.encoder.dtype")
    if cfg.get("pretrained"):
        processor = AutoProcessor.from_pretrained(cfg.get("processor") or cfg["pretrained"])
        if empty:
            with weightless(True):
                model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(cfg["pretrained"]),
                                                                         dtype=dtype)
            try:  # what from_pretrained would attach: the checkpoint's sampling defaults
                model.generation_config = GenerationConfig.from_pretrained(cfg["pretrained"])
            except OSError:  # the checkpoint has no generation_config.json
                model.generation_config = GenerationConfig.from_model_config(model.config)
        else:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg["pretrained"], dtype=dtype)
    elif cfg["architecture"] == "toy":
        tiny = cfg["tiny"]
        processor = build_toy_processor(resolution, tiny["patch_size"], tiny["merge_size"])
        with weightless(empty):
            model = Qwen2_5_VLForConditionalGeneration(toy_encoder_config(tiny, processor.tokenizer)).to(dtype)
    elif cfg["architecture"] == "qwen2_5_vl_3b":
        processor = build_toy_processor(resolution, 14, 2)  # no download: the toy vocabulary is a subset of ids
        with weightless(empty):
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_3B)).to(dtype)
    else:
        raise ValueError(f"model.encoder.architecture={cfg['architecture']!r}; expected one of {ENCODER_ARCHITECTURES}")
    if empty:
        # accelerate's meta context re-creates every parameter as it is registered, which unties tied weights (the
        # 3B model's lm_head / embed_tokens): tie them again, or FSDP would shard two parameters where rank 0 has one.
        model.tie_weights()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    set_image_budget(processor, cfg.get("min_pixels"), cfg.get("max_pixels"))
    return Encoder(
        model, processor, prompt=cfg["prompt"], generate_role=cfg["generate_role"], conditioning=cfg["conditioning"],
        condition_padding=condition_padding, max_condition_tokens=cfg["max_condition_tokens"],
        prompt_position=cfg.get("prompt_position", "after_image"), generation_prompt=cfg.get("generation_prompt", False),
    )


def set_image_budget(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """The captioner's image budget. Set on the loaded image processor, since a `min_pixels` / `max_pixels` in the
    checkpoint's preprocessor_config.json wins over a `size` passed to `from_pretrained`."""
    if min_pixels is None and max_pixels is None:
        return
    size = dict(processor.image_processor.size)
    size = {"shortest_edge": min_pixels or size.get("shortest_edge"), "longest_edge": max_pixels or size.get("longest_edge")}
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"model.encoder.min_pixels={size['shortest_edge']} > max_pixels={size['longest_edge']}")
    processor.image_processor.size = size


def _pooled(cfg: dict, dim: int) -> torch.Tensor:
    """The frozen pooled projection (PAPER.md: SD3.5's CLIP-L+G pooled embedding of the empty prompt)."""
    spec = cfg["pooled"]
    if spec == "zeros":
        return torch.zeros(dim)
    if spec == "sd3_empty_prompt":
        return empty_prompt_pooled(cfg["pretrained"])
    path = Path(spec)
    if (path / "config.json").is_file():  # an export's decoder/pooled (models/pooled.PooledProjection)
        from uae_lightning.models.pooled import PooledProjection

        vec = PooledProjection.from_pretrained(path).vector
    elif path.is_file():
        vec = torch.load(path, map_location="cpu").reshape(-1)
    else:
        raise ValueError(f"model.decoder.pooled={spec!r}: expected 'zeros', 'sd3_empty_prompt', a .pt file or an "
                         "export's decoder/pooled folder")
    vec = vec.reshape(-1)
    if vec.numel() != dim:
        raise ValueError(f"model.decoder.pooled: {path} holds {vec.numel()} values; the decoder expects {dim}")
    return vec


TEXT_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def cache_dir() -> Path:
    """Where computed constants are kept: $UAE_CACHE_DIR, else ~/.cache/uae_lightning."""
    return Path(os.environ.get("UAE_CACHE_DIR") or Path.home() / ".cache" / "uae_lightning")


def empty_prompt_pooled(pretrained: str) -> torch.Tensor:
    """SD3's pooled embedding of the empty prompt (CLIP-L and CLIP-G text encoders, concatenated), computed once per
    text-encoder checkpoint and cached: the text encoders (float32, ~0.8 B parameters) are loaded by the first process
    only; the others (every rank, every stage) read a 2048-value file. The cache key is the checkpoint's resolved
    text-encoder and tokenizer files (paths, sizes, modification times), so a changed checkpoint is recomputed."""
    import fcntl
    import hashlib
    import json

    from transformers.utils import cached_file

    files = []
    for enc, tok in TEXT_ENCODERS:
        for sub in (enc, tok):
            name = "config.json" if sub == enc else "tokenizer_config.json"
            folder = Path(cached_file(pretrained, name, subfolder=sub)).parent
            files += [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())
                      if f.is_file()]
    key = hashlib.sha1(json.dumps(files).encode()).hexdigest()[:20]
    path = cache_dir() / f"sd3_empty_prompt_pooled-{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process per node computes; the others wait, then read
        if path.is_file():
            return torch.load(path, map_location="cpu")
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts = []
        for enc, tok in TEXT_ENCODERS:
            tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder=tok)
            model = CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder=enc)
            ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
            with torch.no_grad():
                parts.append(model(ids).text_embeds[0])
            del model
        vec = torch.cat(parts)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save(vec, tmp)
        tmp.replace(path)
        return vec


def build_decoder(cfg: dict, resolution: int, condition_padding: str, empty: bool = False) -> Decoder:
    """`cfg` is `model.decoder` (`empty`: as in build_encoder)."""
    dtype = _dtype(cfg["dtype"], "model.decoder.dtype")
    if cfg.get("pretrained"):
        p = cfg["pretrained"]
        if empty:
            with weightless(True):
                transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(p, subfolder="transformer")).to(dtype)
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(p, subfolder="vae")).to(dtype) if cfg["vae"] else None
        else:
            transformer = SD3Transformer2DModel.from_pretrained(p, subfolder="transformer", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(p, subfolder="vae", torch_dtype=dtype) if cfg["vae"] else None
        # model.decoder.shift wins over the checkpoint's (paper preset: 3.0, as SD3.5-large ships)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(p, subfolder="scheduler", shift=cfg["shift"])
    elif cfg["architecture"] == "toy":
        t = cfg["tiny"]
        vae = None
        if cfg["vae"]:
            raise ValueError("model.decoder.vae=true needs model.decoder.pretrained (the toy decoder works in pixels)")
        with weightless(empty):
            transformer = SD3Transformer2DModel(
                sample_size=resolution, patch_size=t["patch_size"], in_channels=3, out_channels=3,
                num_layers=t["num_layers"], attention_head_dim=t["head_dim"], num_attention_heads=t["num_heads"],
                joint_attention_dim=t["joint_attention_dim"], caption_projection_dim=t["head_dim"] * t["num_heads"],
                pooled_projection_dim=t["pooled_projection_dim"], pos_embed_max_size=resolution // t["patch_size"],
            )
        transformer = transformer if dtype == torch.float32 else transformer.to(dtype)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg["shift"])
    elif cfg["architecture"] == "sd35_large":
        with weightless(empty):
            transformer = SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER).to(dtype)
            vae = AutoencoderKL(**SD35_VAE).to(dtype) if cfg["vae"] else None
        scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg["shift"])
    else:
        raise ValueError(f"model.decoder.architecture={cfg['architecture']!r}; expected one of {DECODER_ARCHITECTURES}")
    pooled = _pooled(cfg, transformer.config.pooled_projection_dim)
    return Decoder(transformer, scheduler, vae, pooled, mask_condition=condition_padding == "mask")


def build_connector(cfg: dict, encoder: Encoder, decoder: Decoder, empty: bool = False) -> Connector:
    """Sizes come from the two models: encoder hidden size in, decoder joint_attention_dim out."""
    with weightless(empty):
        return Connector(encoder.hidden_size, decoder.joint_attention_dim, cfg["hidden_multiplier"])


def build_autoencoder(cfg: dict, resolution: int, empty: bool = False) -> tuple[Encoder, Connector, Decoder]:
    """The three models of a `model:` config (random init unless `pretrained` paths are set). `empty`: without
    weights (parameters on the meta device), for a rank that receives them from rank 0 (models/fsdp.py).

    A random init is drawn from `model.seed` alone, independent of everything seeded before: every build of a config
    is the same model, so a stage output that holds only what its stage trained (models/weights.py) loads onto the
    same untrained weights the stage started from."""
    padding = cfg["condition_padding"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        encoder = build_encoder(cfg["encoder"], resolution, padding, empty)
        decoder = build_decoder(cfg["decoder"], resolution, padding, empty)
        return encoder, build_connector(cfg["connector"], encoder, decoder, empty), decoder
