"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the three models, applied in `UAEStage.configure_model` when the
trainer's strategy is Lightning's ModelParallelStrategy (conf/strategy/fsdp2.yaml).

Units: every transformer block is its own unit (DiT blocks, the LVLM's decoder layers and vision blocks), so a
frozen block and a trained block never share one; the rest of each model (embeddings, final norms, heads, the
connector) is its root unit. The VAE stays replicated: it is small, frozen, and used through `encode`/`decode`,
which FSDP's forward hooks do not see.

Generation reads every weight once per token, so `gathered(model)` keeps a model unsharded for the whole call:
one all-gather per unit for a caption, not one per token.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME  # "meta.pt" beside the shards (Lightning's layout)
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def is_sharded(module: nn.Module) -> bool:
    FSDPModule, _ = _fsdp()
    return any(isinstance(m, FSDPModule) for m in module.modules())


def mixed_precision_policy(precision: str):
    """FSDP2's policy for a Lightning precision: under "bf16-mixed"/"16-mixed" parameters are all-gathered and used in
    half precision while the sharded copies keep their own dtypes (trainable float32, frozen as loaded) and gradients
    are reduced in float32. None (FSDP's default: compute in the parameters' dtype) otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    return None if half is None else MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)


def shard_model(root: nn.Module, blocks: list[nn.Module], mesh, mp_policy=None) -> None:
    """fully_shard each block, then the root (which keeps everything not inside a block)."""
    _, fully_shard = _fsdp()
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(root, **kwargs)


def shard_autoencoder(encoder, connector: nn.Module, decoder, mesh, mp_policy=None) -> None:
    lm = encoder.model.model
    shard_model(encoder.model, [*lm.language_model.layers, *lm.visual.blocks], mesh, mp_policy)
    shard_model(decoder.transformer, list(decoder.transformer.transformer_blocks), mesh, mp_policy)
    shard_model(connector, [], mesh, mp_policy)


@contextmanager
def gathered(module: nn.Module):
    """All of `module`'s FSDP units unsharded until the block ends (a no-op for an unsharded module)."""
    FSDPModule, _ = _fsdp()
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    if isinstance(module, FSDPModule):
        # FSDP picks its root at the first forward; callers may next run an inner unit directly (the LVLM's text
        # model for conditioning), which would otherwise claim the root role. No public API for this in torch 2.14.
        module._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # FSDP's default: the root keeps its (small) parameters after forward, every block reshards.
            unit.set_reshard_after_forward(unit is not module, recurse=False)


@torch.no_grad()
def fill_from_rank0(modules: list[nn.Module], full: list[dict] | None, device: torch.device) -> None:
    """Give sharded models their weights from rank 0: rank 0 built them with weights (`full`: their state dicts,
    taken before sharding), the other ranks without (parameters on the meta device, models/build.py `empty`). Each
    tensor is broadcast from rank 0 and every rank keeps its own shard, so only rank 0 ever reads or holds a full
    copy. Collective: every rank calls it, after `shard_autoencoder`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    for i, module in enumerate(modules):
        if full is None:
            # Storage for the parameters (FSDP2 re-creates its sharded ones); to_empty also wipes the buffers, and
            # the non-persistent ones (rotary frequencies) are not in the state dict: keep them.
            kept = {n: b.clone() for n, b in _non_persistent_buffers(module)}
            module.to_empty(device=device)
            for n, b in _non_persistent_buffers(module):
                b.copy_(kept[n])
        else:
            module.to(device)
        set_model_state_dict(module, full[i] if full is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _non_persistent_buffers(module: nn.Module):
    for prefix, m in module.named_modules():
        for name, buf in m._buffers.items():
            if buf is not None and name in m._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name, buf


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU, gathered from all ranks (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@torch.no_grad()
def gathered_parameters(module: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The parameters `names` of a module, whole, on CPU: a sharded parameter is gathered one at a time and kept by
    rank 0 only (a collective: every rank calls it), so writing a LoRA stage's output gathers its adapter, not the
    frozen models. Unsharded parameters are returned as they are."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in module.named_parameters():
        if name not in names:
            continue
        if isinstance(p, DTensor):
            full = p.full_tensor()
            if torch.distributed.get_rank() == 0:
                out[name] = full.cpu()
            del full
        else:
            out[name] = p.detach()
    return out


class TrainableStateStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy whose sharded (distributed-checkpoint) resume reads only the parameters the
    stage trains: the stage's checkpoints hold no frozen weight (UAEStage.on_save_checkpoint), which Lightning's own
    loader would ask for. Single-file checkpoints go through Lightning's loader unchanged."""

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / _METADATA_FILENAME).is_file()):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        module = self.lightning_module
        # A trainable key missing from the checkpoint makes the distributed-checkpoint reader fail, naming it.
        state = {"state_dict": module.trainable_state(get_model_state_dict(module))}
        dcp_load(state, checkpoint_id=path)
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            optim = {f"optimizer_{i}": get_optimizer_state_dict(module, optimizer)}
            dcp_load(optim, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim[f"optimizer_{i}"],
                                     options=StateDictOptions(cpu_offload=True))
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
