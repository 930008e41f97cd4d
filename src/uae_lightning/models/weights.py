"""One file per trained auto-encoder: `weights.safetensors` holds the encoder, connector and decoder of a stage.

Decoder and connector adapters (and a cold start's encoder adapter) are merged into their base weights. The captioner's LoRA is kept apart
(`encoder_adapter.*`, its config in the file's metadata) so later stages can still caption with it and condition
the decoder without it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from uae_lightning.models.lora import adapter_part, add_lora, base_part, has_adapter, merged


def save_weights(path: str | Path, states: dict[str, dict[str, torch.Tensor]], adapters: dict[str, dict],
                 encoder_lora: dict | None) -> None:
    """Write `states` {"encoder" | "connector" | "decoder": state dict of the (possibly adapted) model}. Adapters
    (`adapters`: {"encoder" | "decoder": LoRA config}) are merged arithmetically, except the captioner's
    (`encoder_lora`), which is kept apart. The state dicts may be the full ones gathered from FSDP shards."""
    sd, meta = {}, {}
    encoder = states["encoder"]
    keep = encoder_lora is not None and any("lora_" in k for k in encoder)
    parts = {
        "encoder": base_part(encoder) if keep else merged(encoder, adapters.get("encoder")),
        "connector": merged(states["connector"], None),
        "decoder": merged(states["decoder"], adapters.get("decoder")),
    }
    if keep:
        parts["encoder_adapter"] = adapter_part(encoder)
        meta["encoder_lora"] = json.dumps(encoder_lora)
    for name, part in parts.items():
        sd.update({f"{name}.{k}": v.detach().contiguous() for k, v in part.items()})
    tmp = Path(str(path) + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a preempted job never leaves half a file behind


def load_weights(path: str | Path, encoder: nn.Module, connector: nn.Module, decoder: nn.Module) -> dict | None:
    """Load a `weights.safetensors` into the three models (strictly); returns the captioner's LoRA config, whose
    adapter is injected into the encoder and loaded, or None when the file has none. Tensors are read one at a time
    from the memory-mapped file straight into the models' own, so loading holds no second copy of the weights."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (a stage's weights.safetensors is expected)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        for name, module in (("encoder", encoder), ("connector", connector), ("decoder", decoder)):
            _read_into(f, path, name, [k for k in keys if k.startswith(name + ".")], module, adapter=False)
        if "encoder_lora" not in meta:
            return None
        lora = json.loads(meta["encoder_lora"])
        if not has_adapter(encoder.model):
            add_lora(encoder.model, lora)
        _read_into(f, path, "encoder_adapter", [k for k in keys if k.startswith("encoder_adapter.")], encoder,
                   adapter=True)
    return lora


def encoder_adapter_config(path: str | Path) -> dict | None:
    """The captioner's LoRA config stored in a weights file (its metadata only), or None."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (a stage's weights.safetensors is expected)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["encoder_lora"]) if "encoder_lora" in meta else None


@torch.no_grad()
def _read_into(f, path, prefix: str, keys: list[str], module: nn.Module, adapter: bool) -> None:
    """Copy the file's `prefix.*` tensors into `module`: its base weights (keyed as in the plain model, also when
    LoRA layers wrap them) or, with `adapter`, its LoRA weights; every one of them must be in the file."""
    own = module.state_dict()
    if adapter:
        targets = {k: k for k in own if "lora_" in k}
    else:
        targets = {k.replace(".base_layer.", "."): k for k in own if "lora_" not in k}
    found = {k[len(prefix) + 1 :]: k for k in keys}
    missing, unexpected = sorted(targets.keys() - found.keys()), sorted(found.keys() - targets.keys())
    if missing or unexpected:
        raise RuntimeError(f"{path}: {prefix} does not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for sub, key in found.items():
        target, value = own[targets[sub]], f.get_tensor(key)
        if target.shape != value.shape:
            raise RuntimeError(f"{path}: {key} has shape {tuple(value.shape)}; the model's is {tuple(target.shape)}")
        target.copy_(value)
