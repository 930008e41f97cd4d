"""How a text conditions the decoder (PAPER.md "Conditioning sequence"): the text as a chat message with its own role,
rendered by the encoder's chat template, and the language model's last hidden states of every token of it.

This file imports only torch: an export's decoder/ folder ships it beside its pipeline.py, so the exported decoder
conditions exactly as training did where this package is not installed (models/encoder.py calls it too).
"""
from __future__ import annotations

import torch


def generate_message(processor, text: str, role: str, generation_prompt: bool) -> str:
    """The text-only conditioning message (role `role`), rendered; with `generation_prompt` it ends with the opened
    assistant turn, as the official UAE inference renders it (add_generation_prompt=True)."""
    return processor.apply_chat_template([{"role": role, "content": [{"type": "text", "text": text}]}], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def condition(model, processor, texts: list[str], role: str, generation_prompt: bool, padding: str,
              max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of each text's message ([B, L, H], after the final norm) and the mask of the tokens the decoder
    attends ([B, L] bool). `padding`: "mask" pads to the longest message and masks the pads; "pad" pads to
    `max_tokens` and lets the decoder attend them (the official release). Messages are cut at `max_tokens`.
    `model` is a Qwen2.5-VL model (its `.model` is the inner model whose last hidden states condition)."""
    pad_to_max = padding == "pad"
    enc = processor.tokenizer([generate_message(processor, t, role, generation_prompt) for t in texts],
                              return_tensors="pt", padding="max_length" if pad_to_max else "longest", truncation=True,
                              max_length=max_tokens, padding_side="right").to(model.device)
    hidden = model.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    mask = enc.attention_mask.bool()
    if pad_to_max:  # the official release lets the decoder attend the pad tokens
        mask = torch.ones_like(mask)
    return hidden, mask
