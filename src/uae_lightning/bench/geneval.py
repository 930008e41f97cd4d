"""GenEval (Ghosh et al. 2023): object-level prompt following of the decoder, scored by the official rules.

Layout (the official one): `DIR/<NNNNN>/metadata.jsonl` (the prompt's line), `DIR/<NNNNN>/samples/<0000>.png`;
only folders named by digits and files named `<digits>.png` are read. Scoring keeps a detector's detections per class
above `threshold` (0.3; 0.9 for the `counting` tag), most confident first, at most 16 per class, and checks every
`include` clause (count, colour, position relative to an earlier clause) and no `exclude` clause. The summary is the
share of correct images per tag; GenEval's overall score is the mean over tags, not over images.

The rules are implemented here from the official scorer's facts (`../shared/reference/geneval/README.md` of the
project's design notes; README.md "GenEval"). Detectors and colour classifiers are in `bench/detectors.py`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np

from uae_lightning.distributed import shard

log = logging.getLogger(__name__)

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RESULT_KEYS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
SAMPLES = 4  # images per prompt


@dataclass
class Detection:
    """One detected object: box [x1, y1, x2, y2] in pixels (from its mask when it has one), score, binary mask."""
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = field(default=None, repr=False)

    def as_list(self) -> list[float]:
        return [*map(float, self.box), float(self.score)]


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The tightest box around a binary mask's pixels, [x1, y1, x2 + 1, y2 + 1] (as the official detector derives
    Mask2Former's boxes); None for an empty mask."""
    xs, ys = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if not len(xs) or not len(ys):
        return None
    return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)


def keep(candidates: dict[str, list[Detection]], tag: str) -> dict[str, list[Detection]]:
    """The official filtering of one image's detections: per class, score > threshold (counting_threshold for the
    `counting` tag), most confident first, at most MAX_OBJECTS (no NMS: the official max_overlap is 1.0)."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for name, dets in candidates.items():
        dets = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        if dets:
            kept[name] = dets
    return kept


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Where box a stands relative to box b: offsets between centres, shrunk by 0.1 x the sum of the two boxes'
    sizes per axis (no relation when both shrink to 0), then normalised by the offset's length; a component beyond
    +-0.5 is a relation. Image y grows downward ("above": a's centre higher)."""
    ba, bb = np.asarray(a.box, dtype=np.float64), np.asarray(b.box, dtype=np.float64)
    centre_a, centre_b = (ba[:2] + ba[2:]) / 2, (bb[:2] + bb[2:]) / 2
    size_a, size_b = np.abs(ba[2:] - ba[:2]), np.abs(bb[2:] - bb[:2])
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


ColourFn = Callable[[str, list[Detection]], list[str]]


def evaluate(detected: dict[str, list[Detection]], metadata: dict, colours: ColourFn,
             colour_names: Iterable[str] = COLORS) -> tuple[bool, str]:
    """(correct, reason) of one image under the official rules, `detected` already filtered (`keep`).

    include clauses hold together (AND); the `count` most confident detections of a class are the ones checked;
    with `color` every one of them must be classified that colour (`colours(class, detections)`); with
    `position: [relation, i]` clause i must have matched, and each checked object must stand in that relation to
    each object clause i matched. Any exclude clause with `count` or more detections makes the image wrong."""
    correct, reasons, matched_groups = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = detected.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                got = colours(name, found)
                want = clause["color"]
                if got.count(want) < count:
                    matched = False
                    reasons.append(f"expected {want} {name}>={count}, found {got.count(want)} {want}; and "
                                   + ", ".join(f"{got.count(c)} {c}" for c in colour_names if c in got))
            if "position" in clause and matched:
                relation, target = clause["position"]
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        wrong = next((rels for t in matched_groups[target]
                                      if relation not in (rels := relative_position(obj, t))), None)
                        if wrong is not None:
                            matched = False
                            reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(wrong))} target")
                            break
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(detected.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(detected[name])}")
    return correct, "\n".join(reasons)


def summarise(rows: list[dict]) -> dict:
    """The official summary: per tag the share of correct images; overall = the mean over tags (each tag weighs the
    same whatever its number of images); also the share of correct images and of prompts with a correct image."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_tag[r["tag"]].append(bool(r["correct"]))
        by_prompt[r["metadata"]].append(bool(r["correct"]))
    tags = {t: float(np.mean(v)) for t, v in by_tag.items()}
    return {"overall": float(np.mean(list(tags.values()))) if tags else float("nan"), "tags": tags,
            "tag_counts": {t: [int(sum(v)), len(v)] for t, v in by_tag.items()},
            "correct_images": float(np.mean([bool(r["correct"]) for r in rows])) if rows else float("nan"),
            "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()])) if rows else float("nan"),
            "images": len(rows), "prompts": len(by_prompt)}


def format_summary(summary: dict) -> str:
    """A markdown table: one row per tag, then the overall score (mean over tags) and the image and prompt shares."""
    lines = ["| tag | correct images | score |", "|---|---:|---:|"]
    for tag, score in summary["tags"].items():
        ok, n = summary["tag_counts"][tag]
        lines.append(f"| {tag} | {ok} / {n} | {score:.4f} |")
    lines += [f"| **overall (mean over tags)** | | **{summary['overall']:.4f}** |",
              f"| % correct images | {summary['images']} images | {100 * summary['correct_images']:.2f} |",
              f"| % prompts with a correct image | {summary['prompts']} prompts | {100 * summary['correct_prompts']:.2f} |"]
    return "\n".join(lines)


# ---- prompts -------------------------------------------------------------------------------------------------------
def official_prompts() -> list[dict]:
    """The official 553 prompts (evaluation_metadata.jsonl, shipped with the package)."""
    path = Path(__file__).with_name("geneval_prompts.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_prompts(source: str) -> list[dict]:
    """`official`, `toy`, or a JSONL file of prompts in the official format."""
    if source == "official":
        return official_prompts()
    if source == "toy":
        return toy_prompts()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompts {source!r}: expected official, toy or a JSONL file in GenEval's format")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def toy_prompts(per_tag: int = 8, seed: int = 0) -> list[dict]:
    """GenEval's six tags over the toy world: prompts are complete toy captions (what the toy decoder reads), each
    with the clauses its tag checks. Classes are shapes, colours the toy palette, positions grid cells: `position`
    puts two objects in one row or one column; `counting` repeats one shape 2 or 3 times (and excludes one more).
    A fixed set: the same `seed` gives the same prompts."""
    from uae_lightning.data import toy

    rng = random.Random(seed)
    colours, sizes = list(toy.COLOURS), list(toy.SIZES)
    prompts = []

    def obj(shape: str, cell: int, colour: str | None = None) -> "toy.ToyObject":
        return toy.ToyObject(shape, colour or rng.choice(colours), rng.choice(sizes), cell)

    def add(tag: str, objects: list, include: list[dict], exclude: list[dict] | None = None) -> None:
        scene = toy.Scene(tuple(sorted(objects, key=lambda o: o.position)))
        line = {"tag": tag, "include": include, "prompt": toy.caption(scene, "complete")}
        if exclude:
            line["exclude"] = exclude
        if line not in prompts:  # a drawn duplicate is drawn again
            prompts.append(line)

    def tag_count(tag: str) -> int:
        return sum(p["tag"] == tag for p in prompts)

    while tag_count("single_object") < per_tag:
        shape = rng.choice(toy.SHAPES)
        add("single_object", [obj(shape, rng.randrange(9))], [{"class": shape, "count": 1}])
    while tag_count("two_object") < per_tag:
        a, b = rng.sample(toy.SHAPES, 2)
        ca, cb = rng.sample(range(9), 2)
        add("two_object", [obj(a, ca), obj(b, cb)], [{"class": a, "count": 1}, {"class": b, "count": 1}])
    while tag_count("counting") < per_tag:
        shape, n = rng.choice(toy.SHAPES), 2 + tag_count("counting") % 2
        add("counting", [obj(shape, c) for c in rng.sample(range(9), n)], [{"class": shape, "count": n}],
            [{"class": shape, "count": n + 1}])
    while tag_count("colors") < per_tag:
        shape, colour = rng.choice(toy.SHAPES), rng.choice(colours)
        add("colors", [obj(shape, rng.randrange(9), colour)], [{"class": shape, "count": 1, "color": colour}])
    while tag_count("position") < per_tag:
        i = tag_count("position")
        a, b = rng.sample(toy.SHAPES, 2)
        line = rng.randrange(3)
        if i % 2 == 0:  # one row: a left or right of b
            ca, cb = (3 * line + c for c in rng.sample(range(3), 2))
            relation = "left of" if ca < cb else "right of"
        else:  # one column: a above or below b
            ca, cb = (3 * r + line for r in rng.sample(range(3), 2))
            relation = "above" if ca < cb else "below"
        add("position", [obj(a, ca), obj(b, cb)],
            [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}])
    while tag_count("color_attr") < per_tag:
        a, b = rng.sample(toy.SHAPES, 2)
        ca, cb = rng.sample(colours, 2)
        pa, pb = rng.sample(range(9), 2)
        add("color_attr", [obj(a, pa, ca), obj(b, pb, cb)],
            [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}])
    return prompts


# ---- the official folder layout ------------------------------------------------------------------------------------
def sample_seed(prompt_index: int, sample_index: int, base: int = 0) -> int:
    """The noise seed of one image: its own for every (prompt, sample), so a result does not depend on batching,
    ranks or resumes."""
    return base + 1000 * prompt_index + sample_index


def layout(folder: str | Path) -> list[tuple[Path, dict]]:
    """Every image of a folder in the official layout, with its prompt's metadata, in prompt and sample order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_file = sub / "metadata.jsonl"
        if not meta_file.is_file():
            log.warning("GenEval: %s has no metadata.jsonl; skipped", sub)
            continue
        metadata = json.loads(meta_file.read_text())
        samples = sub / "samples"
        names = sorted(p for p in samples.iterdir() if re.fullmatch(r"\d+\.png", p.name)) if samples.is_dir() else []
        items += [(p, metadata) for p in names]
    if not items:
        raise FileNotFoundError(f"{folder}: no images in GenEval's layout (<NNNNN>/samples/<NNNN>.png + metadata.jsonl)")
    return items


def atomic_write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


class Scorer(Protocol):
    """Detections and colours of one image: `detect` returns every candidate per class, unfiltered (the rules
    filter); `colours` classifies detections of one class."""
    colour_names: tuple[str, ...]

    def detect(self, images: list) -> list[dict[str, list[Detection]]]: ...

    def colours(self, image, name: str, detections: list[Detection]) -> list[str]: ...


# ---- generate ------------------------------------------------------------------------------------------------------
GENERATION = "generation.json"


def check_settings(out: Path, settings: dict) -> None:
    """Write the generation settings, or check that a folder being resumed was made with the same ones."""
    from uae_lightning.checkpointing import resume_settings

    changed = resume_settings(out / GENERATION, settings)
    if changed:
        raise ValueError(f"{out} holds GenEval images made with other settings ({', '.join(changed)}: "
                         f"{[v[0] for v in changed.values()]} there, {[v[1] for v in changed.values()]} now); "
                         f"give another --out")


def subset(prompts: list[dict], n: int | None) -> list[int]:
    """The indices of a fixed subset of about `n` prompts spread over the tags: each tag's first ceil(n / tags)
    prompts, in file order (None: all). The indices are the prompts' own, so a subset's images are the full set's."""
    if n is None or n >= len(prompts):
        return list(range(len(prompts)))
    tags = list(dict.fromkeys(p["tag"] for p in prompts))
    per_tag = -(-n // len(tags))
    seen: dict[str, int] = defaultdict(int)
    chosen = []
    for i, p in enumerate(prompts):
        if seen[p["tag"]] < per_tag:
            seen[p["tag"]] += 1
            chosen.append(i)
    return chosen


def generation_settings(pipe, num_prompts: int, samples: int, seed: int, num_steps: int | None, prompt_source: str,
                        indices: list[int]) -> dict:
    """What a folder of GenEval images depends on besides the weights (generation.json)."""
    return {"prompts": prompt_source, "prompt_indices": indices if len(indices) < num_prompts else "all",
            "samples_per_prompt": samples, "seed": seed, "seed_rule": "seed + 1000 * prompt index + sample index",
            "resolution": pipe.resolution, "num_steps": num_steps or pipe.num_steps,
            "guidance_scale": pipe.guidance_scale, "negative_prompt": pipe.negative_prompt}


def generate(pipe, prompts: list[dict], out: str | Path, samples: int = SAMPLES, batch_size: int = 16,
             seed: int = 0, num_steps: int | None = None, progress: bool = True, prompt_source: str = "",
             indices: list[int] | None = None, rank: int | None = None, world: int | None = None) -> int:
    """Draw `samples` images per prompt into `out` in the official layout; returns how many this process drew.

    The prompt reaches the decoder as a caption does (the pipeline's generate message, connector, resolution,
    steps, CFG); image (p, s) starts from the noise of `sample_seed(p, s, seed)`. Prompts are split over the
    processes (`shard()`: the k-th prompt of `indices` (default: all) goes to rank k % world); an image already on
    disk is kept, so re-running resumes. The settings are written to generation.json (and checked when resuming)."""
    from tqdm.auto import tqdm

    from uae_lightning.bench.io import save_png
    from uae_lightning.callbacks import preemption

    out = Path(out)
    if rank is None or world is None:
        rank, world = shard()
    indices = list(range(len(prompts))) if indices is None else list(indices)
    check_settings(out, generation_settings(pipe, len(prompts), samples, seed, num_steps, prompt_source, indices))
    mine = []
    for p in indices[rank::world]:
        folder = out / f"{p:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            atomic_write(meta, json.dumps(prompts[p]))
        mine += [(p, s) for s in range(samples)]
    # Every rank goes through the same number of batches (images already on disk are skipped inside them), so the
    # preemption check after each batch is a collective every rank of a training run reaches.
    n_batches = -(-(-(-len(indices) // world) * samples) // batch_size)
    todo = {(p, s) for p, s in mine if not (out / f"{p:05d}" / "samples" / f"{s:04d}.png").is_file()}
    if len(todo) < len(mine):
        log.info("GenEval: %d of this process's %d images already drawn in %s; resuming", len(mine) - len(todo),
                 len(mine), out)
    bar = tqdm(total=len(todo), desc=f"GenEval images (rank {rank})" if world > 1 else "GenEval images", unit="img",
               disable=not progress)
    for k in range(n_batches):
        batch = [item for item in mine[k * batch_size : (k + 1) * batch_size] if item in todo]
        if batch:
            images = pipe.generate([prompts[p]["prompt"] for p, _ in batch],
                                   [sample_seed(p, s, seed) for p, s in batch], num_steps)
            for (p, s), image in zip(batch, images):
                save_png(image.nan_to_num(), out / f"{p:05d}" / "samples" / f"{s:04d}.png")
            bar.update(len(batch))
        if preemption.agreed() and k + 1 < n_batches:
            bar.close()
            raise preemption.Preempted(f"GenEval generation into {out}, after batch {k + 1} of {n_batches}")
    bar.close()
    return len(todo)


# ---- score ---------------------------------------------------------------------------------------------------------
RESULTS, SUMMARY, TABLE = "results.jsonl", "summary.json", "results.md"


def score(folder: str | Path, scorer: Scorer, out: str | Path | None = None, progress: bool = True,
          max_failure_pictures: int = 32) -> dict:
    """Score every image of a folder in the official layout; writes to `out` (default: the folder) results.jsonl
    (one line per image, the official keys: filename, tag, prompt, correct, reason, metadata, details = the kept
    detections' boxes and scores per class), summary.json, results.md, and failures/: pictures of wrong images
    with their kept detections and the reasons. Images already in results.jsonl are not scored again."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    out = Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    items = layout(folder)
    results_file = out / RESULTS
    rows = {}
    if results_file.is_file():
        for line in results_file.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[row["filename"]] = row
            except (json.JSONDecodeError, KeyError):  # a line cut by a kill: that image is scored again
                continue
    rel = {path: str(path.relative_to(folder)) for path, _ in items}
    todo = [(path, meta) for path, meta in items if rel[path] not in rows]
    if len(todo) < len(items):
        log.info("GenEval: %d of %d images already scored in %s; resuming", len(items) - len(todo), len(items), out)
    failures = out / "failures"
    drawn = len(list(failures.glob("*.png"))) if failures.is_dir() else 0
    with results_file.open("a") as f:
        for path, metadata in tqdm(todo, desc="GenEval scoring", unit="img", disable=not progress):
            image = _open(path)
            detected = keep(scorer.detect([image])[0], metadata["tag"])
            correct, reason = evaluate(detected, metadata, lambda name, dets: scorer.colours(image, name, dets),
                                       scorer.colour_names)
            row = {"filename": rel[path], "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": correct,
                   "reason": reason, "metadata": json.dumps(metadata),
                   "details": json.dumps({k: [d.as_list() for d in v] for k, v in detected.items()})}
            f.write(json.dumps(row) + "\n")
            f.flush()
            rows[rel[path]] = row
            if not correct and drawn < max_failure_pictures:
                draw_failure(image, detected, row, failures / (rel[path].replace("/samples/", "_").replace("/", "_")))
                drawn += 1
    ordered = [rows[rel[path]] for path, _ in items]
    summary = {**summarise(ordered), "scorer": getattr(scorer, "settings", {}), "folder": str(folder)}
    generation = folder / GENERATION
    if generation.is_file():
        summary["generation"] = json.loads(generation.read_text())
    atomic_write(out / SUMMARY, json.dumps(summary, indent=2))
    atomic_write(out / TABLE, f"# GenEval of {folder}\n\n{format_summary(summary)}\n")
    return summary


def _open(path: Path):
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def draw_failure(image, detected: dict[str, list[Detection]], row: dict, path: Path, width: int = 384) -> None:
    """A wrong image, enlarged (nearest neighbour), with its kept detections (box, class, score) and, below, the
    prompt and the reasons it is wrong."""
    import textwrap

    from PIL import Image, ImageDraw

    scale = width / image.width
    big = image.resize((width, round(image.height * scale)), Image.Resampling.NEAREST)
    lines = textwrap.wrap(row["prompt"], 60) + [r for reason in row["reason"].split("\n") for r in textwrap.wrap(reason, 60)]
    canvas = Image.new("RGB", (width, big.height + 14 * len(lines) + 8), (255, 255, 255))
    canvas.paste(big, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for name, dets in detected.items():
        for d in dets:
            box = [v * scale for v in d.box]
            draw.rectangle(box, outline=(255, 0, 255), width=2)
            draw.text((box[0] + 2, box[1] + 1), f"{name} {d.score:.2f}", fill=(255, 0, 255))
    for i, line in enumerate(lines):
        draw.text((4, big.height + 4 + 14 * i), line, fill=(0, 0, 0) if i < len(textwrap.wrap(row["prompt"], 60)) else (180, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.png")
    canvas.save(tmp)
    os.replace(tmp, path)
