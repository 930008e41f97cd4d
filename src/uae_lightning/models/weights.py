"""One file per trained auto-encoder: `weights.safetensors` holds the encoder, connector and decoder of a stage.

Decoder and connector adapters are merged into their base weights. The captioner's LoRA is kept apart
(`encoder_adapter.*`, its config in the file's metadata) so later stages can still caption with it and condition
the decoder without it.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from uae_lightning.models.build import adapter_state_dict, add_lora, base_state_dict, has_adapter, plain_state_dict


def save_weights(path: str | Path, encoder: nn.Module, connector: nn.Module, decoder: nn.Module,
                 encoder_lora: dict | None) -> None:
    sd, meta = {}, {}
    keep = encoder_lora is not None and has_adapter(encoder.model)
    parts = {
        "encoder": base_state_dict(encoder) if keep else plain_state_dict(encoder),
        "connector": plain_state_dict(connector),
        "decoder": plain_state_dict(decoder),
    }
    if keep:
        parts["encoder_adapter"] = adapter_state_dict(encoder)
        meta["encoder_lora"] = json.dumps(encoder_lora)
    for name, part in parts.items():
        sd.update({f"{name}.{k}": v.contiguous() for k, v in part.items()})
    tmp = Path(str(path) + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a preempted job never leaves half a file behind


def load_weights(path: str | Path, encoder: nn.Module, connector: nn.Module, decoder: nn.Module) -> dict | None:
    """Load a `weights.safetensors` into the three models (strictly); returns the captioner's LoRA config, whose
    adapter is injected into the encoder and loaded, or None when the file has none."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (a stage's weights.safetensors is expected)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    sd = load_file(str(path))

    def part(prefix: str) -> dict:
        return {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}

    for name, module in (("encoder", encoder), ("connector", connector), ("decoder", decoder)):
        missing, unexpected = module.load_state_dict(part(name), strict=False)
        missing = [k for k in missing if "lora_" not in k]
        if missing or unexpected:
            raise RuntimeError(f"{path}: {name} does not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if "encoder_lora" not in meta:
        return None
    lora = json.loads(meta["encoder_lora"])
    if not has_adapter(encoder.model):
        add_lora(encoder.model, lora)
    missing, unexpected = encoder.load_state_dict(part("encoder_adapter"), strict=False)
    missing = [k for k in missing if "lora_" in k]
    if missing or unexpected:
        raise RuntimeError(f"{path}: encoder adapter does not match (missing {missing[:5]})")
    return lora
