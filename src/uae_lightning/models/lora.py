"""LoRA adapters on the encoder's language model and on the DiT, through peft, and the three forms a state dict of an
adapted model is saved in: the adapter alone, the base weights under it, or both merged into plain weights.

The state-dict functions work on any state dict of an adapted model (a module's, or the full state dict gathered
from FSDP shards), so consolidating a sharded model never rebuilds it.
"""
from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ADAPTER = "default"  # peft's adapter name: keys read `<layer>.lora_A.default.weight`


def lora_config(cfg: dict) -> LoraConfig:
    return LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg.get("dropout", 0.0),
                      target_modules=cfg["target_modules"] if isinstance(cfg["target_modules"], str) else list(cfg["target_modules"]))


def add_lora(module: nn.Module, cfg: dict) -> None:
    """Inject LoRA layers into `module` in place; only they are new trainable parameters. peft's public injection
    API works the same for the transformers encoder and the diffusers DiT (transformers 5.24's `add_adapter` asks
    for a peft release that is not published yet)."""
    inject_adapter_in_model(lora_config(cfg), module)


def set_adapters_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every LoRA adapter of `module` on or off. peft's toggle also freezes/unfreezes the adapter weights; the
    trainable set is kept as it was (FSDP2 reads it when it initialises, a reference pass must not change it)."""
    trainable = {p: p.requires_grad for p in module.parameters()}
    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)
    for p, flag in trainable.items():
        p.requires_grad_(flag)


def has_adapter(module: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def adapter_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the LoRA weights, keyed as in the adapted model."""
    return {k: v for k, v in sd.items() if "lora_" in k}


def base_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights under the adapters, unmerged, keyed as in the plain model."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}


def merged(sd: dict[str, torch.Tensor], cfg: dict | None) -> dict[str, torch.Tensor]:
    """Plain weights with every adapter merged in: W + (alpha / r) B A for each adapted linear layer (peft's merge,
    done on the tensors; rank-stabilised scaling, DoRA and fan-in-fan-out layers are not used here). The sum is
    taken in float32 and stored in the base weight's dtype. `cfg` is the adapter's {r, alpha, ...}."""
    out = base_part(sd)
    suffix = f".lora_A.{ADAPTER}.weight"
    layers = [k[: -len(suffix)] for k in sd if k.endswith(suffix)]
    if layers and cfg is None:
        raise ValueError("the state dict holds LoRA weights but no adapter config was given to merge them")
    for layer in layers:
        out[f"{layer}.weight"] = merge_lora(out[f"{layer}.weight"], sd[f"{layer}{suffix}"],
                                            sd[f"{layer}.lora_B.{ADAPTER}.weight"], cfg)
    return out


def merge_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: dict) -> torch.Tensor:
    """W + (alpha / r) B A, summed in float32 and returned in W's dtype: one adapted layer's merged weight (a saved
    complete file and a loaded chain of stage outputs both merge with this)."""
    return (w.float() + (b.float() @ a.float()) * (cfg["alpha"] / cfg["r"])).to(w.dtype)
