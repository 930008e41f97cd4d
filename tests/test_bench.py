"""Unified-Bench and the inference pipeline on tiny toy models (random weights, a perturbed captioner LoRA)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest
import torch

from conftest import random_toy_pipeline, save_tiny_clip
from uae_lightning.bench import run_bench, score_folders
from uae_lightning.bench.__main__ import main as bench_main
from uae_lightning.bench.io import save_png, to_uint8
from uae_lightning.data import toy
from uae_lightning.pipeline import UAEPipeline, main as pipeline_main

TOY_BACKBONES = ["toy_pixels", "toy_regions", "toy_palette"]
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def toy_image(i: int) -> torch.Tensor:
    return torch.from_numpy(toy.image_array(toy.make_scene(10_000, i, 3), 32).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    for i in range(10):
        save_png(toy_image(i), folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """Random toy models whose captioner has a non-zero LoRA adapter (so the export must carry it)."""
    return random_toy_pipeline(tmp_path_factory.mktemp("w"), LORA, num_steps=4, max_new_tokens=12)


def test_identical_pairs_score_100_with_a_backbone_loaded_from_a_folder(references, tmp_path):
    """score_folders on originals vs themselves: every cosine is 1, so every backbone and the overall are 100.
    The CLIP backbone is a tiny model saved to a temp dir and named by its path, the code path of a hub id."""
    save_tiny_clip(tmp_path / "clip")
    copy = tmp_path / "copy"
    shutil.copytree(references, copy)
    (copy / "009.png").unlink()  # one original without reconstruction: skipped and counted
    s = score_folders(references, copy, tmp_path / "out", TOY_BACKBONES + [str(tmp_path / "clip")], resolution=32,
                      batch_size=4, progress=False)
    assert s["images"] == 9 and s["skipped"] == {"missing_reconstruction": 1}
    assert s["overall"] == pytest.approx(100.0, abs=1e-3)
    assert all(v == pytest.approx(100.0, abs=1e-3) for v in s["backbones"].values())
    assert (tmp_path / "out" / "results.md").read_text().count("|") > 10 and (tmp_path / "out" / "grid.png").is_file()


def test_different_images_score_below_100(references, tmp_path):
    shifted = tmp_path / "shifted"
    for i in range(10):
        save_png(toy_image((i + 1) % 10), shifted / f"{i:03d}.png")
    s = score_folders(references, shifted, tmp_path / "out", TOY_BACKBONES, resolution=32, progress=False)
    assert s["overall"] < 90


def test_bench_is_deterministic_and_an_interrupted_run_resumes_to_the_same_numbers(pipe, references, tmp_path, monkeypatch):
    full = run_bench(pipe, references, tmp_path / "full", TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    again = run_bench(pipe, references, tmp_path / "again", TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    assert again["backbones"] == full["backbones"]  # same seed: bit-identical scores

    calls = {"n": 0}
    original = UAEPipeline.reconstruct

    def crash_on_second_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *a, **k)

    monkeypatch.setattr(UAEPipeline, "reconstruct", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_bench(pipe, references, tmp_path / "resumed", TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    assert len((tmp_path / "resumed" / "results.jsonl").read_text().splitlines()) == 4
    with open(tmp_path / "resumed" / "results.jsonl", "a") as f:
        f.write('{"image": "004.png", "capt')  # a line cut short by the kill
    monkeypatch.setattr(UAEPipeline, "reconstruct", original)
    resumed = run_bench(pipe, references, tmp_path / "resumed", TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    assert resumed["backbones"] == full["backbones"] and resumed["images"] == 10
    rows = [json.loads(l) for l in (tmp_path / "resumed" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(f"{i:03d}.png" for i in range(10))  # each image once

    other_seed = run_bench(pipe, references, tmp_path / "seed4", TOY_BACKBONES, batch_size=4, seed=4, progress=False)
    assert other_seed["overall"] != full["overall"]  # the seed does reach the noise


def test_a_preempted_bench_stops_after_its_batch_and_resumes_and_max_images_is_a_fixed_list(pipe, references, tmp_path,
                                                                                            monkeypatch):
    """The preemption signal during the bench: the batch in progress finishes and is written, then Preempted; the
    re-run does only the rest and ends with the uninterrupted scores. `max_images=3` scores the first 3 images by
    name, with the rows the full run has for them."""
    from uae_lightning.callbacks import preemption

    monkeypatch.setitem(preemption._state, "signalled", False)  # restored to this at teardown
    full = run_bench(pipe, references, tmp_path / "full", TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    calls = {"n": 0}
    original = UAEPipeline.reconstruct

    def signal_during_first_batch(self, *a, **k):
        calls["n"] += 1
        preemption._state["signalled"] = True  # what the SIGUSR1 handler sets
        return original(self, *a, **k)

    monkeypatch.setattr(UAEPipeline, "reconstruct", signal_during_first_batch)
    with pytest.raises(preemption.Preempted, match="after batch 1 of 3"):
        run_bench(pipe, references, tmp_path / "stopped", TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    assert calls["n"] == 1 and len((tmp_path / "stopped" / "results.jsonl").read_text().splitlines()) == 4
    preemption._state["signalled"] = False
    monkeypatch.setattr(UAEPipeline, "reconstruct", original)
    resumed = run_bench(pipe, references, tmp_path / "stopped", TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    assert resumed["backbones"] == full["backbones"] and resumed["images"] == 10

    first3 = run_bench(pipe, references, tmp_path / "first3", TOY_BACKBONES, batch_size=4, seed=3, progress=False,
                       max_images=3)
    rows = {r["image"]: r for r in map(json.loads, (tmp_path / "full" / "results.jsonl").read_text().splitlines())}
    mine = [json.loads(line) for line in (tmp_path / "first3" / "results.jsonl").read_text().splitlines()]
    assert first3["images"] == 3 and [r["image"] for r in mine] == ["000.png", "001.png", "002.png"]
    assert all(r["scores"] == rows[r["image"]]["scores"] for r in mine)


def test_export_reloads_and_reproduces_caption_and_image(pipe, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    images = torch.stack([toy_image(i) for i in range(3)])
    texts, recon = pipe.reconstruct(images, seeds=[5, 6, 7])
    with pipe.encoder.adapter_disabled():
        base_texts = pipe.caption(images)
    assert base_texts != texts  # the adapter matters, so the export must carry it
    path = pipe.save_pretrained(tmp_path / "export")
    loaded = UAEPipeline.from_pretrained(path)
    texts2, recon2 = loaded.reconstruct(images, seeds=[5, 6, 7])
    assert texts2 == texts
    assert torch.equal(recon2, recon)
    # The adapter is a standard peft adapter: PeftModel loads it onto the exported base model.
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(path / "decoder" / "text_encoder")
    peft_model = PeftModel.from_pretrained(base, path / "encoder_adapter")
    ref = dict(loaded.encoder.model.named_parameters())
    for n, p in peft_model.named_parameters():
        if "lora_A" in n:
            key = n.removeprefix("base_model.model.")
            assert torch.equal(p, ref[key])


def test_the_exported_decoder_is_a_diffusers_pipeline_that_draws_what_the_run_draws(pipe, tmp_path):
    """diffusers' own entry point loads export/decoder (model_index.json, our pipeline class from its pipeline.py, the
    connector and pooled vector as diffusers models, the masked attention restored): for the same captions and seeds
    its images equal UAEPipeline.generate's (float32: to 1e-6). The stock StableDiffusion3Pipeline, built from the
    exported transformer and scheduler and given our prompt embeddings and the same noise, draws the same image."""
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    from uae_lightning.models.decoder import MaskedJointAttnProcessor

    path = pipe.save_pretrained(tmp_path / "export")
    index = json.loads((path / "decoder" / "model_index.json").read_text())
    assert index["_class_name"] == "UAEDecoderPipeline"
    # custom components as diffusers' remote code lays them out: ["<file in the component's folder>", "<class>"]
    assert index["connector"] == ["connector", "Connector"] and (path / "decoder" / "connector" / "connector.py").is_file()
    assert index["pooled"] == ["pooled", "PooledProjection"] and (path / "decoder" / "pooled" / "pooled.py").is_file()
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    gen = DiffusionPipeline.from_pretrained(path / "decoder", custom_pipeline=str(path / "decoder"), trust_remote_code=True)
    assert type(gen).__name__ == "UAEDecoderPipeline"
    # the export's own copy of the masked attention (decoder/decoder.py), not this package's class
    processors = list(gen.transformer.attn_processors.values())
    assert all(type(p).__name__ == "MaskedJointAttnProcessor" and not isinstance(p, MaskedJointAttnProcessor)
               for p in processors)
    texts = ["a large red circle top left", "two small blue squares"]
    ours = pipe.generate(texts, [3, 4])
    theirs = gen(texts, seeds=[3, 4], output_type="pt").images
    assert theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-6)
    assert not torch.allclose(ours[0], ours[1], atol=1e-2)  # the captions matter
    pil = gen(texts[:1], seeds=[3]).images[0]
    assert pil.size == (32, 32)
    # The stock SD3 pipeline on the exported parts (pixel-space toy: no VAE, so it returns latents).
    stock = StableDiffusion3Pipeline(transformer=gen.transformer, scheduler=gen.scheduler, vae=None, text_encoder=None,
                                     tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                     tokenizer_3=None)
    latents = stock(**gen.sd3_inputs(texts[:1]), latents=gen.noise([3]), guidance_scale=1.0, height=32, width=32,
                    num_inference_steps=pipe.num_steps, output_type="latent").images
    assert torch.allclose(((latents + 1) / 2).clamp(0, 1), ours[:1], atol=1e-5)
    card = (path / "README.md").read_text()
    assert "DiffusionPipeline.from_pretrained" in card and "PeftModel.from_pretrained" in card


def readme_diffusers_snippet() -> str:
    """README's diffusers loading of an export, verbatim: from its import to the first image drawn."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = re.search(r"^(from diffusers import DiffusionPipeline\n.*?^image = gen\(.*?\n)", text, re.S | re.M)
    assert snippet, "README.md has no diffusers snippet"
    return snippet.group(1)


def test_the_exported_decoder_loads_in_a_process_that_cannot_import_this_package(pipe, tmp_path):
    """README's diffusers snippet, run as it stands in a fresh interpreter where `import uae_lightning` fails (as where
    the package is not installed): the export's decoder/ folder carries its own code, and draws the image that
    UAEPipeline.generate draws for the same caption and seed."""
    pipe.save_pretrained(tmp_path / "exports" / "toy")
    code = ("import sys\nsys.modules['uae_lightning'] = None  # any import of the package fails\n"
            + readme_diffusers_snippet()
            + "import numpy as np\nnp.save('drawn.npy', np.asarray(image))\n"
            + "assert not any(m.startswith('uae_lightning') for m in sys.modules if sys.modules[m] is not None)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert res.returncode == 0, res.stderr[-3000:]
    ours = to_uint8(pipe.generate(["a large red circle at the top-left"], [0])[0])
    assert np.array_equal(np.load(tmp_path / "drawn.npy"), ours)


def test_command_lines(pipe, references, tmp_path, capsys):
    export = pipe.save_pretrained(tmp_path / "export")
    pipeline_main(["--model", str(export), "caption", str(references / "000.png")])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["caption"] == pipe.caption(toy_image(0)[None])[0]
    pipeline_main(["--model", str(export), "reconstruct", str(references / "001.png"), "--out", str(tmp_path / "rec")])
    pipeline_main(["--model", str(export), "generate", "a red circle", "--out", str(tmp_path / "gen")])
    assert (tmp_path / "rec" / "001.png").is_file() and (tmp_path / "gen" / "0000.png").is_file()
    s = bench_main(["run", "--model", str(export), "--images", str(references), "--out", str(tmp_path / "b"),
                    "--backbones", *TOY_BACKBONES, "--steps", "4"])
    assert s["images"] == 10 and "overall" in capsys.readouterr().out


def test_results_are_reused_only_under_the_settings_that_made_them(references, pipe, tmp_path):
    """A re-run into the same --out with another seed or more backbones refuses (naming what changed) instead of
    printing the old numbers under the new settings; the in-run bench (fresh=True) starts afresh and matches a run
    into an empty folder."""
    out = tmp_path / "out"
    run_bench(pipe, references, out, TOY_BACKBONES[:2], batch_size=4, seed=0, progress=False)
    with pytest.raises(ValueError, match="seed"):
        run_bench(pipe, references, out, TOY_BACKBONES[:2], batch_size=4, seed=1, progress=False)
    with pytest.raises(ValueError, match="backbones"):
        run_bench(pipe, references, out, TOY_BACKBONES, batch_size=4, seed=0, progress=False)
    again = run_bench(pipe, references, out, TOY_BACKBONES[:2], batch_size=4, seed=1, progress=False, fresh=True)
    clean = run_bench(pipe, references, tmp_path / "clean", TOY_BACKBONES[:2], batch_size=4, seed=1, progress=False)
    assert again["overall"] == clean["overall"]


def test_images_that_differ_only_by_suffix_keep_their_own_outputs(references, pipe, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    shutil.copy(references / "000.png", refs / "a.png")
    from PIL import Image

    Image.open(references / "001.png").save(refs / "a.jpg", quality=95)
    s = run_bench(pipe, refs, tmp_path / "out", TOY_BACKBONES, batch_size=4, progress=False)
    assert s["images"] == 2
    recons = {json.loads(line)["reconstruction"] for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()}
    assert recons == {"reconstructions/a.png.png", "reconstructions/a.jpg.png"}
    # Scoring folders: two reconstructions for one original cannot be paired silently.
    rec = tmp_path / "rec"
    rec.mkdir()
    shutil.copy(references / "000.png", rec / "000.png")
    shutil.copy(references / "000.png", rec / "000.webp")
    with pytest.raises(ValueError, match="000"):
        score_folders(references, rec, tmp_path / "scored", TOY_BACKBONES, resolution=32, progress=False)


def test_cli_step_counts_must_be_positive(capsys):
    for main, args in ((pipeline_main, ["--model", "x", "--steps", "-3", "caption", "img.png"]),
                       (bench_main, ["run", "--model", "x", "--images", "y", "--out", "z", "--steps", "0"])):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2 and "--steps" in capsys.readouterr().err  # argparse's one-line usage error


def test_non_finite_reconstructions_are_skipped_not_scored_as_black(references, pipe, tmp_path):
    import copy

    broken = copy.deepcopy(pipe)
    with torch.no_grad():
        next(broken.decoder.transformer.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="nonfinite_reconstruction"):
        run_bench(broken, references, tmp_path / "out", TOY_BACKBONES, batch_size=4, progress=False)


def test_rows_left_by_an_interrupted_sharded_bench_are_kept(pipe, references, tmp_path, monkeypatch):
    """A sharded bench killed before rank 0 merged: the other ranks' rows (results.jsonl.rank<r>, one cut short) join
    the finished ones on resume and are not redrawn; the scores equal an uninterrupted run's."""
    full = run_bench(pipe, references, tmp_path / "full", TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    out = tmp_path / "resumed"
    run_bench(pipe, references, out, TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    rows = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(rows[:3]) + "\n")
    (out / "results.jsonl.rank1").write_text("\n".join(rows[3:7]) + "\n" + rows[7][:20])  # the last line cut short
    redrawn = []
    original = UAEPipeline.reconstruct
    monkeypatch.setattr(UAEPipeline, "reconstruct", lambda self, images, *a, **k: redrawn.append(len(images))
                        or original(self, images, *a, **k))
    resumed = run_bench(pipe, references, out, TOY_BACKBONES, batch_size=4, seed=3, progress=False)
    assert sum(redrawn) == 3  # images 7, 8, 9
    assert resumed["backbones"] == full["backbones"] and resumed["images"] == 10
    assert not list(out.glob("results.jsonl.rank*"))


def test_grid_and_sweep_plot_images(tmp_path):
    """bench grid.png: one line per image at a readable size (960 px wide, 184 px per line), each 8 px image drawn
    large (nearest-neighbour: > 100 x 100 px of pure red for the red original and its red reconstruction), the
    captions in the PNG's Description. The sweep plot is a PNG with one bar per run."""
    import numpy as np
    from PIL import Image

    from uae_lightning.bench.io import save_grid
    from uae_lightning.sweeps import write_plot

    red, blue = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    red[0], blue[2] = 1.0, 1.0
    save_grid([{"name": "a.png", "original": red, "reconstruction": blue, "caption": "a red square", "score": 51.0},
               {"name": "b.png", "original": blue, "reconstruction": red, "caption": "a blue square", "score": None}],
              tmp_path / "grid.png")
    image = Image.open(tmp_path / "grid.png")
    assert image.size == (960, 368)
    assert image.info["Description"] == "a.png: a red square\nb.png: a blue square"
    pixels = np.asarray(image.convert("RGB")).astype(int)
    is_red = (pixels == [255, 0, 0]).all(-1)
    assert is_red.sum() > 2 * 100 * 100
    top, bottom = is_red[:184], is_red[184:]
    assert top[:, :480].sum() > 100 * 100 and bottom[:, :480].sum() > 100 * 100  # one red cell per line
    assert not is_red[:, 480:].any()  # the caption column holds text only
    rows = [{"run": "a", "overrides": ["lr=1", "x=1"], "metrics": {"g4u/reward": 0.5}},
            {"run": "b", "overrides": ["lr=2", "x=1"], "metrics": {"g4u/reward": 0.61}},
            {"run": "c", "overrides": ["lr=3", "x=1"], "metrics": {}}]
    write_plot(rows, tmp_path, "g4u/reward")
    w, h = Image.open(tmp_path / "sweep.png").size
    assert w > 500 and h > 150
    with pytest.raises(ValueError, match="no run logged"):
        write_plot(rows, tmp_path, "u4g/reward")


def test_without_a_progress_bar_the_bench_logs_its_progress(pipe, references, tmp_path, monkeypatch, caplog):
    """In a log file (progress=False) a long bench still says where it is: a line at most every HEARTBEAT_S seconds
    (0 here: one per batch but the last, which the summary follows); with a progress bar, no such line."""
    import logging

    import uae_lightning.bench.core as core

    monkeypatch.setattr(core, "HEARTBEAT_S", 0.0)
    with caplog.at_level(logging.INFO, logger="uae_lightning.bench"):
        run_bench(pipe, references, tmp_path / "log", TOY_BACKBONES, batch_size=4, progress=False)
        beats = [r.getMessage() for r in caplog.records if "Unified-Bench: batch" in r.getMessage()]
        assert beats == ["Unified-Bench: batch 1 of 3 (4 of this rank's 10 images)",
                         "Unified-Bench: batch 2 of 3 (8 of this rank's 10 images)"]
        caplog.clear()
        run_bench(pipe, references, tmp_path / "bar", TOY_BACKBONES, batch_size=4, progress=True)
        assert not [r for r in caplog.records if "Unified-Bench: batch" in r.getMessage()]
