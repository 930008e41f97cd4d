"""The connector between encoder and decoder: Linear(h -> m*h) -> GELU -> Linear(m*h -> joint_attention_dim).

PAPER.md "Architecture": at paper scale 2048 -> 8192 -> 4096, applied to every conditioning token.

A diffusers model (ModelMixin + ConfigMixin): `save_pretrained` writes config.json + diffusion_pytorch_model.safetensors
and `Connector.from_pretrained` reads them back, so the exported decoder pipeline loads it like its other parts. It
imports only torch and diffusers: an export's decoder/connector/ folder ships it (connector.py), so diffusers loads
the component where this package is not installed.
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn


class Connector(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_dim: int, out_dim: int, hidden_multiplier: int = 4):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_multiplier * in_dim), nn.GELU(),
                                 nn.Linear(hidden_multiplier * in_dim, out_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The encoder may run in another dtype (bfloat16 checkpoint, float32 connector): compute in the connector's.
        return self.net(hidden.to(self.net[0].weight.dtype))
