"""The encoder (image understanding): a Qwen2.5-VL LVLM that captions images and encodes text for the decoder.

PAPER.md "Architecture": the decoder is conditioned on `hidden_states[-1]` (after the final norm) of every token of
a text-only chat message with the role "generate". The caption *text* is the bottleneck between the two models.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from uae_lightning.choices import CONDITIONING_MODES, PADDING_MODES, PROMPT_POSITIONS
from uae_lightning.models.conditioning import condition, generate_message
from uae_lightning.models.fsdp import gathered


@dataclass
class Captions:
    """Sampled captions: `sequences` = prompt + completion ids, `completion_mask` marks completion tokens up to and
    including EOS; `texts` are the decoded completions."""

    texts: list[str]
    sequences: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    prompt_inputs: dict


class Encoder(nn.Module):
    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: Qwen2_5_VLProcessor,
        prompt: str = "describe this image",
        generate_role: str = "generate",
        conditioning: str = "text",
        condition_padding: str = "mask",
        max_condition_tokens: int = 512,
        prompt_position: str = "after_image",
        generation_prompt: bool = False,
    ):
        super().__init__()
        if prompt_position not in PROMPT_POSITIONS:
            raise ValueError(f"model.encoder.prompt_position={prompt_position!r}; expected one of {PROMPT_POSITIONS}")
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"model.encoder.conditioning={conditioning!r}; expected one of {CONDITIONING_MODES}")
        if condition_padding not in PADDING_MODES:
            raise ValueError(f"model.encoder.condition_padding={condition_padding!r}; expected one of {PADDING_MODES}")
        self.model = model
        self.processor = processor
        self.prompt = prompt
        self.generate_role = generate_role
        self.conditioning = conditioning
        self.condition_padding = condition_padding
        self.max_condition_tokens = max_condition_tokens
        self.prompt_position = prompt_position
        self.generation_prompt = generation_prompt
        # Vision placeholders are never part of a caption: the policy cannot sample them (and its log-probs, below,
        # are those of the same restricted distribution).
        cfg = model.config
        self.suppressed_ids = [i for i in (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                           cfg.vision_end_token_id) if i is not None]
        self.eos_ids = stop_ids(model.generation_config, processor.tokenizer)
        # Sampling must be what the policy log-probs score. A checkpoint's generation_config.json fills every knob
        # that `generate` is not given (Qwen2.5-VL-3B-Instruct ships repetition_penalty 1.05, top_k 1, top_p 0.001,
        # temperature 0.1), so only the token ids are kept from it; `caption` sets every sampling knob explicitly.
        model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=processor.tokenizer.pad_token_id,
            bos_token_id=model.generation_config.bos_token_id)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ---- understanding: image -> caption -------------------------------------------------------------------------
    def _images_for_processor(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [(img.clamp(0, 1) * 255).round().to(torch.uint8).cpu() for img in images]

    def caption_prompt(self) -> str:
        """The captioning chat turn, rendered: one user message holding the image and the prompt text (in
        `prompt_position` order; the official UAE inference puts the text first), then the opened assistant turn."""
        image, text = {"type": "image"}, {"type": "text", "text": self.prompt}
        content = [image, text] if self.prompt_position == "after_image" else [text, image]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)

    def caption_inputs(self, images: torch.Tensor) -> dict:
        """Processor inputs for the captioning prompt of a batch of images (float [B,3,H,W] in [0,1])."""
        inputs = self.processor(
            text=[self.caption_prompt()] * len(images), images=self._images_for_processor(images), return_tensors="pt",
            padding=True,
        )
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor,
        num_return_sequences: int = 1,
        do_sample: bool = True,
        temperature: float = 0.7,
        max_new_tokens: int = 512,
    ) -> Captions:
        """Sample (or greedily decode) captions with the KV cache; returns ids, masks and texts."""
        inputs = self.caption_inputs(images)
        tok = self.tokenizer
        with gathered(self.model):  # under FSDP: one all-gather per unit, not one per generated token
            out = self.model.generate(**inputs, **self.sampling_kwargs(do_sample, temperature, max_new_tokens),
                                      num_return_sequences=num_return_sequences, use_cache=True)
        prompt_len = inputs["input_ids"].shape[1]
        completion = out[:, prompt_len:]
        is_eos = torch.isin(completion, torch.tensor(self.eos_ids, device=completion.device))
        # Keep tokens up to and including the first stop token (any of the checkpoint's EOS ids).
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        mask = ~after_eos
        texts = [" ".join(t.split()) for t in tok.batch_decode(completion.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)]
        return Captions(texts, out, prompt_len, mask, inputs)

    def sampling_kwargs(self, do_sample: bool, temperature: float, max_new_tokens: int) -> dict:
        """The whole sampling distribution, stated: pure temperature sampling (no top-k/top-p/repetition penalty),
        vision placeholders suppressed -- exactly what `completion_logprobs` scores. Greedy when not sampling."""
        knobs = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else {}
        return dict(do_sample=do_sample, **knobs, repetition_penalty=1.0, no_repeat_ngram_size=0,
                    max_new_tokens=max_new_tokens, suppress_tokens=self.suppressed_ids, eos_token_id=self.eos_ids,
                    pad_token_id=self.tokenizer.pad_token_id)

    def completion_logprobs(self, captions: Captions, temperature: float) -> torch.Tensor:
        """log pi(token | image, prompt, previous tokens) of every completion token ([N, T]; masked by
        `captions.completion_mask`), from one teacher-forced forward pass with gradients."""
        from uae_lightning.rl.grpo import token_logprobs

        p = captions.prompt_length
        completion = captions.sequences[:, p:]
        inputs = dict(captions.prompt_inputs)
        attention = torch.cat([inputs.pop("attention_mask"), captions.completion_mask.long()], 1)
        inputs.pop("input_ids")
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], 1)
        # The output head runs on the completion positions only (the prompt holds the image tokens: at paper scale
        # hundreds of positions x a 152k vocabulary of logits that nothing reads).
        logits = self.model(input_ids=captions.sequences, attention_mask=attention, **inputs,
                            logits_to_keep=completion.shape[1] + 1).logits[:, :-1]
        logits = logits.index_fill(-1, torch.tensor(self.suppressed_ids, device=logits.device), float("-inf"))
        return token_logprobs(logits, completion, temperature)

    @contextmanager
    def adapter_disabled(self):
        """The encoder without its LoRA adapter (the GRPO reference model), if it has one."""
        from uae_lightning.models.lora import set_adapters_enabled

        set_adapters_enabled(self.model, False)
        try:
            yield
        finally:
            set_adapters_enabled(self.model, True)

    # ---- conditioning: text -> decoder input ---------------------------------------------------------------------
    def generate_message(self, text: str) -> str:
        """The text-only conditioning message, rendered (models/conditioning.py)."""
        return generate_message(self.processor, text, self.generate_role, self.generation_prompt)

    def condition(self, texts: list[str], images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states for the decoder and their mask ([B,L,H], [B,L] bool).

        `text` mode (default, the text bottleneck): a text-only "generate" message per text.
        `in_context` mode: the caption's hidden states from a pass that also sees `images` — this leaks image
        information past the caption text, so it is never the Unified-Bench default.
        """
        if self.conditioning == "in_context":
            if images is None:
                raise ValueError("model.encoder.conditioning='in_context' needs the source images")
            return self._condition_in_context(texts, images)
        with gathered(self.model):  # the inner model is called directly: its root parameters must be gathered
            return condition(self.model, self.processor, texts, self.generate_role, self.generation_prompt,
                             self.condition_padding, self.max_condition_tokens)

    def _condition_in_context(self, texts: list[str], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.caption_inputs(images)
        tok = self.tokenizer
        cap = tok([t + tok.eos_token for t in texts], return_tensors="pt", padding="longest", padding_side="right",
                  truncation=True, max_length=self.max_condition_tokens).to(self.model.device)
        ids = torch.cat([inputs["input_ids"], cap.input_ids], 1)
        att = torch.cat([inputs["attention_mask"], cap.attention_mask], 1)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(cap.input_ids)], 1)
        with gathered(self.model):
            hidden = self.model.model(input_ids=ids, attention_mask=att, **extra).last_hidden_state
        n = cap.input_ids.shape[1]
        return hidden[:, -n:], cap.attention_mask.bool()


def stop_ids(generation_config: GenerationConfig, tokenizer) -> list[int]:
    """Every id that ends a caption: the checkpoint's EOS ids (Qwen2.5-VL ships two, <|im_end|> and <|endoftext|>)
    and the tokenizer's EOS."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({*ids, tokenizer.eos_token_id})
