"""GenEval: each scoring rule worked by hand from the official scorer's rules, the toy world's exact reading, the
Mask2Former + CLIP scorer on tiny random checkpoints, and generate -> score end to end (2 processes, a kill and a
resume)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uae_lightning.bench import geneval
from uae_lightning.bench.detectors import HFScorer, ToyScorer, object_names
from uae_lightning.bench.geneval import Detection, evaluate, keep, relative_position, summarise
from uae_lightning.data import toy
from uae_lightning.rehearsal import save_mask2former

from conftest import random_toy_pipeline, save_tiny_clip


def det(box, score=0.95, mask=None) -> Detection:
    return Detection(tuple(float(v) for v in box), score, mask)


def no_colours(name, dets):
    raise AssertionError("no colour clause here")


# ---- the rules, by hand ------------------------------------------------------------------------------------------
def test_boxes_come_from_masks_as_the_official_detector_derives_them():
    mask = np.zeros((8, 10), bool)
    mask[1:3, 2:5] = True  # rows 1-2, columns 2-4
    mask[6, 3] = True  # a stray pixel far below widens the box
    assert geneval.box_from_mask(mask) == (2.0, 1.0, 5.0, 7.0)  # [x1, y1, x_last + 1, y_last + 1]
    assert geneval.box_from_mask(np.zeros((4, 4), bool)) is None


def test_counting_keeps_only_detections_above_0_9_and_other_tags_above_0_3():
    candidates = {"dog": [det((0, 0, 2, 2), 0.95), det((4, 0, 6, 2), 0.9), det((8, 0, 10, 2), 0.91),
                          det((0, 4, 2, 6), 0.31), det((4, 4, 6, 6), 0.3)]}
    counted = keep(candidates, "counting")["dog"]
    assert [d.score for d in counted] == [0.95, 0.91]  # 0.9 itself is not above 0.9; most confident first
    assert [d.score for d in keep(candidates, "two_object")["dog"]] == [0.95, 0.91, 0.9, 0.31]  # 0.3 is not above
    prompt = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}
    assert evaluate(keep(candidates, "counting"), prompt, no_colours) == (False, "expected dog>=3, found 2")
    many = {"dog": [det((i, 0, i + 1, 1), 0.99) for i in range(20)]}
    assert len(keep(many, "counting")["dog"]) == geneval.MAX_OBJECTS == 16


def test_an_exclude_clause_makes_an_image_with_one_too_many_wrong():
    prompt = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    two = {"cat": [det((0, 0, 2, 2)), det((5, 5, 7, 7))]}
    assert evaluate(two, prompt, no_colours) == (True, "")
    three = {"cat": two["cat"] + [det((9, 9, 10, 10))]}
    assert evaluate(three, prompt, no_colours) == (False, "expected cat<3, found 3")


@pytest.mark.parametrize("relation, offset", [("right of", (1, 0)), ("left of", (-1, 0)), ("below", (0, 1)),
                                              ("above", (0, -1))])
def test_each_relation_holds_beyond_its_boundary_and_not_before(relation, offset):
    # Two 10 x 10 boxes: the offset is shrunk by 0.1 x (10 + 10) = 2 per axis, then divided by its length. Along one
    # axis the relation needs (|d| - 2) / |d| > 0.5, i.e. |d| > 4 pixels.
    b = det((20, 20, 30, 30))
    for distance, expected in ((3.9, set()), (4.1, {relation})):
        dx, dy = offset[0] * distance, offset[1] * distance
        a = det((20 + dx, 20 + dy, 30 + dx, 30 + dy))
        assert relative_position(a, b) == expected, (relation, distance)
    # Diagonal (6, 6): (4, 4) / 8.49 = 0.47 each, no relation; (7, 7): (5, 5) / 9.90 = 0.505, right of and below.
    assert relative_position(det((26, 26, 36, 36)), b) == set()
    assert relative_position(det((27, 27, 37, 37)), b) == {"right of", "below"}
    # Within the shrink on both axes: no relation at all (not even the sign of the offset).
    assert relative_position(det((21, 19, 31, 29)), b) == set()


def test_a_position_clause_checks_every_object_against_the_clause_it_names():
    prompt = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                             {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    bench = det((50, 0, 60, 10))
    assert evaluate({"bench": [bench], "dog": [det((0, 0, 10, 10))]}, prompt, no_colours) == (True, "")
    correct, reason = evaluate({"bench": [bench], "dog": [det((80, 0, 90, 10))]}, prompt, no_colours)
    assert not correct and reason == "expected dog left of target, found right of target"
    correct, reason = evaluate({"dog": [det((0, 0, 10, 10))]}, prompt, no_colours)  # clause 0 did not match
    assert not correct and reason == "expected bench>=1, found 0\nno target for dog to be left of"


def test_a_colour_clause_needs_every_checked_object_in_that_colour():
    prompt = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "red"}]}
    cars = {"car": [det((0, 0, 2, 2), 0.9), det((3, 0, 5, 2), 0.8), det((6, 0, 8, 2), 0.7)]}
    seen = []

    def colours(name, dets):
        seen.append((name, [d.score for d in dets]))
        return ["red", "blue"]

    correct, reason = evaluate(cars, prompt, colours)
    assert seen == [("car", [0.9, 0.8])]  # the `count` most confident are the ones classified
    assert not correct and reason == "expected red car>=2, found 1 red; and 1 red, 1 blue"
    assert evaluate(cars, prompt, lambda n, d: ["red", "red"]) == (True, "")


def test_the_overall_score_is_the_mean_over_tags_not_over_images():
    rows = [{"tag": "colors", "correct": True, "metadata": "a"},
            {"tag": "counting", "correct": False, "metadata": "b"},
            {"tag": "counting", "correct": False, "metadata": "b"},
            {"tag": "counting", "correct": True, "metadata": "c"}]
    s = summarise(rows)
    assert s["tags"] == {"colors": 1.0, "counting": pytest.approx(1 / 3)}
    assert s["overall"] == pytest.approx((1 + 1 / 3) / 2)  # over images it would be 0.5
    assert s["correct_images"] == 0.5 and s["correct_prompts"] == pytest.approx(2 / 3)


def test_the_official_prompts_ship_with_the_package():
    prompts = geneval.official_prompts()
    assert len(prompts) == 553
    counts = {t: sum(p["tag"] == t for p in prompts) for t in geneval.TAGS}
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}


# ---- the colour classifier ---------------------------------------------------------------------------------------
class StubTokenizer:
    """Keeps each text and hands its index to the stub model as its only token."""

    def __init__(self):
        self.texts: list[str] = []

    def __call__(self, texts, padding, return_tensors):
        from transformers import BatchEncoding

        self.texts += texts
        return BatchEncoding({"input_ids": torch.arange(len(self.texts) - len(texts), len(self.texts))[:, None]})


class StubClip(torch.nn.Module):
    """Text features chosen so that only the official aggregation picks red: red's first template points away
    (norm 10), its other two at the image; every blue template half-way. Normalise-then-average: red 0.894, blue
    0.707. Averaging raw features (red 0.196) or taking the first template alone (red 0) would pick blue."""

    dtype = torch.float32

    def __init__(self, tokenizer: StubTokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def get_text_features(self, input_ids, **kwargs):
        out = []
        for text in (self.tokenizer.texts[i] for i in input_ids[:, 0].tolist()):
            first_template = "-colored" not in text and not text.endswith("object")
            if " red" in text:
                out.append(torch.tensor([0.0, 10.0, 0, 0]) if first_template else torch.tensor([1.0, 0, 0, 0]))
            elif " blue" in text:
                out.append(torch.tensor([1.0, 1.0, 0, 0]))
            else:
                out.append(torch.tensor([0.0, 0, 0, 1.0]))
        return torch.stack(out)

    def get_image_features(self, pixel_values):
        return torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(len(pixel_values), 4)


def test_colour_classifier_averages_normalised_templates_and_sees_the_object_through_its_mask_on_grey():
    scorer = HFScorer.__new__(HFScorer)  # the real methods, stub models
    tokenizer = StubTokenizer()
    scorer.tokenizer, scorer.clip, scorer.device, scorer._classifiers = tokenizer, StubClip(tokenizer), torch.device("cpu"), {}
    crops = []

    class Processor:
        def __call__(self, images, return_tensors):
            crops.extend(images)
            return {"pixel_values": torch.zeros(len(images), 3, 4, 4)}

    scorer.clip_processor = Processor()
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, :] = (0, 0, 255)  # blue everywhere...
    mask = np.zeros((20, 20), bool)
    mask[5:9, 4:10] = True  # ...a red object here, the rest of its box is blue
    image[mask] = (255, 0, 0)
    mask[10, 12] = True  # one more pixel of the object: the box reaches it
    d = Detection(geneval.box_from_mask(mask), 0.9, mask)
    assert scorer.colours(Image.fromarray(image), "car", [d]) == ["red"]
    crop = np.asarray(crops[0])
    assert crop.shape == (6, 9, 3)  # the box: rows 5-10, columns 4-12
    assert (crop[0:4, 0:6] == (255, 0, 0)).all()  # the object through its mask
    assert (crop[4, 0] == (153, 153, 153)).all() and (crop[0, 8] == (153, 153, 153)).all()  # #999 elsewhere
    assert (crop[5, 8] == (0, 0, 255)).all()  # the stray mask pixel keeps its own (blue) colour


# ---- the toy world's reading ---------------------------------------------------------------------------------------
def prompt_scene(prompt: dict) -> toy.Scene:
    return toy.Scene(tuple(toy.ToyObject(m["shape"], m["colour"], m["size"], toy.POSITIONS.index(m["position"]))
                           for m in toy.parse_caption(prompt["prompt"])))


def score_images(scorer, prompts, images) -> dict:
    rows = []
    for p, image in zip(prompts, images):
        correct, reason = evaluate(keep(scorer.detect([image])[0], p["tag"]), p,
                                   lambda n, d: scorer.colours(image, n, d), scorer.colour_names)
        rows.append({"tag": p["tag"], "correct": correct, "metadata": json.dumps(p), "reason": reason})
    return summarise(rows) | {"rows": rows}


def test_the_toy_prompts_drawn_by_the_toy_world_score_100_and_a_wrong_detail_fails():
    prompts = geneval.toy_prompts()
    assert sorted({p["tag"] for p in prompts}) == sorted(geneval.TAGS) and len({json.dumps(p) for p in prompts}) == 48
    scorer = ToyScorer()
    drawn = [toy.render(prompt_scene(p), 32) for p in prompts]
    s = score_images(scorer, prompts, drawn)
    assert s["overall"] == 1.0, [r for r in s["rows"] if not r["correct"]]
    wrong = []  # every prompt's scene with one detail wrong: the first object's colour for the colour tags, the two
    for p in prompts:  # objects' places swapped for position, else the first object's shape
        scene = prompt_scene(p)
        o, rest = scene.objects[0], scene.objects[1:]
        if p["tag"] in ("colors", "color_attr"):
            o = toy.ToyObject(o.shape, next(c for c in toy.COLOURS if c != o.colour), o.size, o.position)
        elif p["tag"] == "position":
            other = rest[0]
            o, rest = (toy.ToyObject(o.shape, o.colour, o.size, other.position),
                       (toy.ToyObject(other.shape, other.colour, other.size, o.position),))
        else:
            o = toy.ToyObject(next(s for s in toy.SHAPES if s != o.shape), o.colour, o.size, o.position)
        wrong.append(toy.render(toy.Scene((o,) + rest), 32))
    s = score_images(scorer, prompts, wrong)
    assert s["correct_images"] == 0.0, [r["metadata"] for r in s["rows"] if r["correct"]]


# ---- Mask2Former + CLIP on tiny checkpoints; generate -> score end to end -----------------------------------------
def save_tiny_mask2former(path: Path, boost: int | None = None) -> None:
    save_mask2former(path, width=16, queries=10, boost=boost)


def test_mask2former_detections_are_unfiltered_with_boxes_from_their_masks(tmp_path):
    save_tiny_mask2former(tmp_path / "m2f")
    save_tiny_clip(tmp_path / "clip")
    scorer = HFScorer(str(tmp_path / "m2f"), str(tmp_path / "clip"))
    image = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    found = scorer.detect([image])[0]
    dets = [d for v in found.values() for d in v]
    # The top num_queries (query, class) pairs, none dropped by a threshold (a random model's scores are ~1/81; the
    # rules filter at 0.3, so none is kept there).
    assert len(dets) == 10 and max(d.score for d in dets) < 0.3 and keep(found, "single_object") == {}
    for d in dets:
        assert d.mask.shape == (48, 40) and d.box == geneval.box_from_mask(d.mask)
    with pytest.raises(ValueError, match="80"):
        from transformers import Mask2FormerConfig

        c = Mask2FormerConfig.from_pretrained(tmp_path / "m2f")
        c.num_labels = 3
        c.id2label = {i: str(i) for i in range(3)}
        c.label2id = {str(i): i for i in range(3)}
        c.save_pretrained(tmp_path / "m2f")
        HFScorer(str(tmp_path / "m2f"), str(tmp_path / "clip"))


def run_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uae_lightning.bench", "geneval", *args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kw)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    pipe = random_toy_pipeline(tmp_path_factory.mktemp("w"), num_steps=3, max_new_tokens=12)
    return pipe.save_pretrained(tmp_path_factory.mktemp("export") / "uae")


@pytest.mark.slow
def test_generate_on_2_processes_with_a_kill_and_a_resume_then_score_with_mask2former_and_clip(export, tmp_path):
    """A fixed subset of the official prompts (one per tag), 4 images each, drawn by 2 processes (SLURM tasks) of
    which the first is killed once and re-run; the images equal a 1-process run's, and the scorer writes the
    official result lines."""
    indices = geneval.subset(geneval.official_prompts(), 6)
    assert len(indices) == 6 and {geneval.official_prompts()[i]["tag"] for i in indices} == set(geneval.TAGS)
    rank0_images = [f"{i:05d}/samples/{s:04d}.png" for i in indices[0::2] for s in range(4)]
    args = ["generate", "--model", str(export), "--prompts", "official", "--max-prompts", "6", "--batch-size", "2",
            "--device", "cpu"]
    single = run_cli(args + ["--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-3000:]
    out = tmp_path / "two"
    rank0 = subprocess.Popen([sys.executable, "-m", "uae_lightning.bench", "geneval", *args, "--out", str(out)],
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and sum((out / f).is_file() for f in rank0_images) < 2:
        time.sleep(0.05)
    rank0.kill()
    rank0.wait()
    killed_with = sum((out / f).is_file() for f in rank0_images)
    assert 2 <= killed_with < 12, killed_with  # killed mid-way
    for rank in (1, 0):  # the other task, then the killed one re-run: it resumes
        r = run_cli(args + ["--out", str(out)], env={"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2"})
        assert r.returncode == 0, r.stderr[-3000:]
        if rank == 0:
            assert f"drew {12 - killed_with} images (rank 0 of 2)" in r.stdout
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    two = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert one == two and len(one) == 24 and not list(out.rglob("*.partial"))
    for rel in one:  # each image's noise is its own: the same image whatever process drew it
        assert (tmp_path / "one" / rel).read_bytes() == (out / rel).read_bytes(), rel
    first = json.loads((out / "00000" / "metadata.jsonl").read_text())
    assert first == geneval.official_prompts()[0]
    generation = json.loads((out / "generation.json").read_text())
    assert generation["resolution"] == 32 and generation["prompt_indices"] == indices

    save_tiny_mask2former(tmp_path / "m2f", boost=object_names().index(first["include"][0]["class"]))
    save_tiny_clip(tmp_path / "clip")
    r = run_cli(["score", str(out), "--detector", str(tmp_path / "m2f"), "--clip", str(tmp_path / "clip"),
                 "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and all(tuple(x) == geneval.RESULT_KEYS for x in lines)
    bench_rows = [x for x in lines if x["filename"].startswith("00000/")]
    assert len(bench_rows) == 4 and set(summarise(lines)["tags"]) == set(geneval.TAGS)
    assert all(x["correct"] for x in bench_rows)  # the boosted class is found in every image of its prompt
    assert all(first["include"][0]["class"] in json.loads(x["details"]) for x in bench_rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 24 and summary["prompts"] == 6 and summary["generation"]["samples_per_prompt"] == 4
    assert summary["overall"] == pytest.approx(np.mean(list(summary["tags"].values())))
    assert (out / "results.md").is_file() and len(list((out / "failures").glob("*.png"))) == 20
    # Resuming the score: nothing is scored again, the summary is the same.
    again = run_cli(["score", str(out), "--detector", str(tmp_path / "m2f"), "--clip", str(tmp_path / "clip"),
                     "--device", "cpu"])
    assert again.returncode == 0 and "24 of 24 images already scored" in again.stderr
    assert json.loads((out / "summary.json").read_text())["overall"] == summary["overall"]
