"""A stage's output, `weights.safetensors`: what the stage trained, on top of the weights it started from.

A stage writes what it changed (kind "delta"):
- `encoder.*`, `connector.*`, `decoder.*`: the parameters it trained in full, keyed as in the plain models;
- `merge.encoder.*`, `merge.decoder.*`: LoRA adapters on the DiT or on the encoder's conditioning path, merged into
  the base weights when loaded (W + alpha/r B A; their configs in the metadata, `adapters`);
- `encoder_adapter.*`: the captioner's LoRA, kept apart (its config in `encoder_lora`): later stages caption with it
  and condition the decoder without it.
Its metadata names what it started from: the previous stage's file (`base`: its path relative to this file's folder,
the absolute path it had, and its fingerprint) or, for a chain's first stage, the models as configured (`root`).
Loading resolves the chain from its root and checks every link, so a LoRA stage writes megabytes, not a copy of the
whole auto-encoder. A complete file (kind "complete": every weight, adapters merged except the captioner's, no base)
is what `merged_weights=true` writes, and the only kind this package wrote before stage outputs were deltas.

Every file records its fingerprint (sha256 over its tensors' names, dtypes, shapes and bytes), checked whenever it is
read. Tied parameters (Qwen2.5-VL-3B ties lm_head to embed_tokens) are written once and re-tied on load (`tied`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from uae_lightning.models.lora import ADAPTER, adapter_part, add_lora, base_part, has_adapter, merge_lora, merged

PARTS = ("encoder", "connector", "decoder")
CAPTIONER = "encoder_adapter."  # the captioner's LoRA, kept apart from the encoder's base weights
MERGE = "merge."  # adapters merged into their part's base weights on load


@dataclass
class Link:
    """One file of a chain of stage outputs, and its metadata."""

    path: Path
    meta: dict


def tied_keys(models: dict[str, nn.Module]) -> dict[str, str]:
    """{alias: key} of every parameter registered under two names (file keys: `<part>.<name in the plain model>`)."""
    out = {}
    for part, module in models.items():
        first: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            key = f"{part}.{name.replace('.base_layer.', '.')}"
            if id(p) in first:
                out[key] = first[id(p)]
            else:
                first[id(p)] = key
    return out


def root_identity(model_cfg: dict) -> dict[str, str]:
    """What the first stage of a chain starts from: each model's checkpoint name (the last part of its id or path, so a
    moved checkpoint folder still matches), or the random-init architecture and seed."""
    out = {}
    for part in ("encoder", "decoder"):
        c = model_cfg[part]
        out[part] = (Path(c["pretrained"]).name if c.get("pretrained") else
                     f"random {c['architecture']} seed {model_cfg['seed']} {json.dumps(c.get('tiny'), sort_keys=True)}")
    return out


def _hash(h, key: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        _hash(h, key, tensors[key])
    return h.hexdigest()


def save_weights(path: str | Path, states: dict[str, dict[str, torch.Tensor]], adapters: dict[str, dict],
                 encoder_lora: dict | None, trained: set[str] | None = None, base: str | Path | None = None,
                 root: dict | None = None, tied: dict[str, str] | None = None) -> None:
    """Write a stage's output. `states`: {"encoder" | "connector" | "decoder": state dict of the (possibly adapted)
    model}, possibly the full ones gathered from FSDP shards; `adapters`: {"encoder" | "decoder": LoRA config} of every
    adapter on them; `encoder_lora`: the captioner's adapter config (None: the encoder's adapter, if any, is merged).
    `trained`: the keys (`<part>.<state-dict key>`) the stage trained: only they are written, on top of `base` (the
    weights file the stage started from) or, with no base, of the models as configured (`root`, root_identity).
    `trained=None` writes a complete file. `tied`: tied_keys of the models (tensors of `states` that share memory are
    found without it, but not the separate copies that gathering FSDP shards makes of one tied parameter)."""
    path = Path(path)
    if trained is None:
        tensors, meta = _complete(states, adapters, encoder_lora)
    else:
        tensors, meta = _delta(states, adapters, encoder_lora, trained)
        if base is not None:
            base = Path(base).absolute()
            meta["base"] = json.dumps({"path": os.path.relpath(base, path.absolute().parent), "absolute": str(base),
                                       "fingerprint": declared_fingerprint(base)})
        else:
            meta["root"] = json.dumps(root or {})
    once = {alias: key for alias, key in {**_shared(tensors), **(tied or {})}.items() if alias in tensors and key in tensors}
    for alias in once:
        del tensors[alias]
    if once:
        meta["tied"] = json.dumps(once)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta["fingerprint"] = fingerprint(tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # like every other file of the run (safetensors creates it private)
    tmp.replace(path)  # atomic: a preempted job never leaves half a file behind


def _shared(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: key} of tensors that are views of the same memory (the first one in the state dict's order is kept)."""
    first, out = {}, {}
    for key, t in tensors.items():
        view = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and view in first:
            out[key] = first[view]
        else:
            first.setdefault(view, key)
    return out


def _complete(states, adapters, encoder_lora) -> tuple[dict, dict]:
    encoder = states["encoder"]
    keep = encoder_lora is not None and any("lora_" in k for k in encoder)
    parts = {
        "encoder": base_part(encoder) if keep else merged(encoder, adapters.get("encoder")),
        "connector": merged(states["connector"], None),
        "decoder": merged(states["decoder"], adapters.get("decoder")),
    }
    tensors, meta = {}, {"kind": "complete"}
    for name, part in parts.items():
        tensors.update({f"{name}.{k}": v for k, v in part.items()})
    if keep:
        tensors.update({CAPTIONER + k: v for k, v in adapter_part(encoder).items()})
        meta["encoder_lora"] = json.dumps(encoder_lora)
    return tensors, meta


def _delta(states, adapters, encoder_lora, trained) -> tuple[dict, dict]:
    tensors, meta, merge = {}, {"kind": "delta"}, {}
    for part in PARTS:
        keys = [k for k in states[part] if f"{part}.{k}" in trained]
        tensors.update({f"{part}.{k.replace('.base_layer.', '.')}": states[part][k] for k in keys if "lora_" not in k})
        lora = {k: states[part][k] for k in keys if "lora_" in k}
        if not lora:
            continue
        if part == "encoder" and encoder_lora is not None:
            tensors.update({CAPTIONER + k: v for k, v in lora.items()})
            meta["encoder_lora"] = json.dumps(encoder_lora)
        else:
            if part not in adapters:
                raise ValueError(f"the {part} has trained LoRA weights but no adapter config to merge them with")
            tensors.update({f"{MERGE}{part}.{k}": v for k, v in lora.items()})
            merge[part] = adapters[part]
    if merge:
        meta["adapters"] = json.dumps(merge)
    return tensors, meta


def header(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def declared_fingerprint(path: Path) -> str:
    """A weights file's fingerprint: the one it records, or (a file written before fingerprints) its content's."""
    meta = header(path)
    if "fingerprint" in meta:
        return meta["fingerprint"]
    with safe_open(str(path), "pt") as f:
        return fingerprint({k: f.get_tensor(k) for k in f.keys()})


def weights_chain(path: str | Path) -> list[Link]:
    """The files whose weights `path` holds, from the chain's root (a complete file, or a delta on the models as
    configured) to `path` itself. Every link is checked: it must exist (beside the file that points to it, where it
    was when that file was written, or moved together with it) and hold the weights it held then (its fingerprint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (a stage's weights.safetensors is expected)")
    links = [Link(path, header(path))]
    while "base" in links[-1].meta:
        child = links[-1]
        base = json.loads(child.meta["base"])
        where = list(dict.fromkeys([Path(os.path.normpath(child.path.parent / base["path"])), Path(base["absolute"])]))
        found = [p for p in where if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{child.path} holds what its stage trained on top of {where[0]} (written as {base['absolute']}), "
                "which does not exist: every earlier stage output of the chain is needed. Put that run back, move "
                "the runs together, or write complete weights (merged_weights=true, or `pipeline export`)")
        match = next((p for p in found if declared_fingerprint(p) == base["fingerprint"]), None)
        if match is None:
            raise ValueError(f"{child.path} was trained on top of {found[0]}, which now holds other weights (fingerprint "
                             f"{declared_fingerprint(found[0])[:12]}, not {base['fingerprint'][:12]}): that stage was "
                             "trained again or its file replaced; train the later stages again from it")
        if any(match.samefile(link.path) for link in links):
            raise ValueError(f"{child.path}: its chain of base weights loops back to {match}")
        links.append(Link(match, header(match)))
    return links[::-1]


def encoder_adapter_config(path: str | Path) -> dict | None:
    """The captioner's LoRA config of the weights `path` holds (the last link of its chain that has one), or None.
    Reads the files' metadata only."""
    configs = [link.meta["encoder_lora"] for link in weights_chain(path) if "encoder_lora" in link.meta]
    return json.loads(configs[-1]) if configs else None


def load_weights(path: str | Path, encoder: nn.Module, connector: nn.Module, decoder: nn.Module,
                 model_cfg: dict | None = None) -> dict | None:
    """Load a stage's output, resolving its chain (weights_chain), into the three models; returns the captioner's
    LoRA config, whose adapter is injected into the encoder and loaded, or None when there is none. `model_cfg`: the
    run's `model:` config, checked against the root of a delta chain. Tensors are read one at a time from the
    memory-mapped files straight into the models' own, so loading holds no second copy of the weights."""
    chain = weights_chain(path)
    if model_cfg is not None and "root" in chain[0].meta:
        want, have = json.loads(chain[0].meta["root"]), root_identity(model_cfg)
        changed = [f"model.{k}: {want[k]!r} (this config: {have[k]!r})" for k in want if want[k] != have.get(k)]
        if changed:
            raise ValueError(f"{chain[0].path} was trained on top of other models than this config builds: "
                             + "; ".join(changed))
    models = {"encoder": encoder, "connector": connector, "decoder": decoder}
    lora = None
    for link in chain:
        lora = _apply(link, models) or lora
    return lora


@torch.no_grad()
def _apply(link: Link, models: dict[str, nn.Module]) -> dict | None:
    """Copy one file of a chain into the models: full tensors replace, merge adapters are added, the captioner's
    adapter is injected (if the encoder has none yet) and loaded. Returns the captioner's config if the file has one."""
    meta, path = link.meta, link.path
    complete = meta.get("kind", "complete") == "complete"  # a file without metadata: written before deltas
    tied = json.loads(meta.get("tied", "{}"))
    lora = json.loads(meta["encoder_lora"]) if "encoder_lora" in meta else None
    if lora is not None and not has_adapter(models["encoder"].model):
        add_lora(models["encoder"].model, lora)
    own = {part: m.state_dict() for part, m in models.items()}
    plain = {part: {k.replace(".base_layer.", "."): k for k in sd if "lora_" not in k} for part, sd in own.items()}

    def weight(key: str) -> torch.Tensor:  # a file key `<part>.<name in the plain model>` -> the model's tensor
        part, sub = key.split(".", 1)
        return own[part][plain[part][sub]]

    with safe_open(str(path), "pt") as f:
        keys = sorted(f.keys())
        for part in PARTS:
            found = {k[len(part) + 1 :] for k in keys if k.startswith(part + ".")}
            aliases = {a[len(part) + 1 :] for a in tied if a.startswith(part + ".")}
            missing = sorted(plain[part].keys() - found - aliases) if complete else []
            _check(path, part, missing, sorted(found - plain[part].keys()))
        if lora is not None:
            found = {k[len(CAPTIONER) :] for k in keys if k.startswith(CAPTIONER)}
            targets = {k for k in own["encoder"] if "lora_" in k}
            _check(path, "encoder_adapter", sorted(targets - found), sorted(found - targets))
        h, merges = hashlib.sha256(), {}
        for key in keys:
            value = f.get_tensor(key)
            _hash(h, key, value)
            if key.startswith(MERGE):
                merges[key[len(MERGE) :]] = value
            elif key.startswith(CAPTIONER):
                _copy(path, key, own["encoder"][key[len(CAPTIONER) :]], value)
            else:
                _copy(path, key, weight(key), value)
    if "fingerprint" in meta and h.hexdigest() != meta["fingerprint"]:
        raise ValueError(f"{path}: its tensors do not match the fingerprint it was written with (a damaged or edited "
                         "file)")
    for alias, key in tied.items():  # the models built here tie them already; an untied build gets the same values
        if weight(alias).data_ptr() != weight(key).data_ptr():
            weight(alias).copy_(weight(key))
    for part, cfg in json.loads(meta.get("adapters", "{}")).items():
        suffix = f".lora_A.{ADAPTER}.weight"
        prefix = part + "."
        for key in [k for k in merges if k.startswith(prefix) and k.endswith(suffix)]:
            layer = key[len(prefix) : -len(suffix)]
            w = weight(f"{prefix}{layer}.weight")
            w.copy_(merge_lora(w, merges[key], merges[f"{prefix}{layer}.lora_B.{ADAPTER}.weight"], cfg))
    return lora


def _check(path: Path, name: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise RuntimeError(f"{path}: {name} does not match (missing {missing[:5]}, unexpected {unexpected[:5]})")


def _copy(path: Path, key: str, target: torch.Tensor, value: torch.Tensor) -> None:
    if target.shape != value.shape:
        raise RuntimeError(f"{path}: {key} has shape {tuple(value.shape)}; the model's is {tuple(target.shape)}")
    target.copy_(value)
