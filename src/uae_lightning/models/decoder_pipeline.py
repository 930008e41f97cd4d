"""The decoder half of a trained auto-encoder as a diffusers pipeline: caption text -> image.

An export's `decoder/` folder (written by `UAEPipeline.save_pretrained`) is this pipeline's `save_pretrained` layout
— model_index.json plus one folder per component — with the code it runs beside it, the way diffusers lays out
remote-code components: this file as `pipeline.py`, the two files it imports (`decoder.py`, `conditioning.py`) next to
it, and each custom component's class in its own folder (`connector/connector.py`, `pooled/pooled.py`). It loads with
diffusers' own entry point in a process that never imports uae_lightning, or where it is not installed:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("export/decoder", custom_pipeline="export/decoder", trust_remote_code=True)
    images = pipe(["a red circle top left"], seeds=[0]).images          # PIL images

so this file, like the ones it imports, uses only torch, transformers and diffusers, and relative imports.

Components: `text_encoder` (Qwen2.5-VL, base weights) and `processor` condition the DiT the way training did (a
text-only "generate" message; its hidden states), `connector` maps them to the DiT's width, `pooled` is the DiT's
fixed pooled projection, `transformer` / `scheduler` / `vae` are SD3's. The masked joint attention of training
(conditioning padding never attended) is installed on the transformer when the pipeline is built. With the same
caption and seed an image equals `UAEPipeline.generate`'s.

The stock `StableDiffusion3Pipeline` also runs on the exported parts given our embeddings: see `sd3_inputs`.
"""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .conditioning import condition
from .decoder import Decoder


class UAEDecoderPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->connector->transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, text_encoder, processor, connector, pooled, transformer, scheduler, vae=None,
                 generate_role: str = "generate", generation_prompt: bool = False, max_condition_tokens: int = 512,
                 condition_padding: str = "mask", resolution: int = 1024, num_steps: int = 28,
                 guidance_scale: float = 1.0, negative_prompt: str = ""):
        super().__init__()
        self.register_modules(text_encoder=text_encoder, processor=processor, connector=connector, pooled=pooled,
                              transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(generate_role=generate_role, generation_prompt=generation_prompt,
                                max_condition_tokens=max_condition_tokens, condition_padding=condition_padding,
                                resolution=resolution, num_steps=num_steps, guidance_scale=guidance_scale,
                                negative_prompt=negative_prompt)
        # The training-time sampler around the same modules (no copies).
        self._decoder = Decoder(transformer, scheduler, vae, pooled.vector, mask_condition=condition_padding == "mask")

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """Initial noise, one CPU generator per seed (the same draw on any device)."""
        return self._decoder.seeded_noise(seeds, self.config.resolution)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The DiT's conditioning of each prompt: connector(hidden states of the generate message), and its mask."""
        c = self.config
        hidden, mask = condition(self.text_encoder, self.processor, prompts, c.generate_role, c.generation_prompt,
                                 c.condition_padding, c.max_condition_tokens)
        return self.connector(hidden), mask

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], seeds: list[int] | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str | None = None,
                 output_type: str = "pil") -> ImagePipelineOutput:
        """Images for `prompt` (image i starts from the noise of seeds[i], default 0, 1, ...); the steps, CFG scale and
        negative prompt default to the run's. `output_type`: "pil", "np" or "pt" (float [B,3,H,W] in [0,1])."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        c = self.config
        scale = c.guidance_scale if guidance_scale is None else guidance_scale
        cond, mask = self.encode_prompt(prompts)
        negative = None
        if scale != 1.0:
            negative = self.encode_prompt([c.negative_prompt if negative_prompt is None else negative_prompt] * len(prompts))
        device = self.connector.device
        self._decoder.to(device)  # its pooled buffer
        latents = self._decoder.sample(cond, mask, self.noise(seeds).to(device), num_inference_steps or c.num_steps,
                                       scale, negative)
        images = self._decoder.decode(latents).cpu()
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        arrays = images.permute(0, 2, 3, 1).float().numpy()
        return ImagePipelineOutput(images=arrays if output_type == "np" else self.numpy_to_pil(arrays))

    def sd3_inputs(self, prompts: list[str]) -> dict:
        """Keyword arguments under which diffusers' stock StableDiffusion3Pipeline, built from this pipeline's
        transformer, scheduler and vae, draws these prompts: our embeddings for its text encoders'."""
        cond, _ = self.encode_prompt(prompts)
        pooled = self.pooled.vector.to(cond.dtype).expand(len(prompts), -1)
        return {"prompt_embeds": cond, "pooled_prompt_embeds": pooled}
