"""Stage outputs (models/weights.py): what each stage trained, on top of the file it started from; the chain loads into
exactly the complete weights; every link is checked; tied parameters are written once; files are readable by the
group like the rest of a run."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FAST, compose_cfg
from uae_lightning.models.build import build_autoencoder
from uae_lightning.models.lora import add_lora
from uae_lightning.models.weights import load_weights, save_weights, tied_keys
from uae_lightning.runner import run_pipeline

STAGES = ("pretrain", "captioner", "cold_start", "g4u", "u4g")
TINY_RUN = [*FAST, *[f"stages.{s}.trainer.max_steps=2" for s in STAGES], "stages.g4u.data.batch_size=2",
            "stages.u4g.data.batch_size=2", "stages.g4u.module.group_size=2", "stages.u4g.module.group_size=2",
            "stages.u4g.module.num_steps=2"]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The toy's five stages, 2 steps each, written as stage outputs and (same seeds, same training) complete."""
    root = tmp_path_factory.mktemp("runs")
    for kind, merged in (("delta", "false"), ("complete", "true")):
        run_pipeline(compose_cfg([*TINY_RUN, f"merged_weights={merged}"]), root / kind)
    return root


def loaded(weights: Path, model: dict) -> dict[str, torch.Tensor]:
    encoder, connector, decoder = build_autoencoder(model, 32)
    load_weights(weights, encoder, connector, decoder, model)
    return {f"{name}.{k}": v for name, m in (("encoder", encoder), ("connector", connector), ("decoder", decoder))
            for k, v in m.state_dict().items()}


def test_each_stage_writes_what_it_trained_and_the_chain_loads_into_the_complete_weights(toy_runs):
    """Measured bytes per stage (toy, float32; complete file 11.4 MB): U4G writes the DiT's adapter alone (0.52 MB,
    4.6 %); G4U writes the captioner's adapter alone, which in the toy is r = 64 on a 64-wide language model, as many
    parameters as the layers it adapts (0.73 MB, 6.4 %; at paper scale 1.0 %, see the rehearsal and
    benchmarks/scale.py). Every stage's chain loads into tensors equal (torch.equal) to its complete file's."""
    model = OmegaConf.to_container(compose_cfg().model, resolve=True)
    sizes = {s: (toy_runs / "delta" / s / "weights.safetensors").stat().st_size for s in STAGES}
    complete = {s: (toy_runs / "complete" / s / "weights.safetensors").stat().st_size for s in STAGES}
    print("stage output bytes:", sizes, "complete:", complete)
    assert sizes["u4g"] < 0.05 * complete["u4g"], (sizes["u4g"], complete["u4g"])
    u4g = load_file(toy_runs / "delta" / "u4g" / "weights.safetensors")
    assert u4g and all(k.startswith("merge.decoder.transformer.") and ".lora_" in k for k in u4g)
    g4u = load_file(toy_runs / "delta" / "g4u" / "weights.safetensors")
    encoder, _, _ = build_autoencoder(model, 32)
    add_lora(encoder.model, OmegaConf.to_container(compose_cfg().stages.captioner.module.lora))
    adapter = {k for k, _ in encoder.named_parameters() if "lora_" in k}
    assert g4u.keys() == {f"encoder_adapter.{k}" for k in adapter}  # the captioner's LoRA, nothing else
    for stage in STAGES:
        a = loaded(toy_runs / "delta" / stage / "weights.safetensors", model)
        b = loaded(toy_runs / "complete" / stage / "weights.safetensors", model)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    # Both runs trained the same weights, so the RL stages measured the same numbers.
    runs = [json.loads((toy_runs / kind / "summary.json").read_text()) for kind in ("delta", "complete")]
    assert runs[0]["stages"]["u4g"] == runs[1]["stages"]["u4g"]


def test_a_moved_run_loads_and_a_missing_or_changed_link_is_named(toy_runs, tmp_path):
    model = OmegaConf.to_container(compose_cfg().model, resolve=True)
    expected = loaded(toy_runs / "delta" / "u4g" / "weights.safetensors", model)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(toy_runs / "delta", moved)
    original = toy_runs / "delta" / "pretrain"
    original.rename(original.with_name("pretrain_away"))  # only the moved copy is left
    try:
        # The whole run moved: every link is found beside the file that names it.
        again = loaded(moved / "u4g" / "weights.safetensors", model)
        assert all(torch.equal(again[k], expected[k]) for k in expected)
        # An earlier stage's directory renamed: the error names the link that is missing.
        (moved / "pretrain").rename(moved / "pretrain_old")
        with pytest.raises(FileNotFoundError, match=r"elsewhere/run/pretrain/weights\.safetensors"):
            loaded(moved / "u4g" / "weights.safetensors", model)
        # A link that now holds other weights (the stage trained again, its file replaced) is named too.
        (moved / "pretrain_old").rename(moved / "pretrain")
        shutil.copy(toy_runs / "complete" / "pretrain" / "weights.safetensors", moved / "pretrain" / "weights.safetensors")
        with pytest.raises(ValueError, match=r"elsewhere/run/pretrain/weights\.safetensors, which now holds other weights"):
            loaded(moved / "u4g" / "weights.safetensors", model)
    finally:
        original.with_name("pretrain_away").rename(original)
    # A chain started from other models than the config builds (another random-init seed) is refused.
    with pytest.raises(ValueError, match="model.encoder"):
        loaded(toy_runs / "delta" / "pretrain" / "weights.safetensors", {**model, "seed": model["seed"] + 1})


def test_an_edited_file_fails_its_fingerprint_and_weights_are_as_readable_as_the_other_files(toy_runs, tmp_path):
    """A copy of U4G's output with one tensor changed by 1e-3 and its metadata kept (its base is found where it was
    written): loading it fails on its own fingerprint. The weights file has the mode of the run's other files."""
    path = toy_runs / "delta" / "u4g" / "weights.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    done = toy_runs / "delta" / "u4g" / "done.json"
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask == done.stat().st_mode & 0o777
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-3
    edited = tmp_path / "weights.safetensors"
    save_file(tensors, str(edited), metadata=meta)
    model = OmegaConf.to_container(compose_cfg().model, resolve=True)
    assert loaded(path, model)  # the original loads
    with pytest.raises(ValueError, match="do not match the fingerprint"):
        loaded(edited, model)


def test_tied_parameters_are_written_once_and_tied_again_on_load(tmp_path):
    """Qwen2.5-VL-3B ties lm_head to embed_tokens. A complete file from one process (the two keys share memory) and
    from gathered FSDP shards (two separate copies, told by tied_keys) holds the embedding once; a stage that trains
    it writes it once; loading ties them again."""
    from uae_lightning.rehearsal import save_qwen2_5_vl

    qwen = save_qwen2_5_vl(tmp_path / "qwen")
    model = OmegaConf.to_container(compose_cfg([f"model.encoder.pretrained={qwen}"]).model, resolve=True)
    enc, conn, dec = build_autoencoder(model, 32)
    lm = enc.model
    assert lm.lm_head.weight is lm.model.language_model.embed_tokens.weight
    with torch.no_grad():
        lm.lm_head.weight.normal_()
    models = {"encoder": enc, "connector": conn, "decoder": dec}
    tied = tied_keys(models)
    assert tied == {"encoder.model.lm_head.weight": "encoder.model.model.language_model.embed_tokens.weight"}
    shared = {n: m.state_dict() for n, m in models.items()}
    gathered = {n: {k: v.clone() for k, v in sd.items()} for n, sd in shared.items()}
    for name, states, kw in (("one", shared, {}), ("gathered", gathered, {"tied": tied}),
                             ("trained", shared, {"tied": tied, "trained": {"encoder.model.model.language_model.embed_tokens.weight"}})):
        path = tmp_path / f"{name}.safetensors"
        save_weights(path, states, {}, None, **kw)
        with safe_open(str(path), "pt") as f:
            assert "encoder.model.lm_head.weight" not in f.keys(), name
            assert "encoder.model.model.language_model.embed_tokens.weight" in f.keys(), name
        e2, c2, d2 = build_autoencoder(model, 32)
        load_weights(path, e2, c2, d2, model)
        head, embed = e2.model.lm_head.weight, e2.model.model.language_model.embed_tokens.weight
        assert head is embed and torch.equal(head, lm.lm_head.weight), name


def test_a_heldout_split_without_a_usable_image_stops_the_run_before_training(tmp_path):
    from uae_lightning.errors import ConfigError

    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(4):
        (images / f"{i}.png").write_bytes(b"not a png")
        rows.append({"path": str(images / f"{i}.png"), "caption": "a red circle"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = compose_cfg(["+experiment=toy_pretrain", "data=manifest", f"data.manifest={manifest}",
                       f"data.val_manifest={manifest}", "data.resolution=32", "trainer.enable_progress_bar=false"])
    with pytest.raises(ConfigError, match=r"held-out split \(data.val_manifest=.*m.jsonl\) has no usable image"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "pretrain").exists()  # nothing trained
