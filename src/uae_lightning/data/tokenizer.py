"""An offline word-level tokenizer for the toy world, wrapped in the real Qwen2.5-VL processor classes.

The special tokens and chat template mirror Qwen2.5-VL's, so the encoder code path is the one used at paper scale.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from uae_lightning.data.toy import vocabulary

PAD, EOS = "<|endoftext|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, "<|im_start|>", EOS, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Words of the chat roles and the prompts the toy uses, besides the captions' grammar.
PROMPT_WORDS = ["system", "user", "assistant", "generate", "describe", "this", "image", "<unk>", "\n", ".", ","]

# The Qwen2.5-VL template, reduced to what the toy uses: system-less chat, images in user turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + PROMPT_WORDS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"<\|[a-z_]+\|>|\n|[A-Za-z]+(?:-[A-Za-z]+)*|[^A-Za-z\s]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token=PAD,
        eos_token=EOS,
        extra_special_tokens={
            "im_start_token": "<|im_start|>",
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
    )


def build_toy_processor(resolution: int, patch_size: int, merge_size: int) -> Qwen2_5_VLProcessor:
    """Processor whose image budget is exactly one toy image: (resolution / patch / merge)^2 image tokens."""
    pixels = resolution * resolution
    common = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2)
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **common),
        video_processor=Qwen2VLVideoProcessor(size=size, **common),
        tokenizer=build_toy_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )
