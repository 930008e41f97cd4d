"""The config values with a fixed set of choices, in a module that imports nothing heavy: the command line checks a
composed config (config.py) before torch, transformers or diffusers is imported, and the modules that implement the
choices take them from here, so each list is written once."""
from __future__ import annotations

ENCODER_ARCHITECTURES = ("toy", "qwen2_5_vl_3b")
DECODER_ARCHITECTURES = ("toy", "sd35_large")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
CONDITIONING_MODES = ("text", "in_context")
PADDING_MODES = ("mask", "pad")
PROMPT_POSITIONS = ("after_image", "before_image")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")
SIGMA_SAMPLINGS = ("scheduler", "density")
CONVENTIONS = ("flow_grpo", "gaussian")
ADVANTAGE_SCALES = ("group", "batch", "none")
LR_SCHEDULES = ("constant", "linear", "cosine")
LOSS_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
TOY_BACKBONES = ("toy_pixels", "toy_regions", "toy_palette", "toy_objects")
# The paper's Unified-Bench backbones: short name -> hub id. Config `backbone_sources` (conf/config.yaml) says where
# each short name loads from (a hub id or a local path).
PAPER_BACKBONES = {
    "clip": "openai/clip-vit-large-patch14",
    "dinov2": "facebook/dinov2-large",
    "dinov3": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "longclip": "BeichenZhang/LongCLIP-L",
}
