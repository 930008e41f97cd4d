"""The decoder (image generation): SD3 MMDiT + optional VAE + flow-matching scheduler, conditioned on the connector.

PAPER.md "Stage 1": z_t = (1 - t) z0 + t eps, target = eps - z0. The connector output replaces SD3's text
embeddings; the pooled projection is a frozen vector (buffer `pooled`).
With `vae=None` the decoder works in pixel space (z = 2x - 1): the toy world's documented choice, since a tiny
random VAE cannot reconstruct anything.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn

from uae_lightning.models.attention import MaskedJointAttnProcessor
from uae_lightning.models.flow import euler_step


class Decoder(nn.Module):
    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL | None,
        pooled: torch.Tensor,
        mask_condition: bool = True,
    ):
        super().__init__()
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae = vae
        self.register_buffer("pooled", pooled.reshape(-1).float(), persistent=True)
        self.mask_condition = mask_condition
        if mask_condition:
            transformer.set_attn_processor(MaskedJointAttnProcessor())

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def joint_attention_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    def latent_size(self, resolution: int) -> int:
        if self.vae is None:
            return resolution
        return resolution // (2 ** (len(self.vae.config.block_out_channels) - 1))

    def seeded_noise(self, seeds: list[int], resolution: int) -> torch.Tensor:
        """Initial noise at `resolution`, one CPU generator per seed: an image's draw depends only on its seed, not
        on its batch, rank or device (on CPU; move it where it is used)."""
        size = self.latent_size(resolution)
        return torch.stack([torch.randn(self.latent_channels, size, size, generator=torch.Generator().manual_seed(s))
                            for s in seeds])

    # ---- latents <-> images -------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] -> z0 (scaled and shifted by the VAE config, PAPER.md stage 1)."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample()
        shift = self.vae.config.shift_factor or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            shift = self.vae.config.shift_factor or 0.0
            z = self.vae.decode((z / self.vae.config.scaling_factor + shift).to(self.vae.dtype)).sample.float()
        return ((z + 1) / 2).clamp(0, 1)

    # ---- the velocity field ------------------------------------------------------------------------------------
    def velocity(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """v_theta(z_t, t, c); `sigma` is t in [0,1] per sample (SD3 takes timestep = 1000 t)."""
        dtype = self.transformer.dtype
        kwargs = {"attention_mask": mask} if (self.mask_condition and mask is not None) else None
        out = self.transformer(
            hidden_states=z.to(dtype),
            encoder_hidden_states=cond.to(dtype),
            pooled_projections=self.pooled.to(dtype).expand(z.shape[0], -1),
            timestep=(sigma * 1000).to(dtype),
            joint_attention_kwargs=kwargs,
        ).sample
        return out.float()

    def train_sigmas(self) -> torch.Tensor:
        """The N training sigmas of a fresh scheduler with this one's config (shift included), from ~1 down; the
        sampling scheduler's own sigmas change with every `set_timesteps`."""
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config).sigmas.float()

    def sigmas(self, num_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The scheduler's sigma schedule (with its shift), num_steps + 1 values from 1 down to 0."""
        self.scheduler.set_timesteps(num_steps, device=device)
        return self.scheduler.sigmas.float().to(device)

    def guided_velocity(self, z, sigma, cond, mask, guidance_scale: float = 1.0, negative=None) -> torch.Tensor:
        """Velocity with classifier-free guidance against the encoded negative prompt (`negative` = (cond, mask))."""
        if guidance_scale == 1.0 or negative is None:
            return self.velocity(z, sigma, cond, mask)
        neg_cond, neg_mask = negative
        length = max(cond.shape[1], neg_cond.shape[1])
        c = torch.cat([_pad_to(neg_cond, length), _pad_to(cond, length)])
        m = torch.cat([_pad_to(neg_mask, length), _pad_to(mask, length)]) if mask is not None else None
        v_neg, v_pos = self.velocity(torch.cat([z, z]), torch.cat([sigma, sigma]), c, m).chunk(2)
        return v_neg + guidance_scale * (v_pos - v_neg)

    def sample(
        self,
        cond: torch.Tensor,
        mask: torch.Tensor | None,
        noise: torch.Tensor,
        num_steps: int,
        guidance_scale: float = 1.0,
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
        grad_last_steps: int = 0,
        checkpoint_steps: bool = False,
    ) -> torch.Tensor:
        """Deterministic Euler ODE sampler from noise (sigma=1) to z0; returns latents.

        Gradients flow through only the last `grad_last_steps` steps (0 = none), as in DRaFT-K; with
        `checkpoint_steps` each of those steps recomputes its activations in backward instead of storing them.
        """
        sigmas = self.sigmas(num_steps, noise.device)
        z = noise.float()
        for i in range(num_steps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= num_steps - grad_last_steps):
                s = sigmas[i].expand(z.shape[0])
                if checkpoint_steps and torch.is_grad_enabled():
                    v = torch.utils.checkpoint.checkpoint(
                        self.guided_velocity, z, s, cond, mask, guidance_scale, negative, use_reentrant=False)
                else:
                    v = self.guided_velocity(z, s, cond, mask, guidance_scale, negative)
                z = euler_step(z, v, sigmas[i], sigmas[i + 1])
        return z


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], 1)
