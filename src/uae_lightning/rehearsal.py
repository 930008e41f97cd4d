"""Tiny random checkpoints in exactly the on-disk formats of the paper's models, for a dress rehearsal of the paper
presets without a download (tests/test_rehearsal.py runs the README's paper-scale commands on them).

    python -m uae_lightning.rehearsal /tmp/uae-rehearsal     # writes the folders below and prints them

    Qwen2.5-VL-3B-Instruct/               config.json, generation_config.json (the Instruct model's values),
                                          model.safetensors (bf16), tokenizer with Qwen's special tokens at their ids,
                                          Qwen's chat template, preprocessor_config.json (Qwen2VLImageProcessor)
    stable-diffusion-3.5-large/           model_index.json, transformer/, vae/ (16 latent channels, SD3.5's scaling and
                                          shift factors), scheduler/ (shift 3.0), text_encoder(_2)/ + tokenizer(_2)/
                                          (the CLIP-L and CLIP-G encoders that make the pooled projection)
    clip-vit-large-patch14/               CLIPModel + CLIPImageProcessor (resize 224, centre crop 224)
    dinov2-large/                         Dinov2Model + BitImageProcessor (resize 256, centre crop 224)
    dinov3-vitl16-pretrain-lvd1689m/      DINOv3ViTModel + DINOv3ViTImageProcessor (resize to 224 x 224)
    LongCLIP-L/longclip-L.pt              a raw PyTorch state dict in OpenAI-CLIP key layout, 248 text positions, no
                                          config.json (as the hub repository holds it)
    mask2former-swin-small-coco-instance/ Mask2FormerForUniversalSegmentation (Swin backbone, COCO's 80 classes,
                                          100 queries) + Mask2FormerImageProcessor: GenEval's detector
    data/train.jsonl, data/images/        a manifest of toy-world images with their long captions

Only sizes differ from the real checkpoints (widths, depths, vocabulary fillers); names, ids, file layouts, dtypes and
processor settings are the real ones. T5 (SD3's third text encoder) is left out: nothing here reads it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Qwen2.5's special tokens and their ids (tokenizer.json of Qwen2.5-VL-3B-Instruct).
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_VOCAB_SIZE = 151936
# Qwen2-VL / Qwen2.5-VL's chat template (chat_template.json of the Instruct checkpoints).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_VOCAB_SIZE = 49408  # <|startoftext|> 49406, <|endoftext|> 49407

# The directory names the fixture writes, keyed by the config value each one stands in for.
LAYOUT = {
    "Qwen/Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL-3B-Instruct",
    "stabilityai/stable-diffusion-3.5-large": "stable-diffusion-3.5-large",
    "openai/clip-vit-large-patch14": "clip-vit-large-patch14",
    "facebook/dinov2-large": "dinov2-large",
    "facebook/dinov3-vitl16-pretrain-lvd1689m": "dinov3-vitl16-pretrain-lvd1689m",
    "BeichenZhang/LongCLIP-L": "LongCLIP-L",
    "facebook/mask2former-swin-small-coco-instance": "mask2former-swin-small-coco-instance",
}


def byte_alphabet() -> list[str]:
    """The 256 characters byte-level BPE uses for the 256 bytes (GPT-2's mapping)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _filled_vocab(prefix: list[str], size: int, filler: str) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(prefix)}
    i = 0
    while len(vocab) < size:
        vocab.setdefault(f"{filler}{i}", len(vocab))
        i += 1
    return vocab


def qwen_tokenizer():
    """Byte-level BPE (no merges: every byte is a token) whose special tokens sit at Qwen2.5's real ids."""
    from transformers import Qwen2Tokenizer

    vocab = _filled_vocab(byte_alphabet(), QWEN_FIRST_SPECIAL_ID, "x")
    vocab.update({t: QWEN_FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN_SPECIAL)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", errors="replace", clean_up_tokenization_spaces=False,
                         model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    got = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    want = {t: QWEN_FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN_SPECIAL)}
    if got != want:
        raise RuntimeError(f"special token ids differ from Qwen2.5's: {got}")
    return tok


def save_qwen2_5_vl(path: Path, hidden: int = 64, layers: int = 2, vision_hidden: int = 32) -> Path:
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 4
    half = hidden // heads // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=QWEN_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                         bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           window_size=112, fullatt_block_indexes=[1], hidden_act="silu"),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    # generation_config.json as Qwen2.5-VL-3B-Instruct ships it (near-greedy: the pipeline must override it).
    model.generation_config = GenerationConfig(bos_token_id=151643, pad_token_id=151654, do_sample=True,
                                               eos_token_id=[151645, 151643], repetition_penalty=1.05,
                                               temperature=0.1, top_p=0.001, top_k=1)
    model.save_pretrained(path)
    # The processor files the hub repository holds: preprocessor_config.json, chat_template.json and the tokenizer.
    qwen_tokenizer().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2))
    return path


def save_clip_tokenizer(path: Path, pad_token: str = "<|endoftext|>") -> None:
    """CLIP's BPE tokenizer files (vocab.json, merges.txt): the byte alphabet, its end-of-word forms, fillers up to
    CLIP's 49408 entries, and the start/end tokens at their real ids."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    vocab = _filled_vocab(chars + [c + "</w>" for c in chars], CLIP_VOCAB_SIZE - 2, "x")
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), pad_token=pad_token,
                        model_max_length=77)
    tok.save_pretrained(path)


def save_sd35_large(path: Path, width: int = 32, layers: int = 2) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    projection = 16  # CLIP-L 768 + CLIP-G 1280 = 2048 in the real model; pooled_projection_dim is their sum
    SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                          attention_head_dim=width // 2, num_attention_heads=2, joint_attention_dim=64,
                          caption_projection_dim=width, pooled_projection_dim=2 * projection, pos_embed_max_size=192,
                          qk_norm="rms_norm").to(torch.bfloat16).save_pretrained(path / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32, 32, 32, 32],
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  layers_per_block=1, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                  use_post_quant_conv=False, sample_size=1024).to(torch.bfloat16).save_pretrained(path / "vae")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(path / "scheduler")
    for i, (enc, tok, pad) in enumerate((("text_encoder", "tokenizer", "<|endoftext|>"),
                                         ("text_encoder_2", "tokenizer_2", "!"))):
        cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                             projection_dim=projection, hidden_act="quick_gelu" if i == 0 else "gelu",
                             bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=1)
        CLIPTextModelWithProjection(cfg).to(torch.float16).save_pretrained(path / enc)
        save_clip_tokenizer(path / tok, pad)
    import diffusers

    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": [None, None], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "tokenizer_3": [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return path


def save_clip(path: Path, width: int = 64) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(1)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=14, hidden_act="quick_gelu")
    text = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(path)
    return path


def save_dinov2(path: Path, width: int = 64) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                             num_attention_heads=2, image_size=518, patch_size=14)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                      do_center_crop=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(path)
    return path


def save_dinov3(path: Path, width: int = 64) -> Path:
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    torch.manual_seed(3)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                   num_attention_heads=2, patch_size=16, num_register_tokens=4,
                                   layerscale_value=1.0)).save_pretrained(path)
    DINOv3ViTImageProcessor(size={"height": 224, "width": 224}, resample=2, image_mean=IMAGENET_MEAN,
                            image_std=IMAGENET_STD).save_pretrained(path)
    return path


def save_mask2former(path: Path, width: int = 16, queries: int = 100, boost: int | None = None) -> Path:
    """GenEval's detector: Mask2Former with a Swin backbone for COCO instance segmentation (80 classes, the label
    order of GenEval's object_names.txt). `boost`: a class whose logit is raised by 12, so that a random model
    detects it above GenEval's thresholds (for tests)."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)

    torch.manual_seed(5)
    backbone = SwinConfig(image_size=384, patch_size=4, embed_dim=width, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=80, num_queries=queries, hidden_dim=2 * width,
                               mask_feature_size=2 * width, feature_size=2 * width, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, dim_feedforward=4 * width, encoder_feedforward_dim=4 * width)
    model = Mask2FormerForUniversalSegmentation(config)
    if boost is not None:
        with torch.no_grad():
            model.class_predictor.bias[boost] += 12.0
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 1333}, size_divisor=32, num_labels=80,
                              ignore_index=255, reduce_labels=True).save_pretrained(path)
    return path


def openai_clip_state_dict(width: int = 64, layers: int = 2, text_width: int = 64, embed: int = 32,
                           text_positions: int = 248, seed: int = 4) -> dict[str, torch.Tensor]:
    """A random CLIP ViT-L/14-shaped state dict in OpenAI's key layout, as LongCLIP saves it (248 text positions
    and the `positional_embedding_res` of its positional interpolation)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def blocks(prefix: str, w: int, n: int) -> dict[str, torch.Tensor]:
        sd = {}
        for i in range(n):
            p = f"{prefix}.resblocks.{i}."
            sd.update({p + "attn.in_proj_weight": rand(3 * w, w), p + "attn.in_proj_bias": rand(3 * w),
                       p + "attn.out_proj.weight": rand(w, w), p + "attn.out_proj.bias": rand(w),
                       p + "ln_1.weight": 1 + rand(w), p + "ln_1.bias": rand(w),
                       p + "mlp.c_fc.weight": rand(4 * w, w), p + "mlp.c_fc.bias": rand(4 * w),
                       p + "mlp.c_proj.weight": rand(w, 4 * w), p + "mlp.c_proj.bias": rand(w),
                       p + "ln_2.weight": 1 + rand(w), p + "ln_2.bias": rand(w)})
        return sd

    grid = 224 // 14
    sd = {"visual.class_embedding": rand(width), "visual.positional_embedding": rand(grid * grid + 1, width),
          "visual.proj": rand(width, embed), "visual.conv1.weight": rand(width, 3, 14, 14, std=0.2),
          "visual.ln_pre.weight": 1 + rand(width), "visual.ln_pre.bias": rand(width),
          "visual.ln_post.weight": 1 + rand(width), "visual.ln_post.bias": rand(width),
          **blocks("visual.transformer", width, layers),
          "token_embedding.weight": rand(CLIP_VOCAB_SIZE, text_width),
          "positional_embedding": rand(text_positions, text_width),
          "positional_embedding_res": rand(text_positions, text_width),
          "ln_final.weight": 1 + rand(text_width), "ln_final.bias": rand(text_width),
          "text_projection": rand(text_width, embed), "logit_scale": torch.tensor(4.6052),
          **blocks("transformer", text_width, 1)}
    return sd


def save_longclip(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(openai_clip_state_dict(), path / "longclip-L.pt")
    return path


def save_manifest(path: Path, n: int = 24, resolution: int = 64, seed: int = 0) -> Path:
    """Toy-world images (PNG) with their complete long captions, listed in train.jsonl."""
    from uae_lightning.data import toy

    lines = []
    (path / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = toy.make_scene(seed, i)
        name = f"images/{i:04d}.png"
        toy.render(scene, resolution).save(path / name)
        lines.append(json.dumps({"path": name, "caption": toy.caption(scene, "complete")}))
    (path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return path / "train.jsonl"


def write_fixture(root: str | Path) -> dict[str, Path]:
    """Write every checkpoint and the manifest under `root`; returns {real id or "manifest": local path}."""
    root = Path(root)
    writers = {"Qwen/Qwen2.5-VL-3B-Instruct": save_qwen2_5_vl, "stabilityai/stable-diffusion-3.5-large": save_sd35_large,
               "openai/clip-vit-large-patch14": save_clip, "facebook/dinov2-large": save_dinov2,
               "facebook/dinov3-vitl16-pretrain-lvd1689m": save_dinov3, "BeichenZhang/LongCLIP-L": save_longclip,
               "facebook/mask2former-swin-small-coco-instance": save_mask2former}
    paths = {name: write(root / LAYOUT[name]) for name, write in writers.items()}
    paths["manifest"] = save_manifest(root / "data")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m uae_lightning.rehearsal", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write the tiny checkpoints and the manifest into")
    args = p.parse_args(argv)
    for name, path in write_fixture(args.out).items():
        print(f"{name:45s} {path}")


if __name__ == "__main__":
    main()
