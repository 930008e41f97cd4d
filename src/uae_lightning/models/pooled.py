"""The DiT's pooled-projection input, a fixed vector (SD3.5's CLIP pooled embedding of the empty prompt, or zeros in
the toy), as a diffusers model that saves and loads itself: the exported decoder's `pooled/` component.

This file imports only torch and diffusers: an export's decoder/pooled/ folder ships it (pooled.py), so diffusers
loads the component where this package is not installed.
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config


class PooledProjection(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("vector", torch.zeros(dim), persistent=True)
