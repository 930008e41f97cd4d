"""Unified-Bench (PAPER.md "Unified-Bench"): caption each reference image, redraw it from its own caption through
the text bottleneck, and score original vs reconstruction by cosine similarity under each backbone.

Score per backbone = mean over images; overall = mean of the backbone means x 100.

Outputs in the output folder:
    results.jsonl      one line per image: image, caption, reconstruction, scores {backbone: cosine}
    reconstructions/   the redrawn images (PNG, same relative names as the references)
    summary.json       per-backbone means, overall, image and skip counts
    results.md         the same as a markdown table
    grid.png           the first images: original | reconstruction | caption and score, one line each

A re-run skips images already in results.jsonl, so an interrupted run resumes and ends with the same numbers:
each image's noise comes from its name and the seed, never from its position in a batch.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from uae_lightning.callbacks import preemption
from uae_lightning.bench.io import IMAGE_SUFFIXES, list_images, load_tensor, png_names, save_grid, save_png, to_uint8
from uae_lightning.distributed import barrier, process_group
from uae_lightning.choices import PAPER_BACKBONES
from uae_lightning.models.decoder import seed_for
from uae_lightning.rewards.backbones import Similarity

log = logging.getLogger("uae_lightning.bench")
HEARTBEAT_S = 60.0  # without a progress bar (a log file), a progress line at most this often

DEFAULT_BACKBONES = list(PAPER_BACKBONES)  # clip, dinov2, dinov3, longclip
RESULTS, SUMMARY = "results.jsonl", "summary.json"


class Scorer:
    """Cosine similarity of original vs reconstruction under each backbone (same backbones as the rewards)."""

    def __init__(self, backbones: list[str], device: str | torch.device = "cpu", sources: dict[str, str] | None = None):
        if not backbones:
            raise ValueError("Unified-Bench needs at least one backbone")
        self.names = list(backbones)
        self.similarity = Similarity({b: 1.0 for b in self.names}, sources).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, list[float]]:
        scores = self.similarity.per_backbone(reconstructions.to(self.device), originals.to(self.device))
        return {k: v.float().cpu().tolist() for k, v in scores.items()}


def quantize(images: torch.Tensor) -> torch.Tensor:
    """What an 8-bit PNG of `images` holds: scoring this equals scoring the saved file."""
    return torch.stack([torch.from_numpy(to_uint8(img)).permute(2, 0, 1).float() / 255.0 for img in images])


class Results:
    """results.jsonl: the finished images (read back on resume) and one appended line per newly finished image.

    settings.json beside it holds the settings that produced them (seed, steps, resolution, backbones, ...): rows are
    reused only under the same settings. Under others, `fresh=True` starts afresh (the in-run bench of a stage) and
    otherwise a ValueError names what changed (a user's --out)."""

    def __init__(self, out: Path, settings: dict, fresh: bool = False):
        self.path = out / RESULTS
        self.rows: dict[str, dict] = {}
        settings_file = out / "settings.json"
        settings = json.loads(json.dumps(settings))  # as it reads back
        old = json.loads(settings_file.read_text()) if settings_file.is_file() else None
        if old is not None and old != settings and (self.path.is_file() or any(out.glob(RESULTS + ".rank*"))):
            changed = {k: (old.get(k), settings.get(k)) for k in sorted({*old, *settings}) if old.get(k) != settings.get(k)}
            if not fresh:
                raise ValueError(f"{out} holds results made with other settings ({changed}): give another output "
                                 f"folder or delete {self.path}")
            log.warning("Unified-Bench: %s was made with other settings (%s); starting afresh", out, changed)
            self.path.unlink(missing_ok=True)
            for left in out.glob(RESULTS + ".rank*"):
                left.unlink()
        settings_file.write_text(json.dumps(settings, indent=2))
        # Rows of an interrupted sharded bench (one file per rank) join the finished ones.
        for path in [self.path, *sorted(out.glob(RESULTS + ".rank*"))]:
            if path.is_file():
                self.rows.update(read_rows(path))
        if self.rows:
            self._rewrite()  # without any partial line, so appends start on a clean line
        for left in out.glob(RESULTS + ".rank*"):
            left.unlink()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(RESULTS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows.values()))
        tmp.replace(self.path)

    def add(self, row: dict) -> None:
        self.rows[row["image"]] = row
        append_row(self.path, row)


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path) -> dict[str, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: that image is redone
            continue
        rows[row["image"]] = row
    return rows


def summarise(rows: list[dict], backbones: list[str], skipped: Counter, out: Path, meta: dict) -> dict:
    """Per-backbone means, overall x 100, written as summary.json and results.md."""
    if not rows:
        raise RuntimeError(f"Unified-Bench scored no image (skipped: {dict(skipped) or 'none'}); see {out}")
    means = {b: sum(r["scores"][b] for r in rows) / len(rows) for b in backbones}
    summary = {
        "overall": 100.0 * sum(means.values()) / len(means),
        "backbones": {b: 100.0 * m for b, m in means.items()},
        "images": len(rows),
        "skipped": dict(skipped),
        **meta,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    lines = ["| backbone | score (x100) |", "|---|---:|"]
    lines += [f"| {b} | {s:.2f} |" for b, s in summary["backbones"].items()]
    lines += [f"| **overall** | **{summary['overall']:.2f}** |", "",
              f"{len(rows)} images" + (f"; skipped: {dict(skipped)}" if skipped else "")]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return summary


def _finish(results: Results, backbones: list[str], skipped: Counter, out: Path, meta: dict, originals: Path,
            recon_root: Path, resolution: int, grid_images: int = 8) -> dict:
    """Summary of every finished image (old and new), and the grid of the first ones."""
    rows = [results.rows[k] for k in sorted(results.rows)]
    summary = summarise(rows, backbones, skipped, out, meta)
    cells = []
    for r in rows:
        if len(cells) == grid_images:
            break
        a, b = load_tensor(originals / r["image"], resolution), load_tensor(recon_root / r["reconstruction"], resolution)
        if a is not None and b is not None:
            score = 100.0 * sum(r["scores"].values()) / len(r["scores"]) if r.get("scores") else None  # as "overall"
            cells.append({"name": r["image"], "original": a, "reconstruction": b, "caption": r.get("caption"),
                          "score": score})
    if cells:
        save_grid(cells, out / "grid.png")
    return summary


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_bench(pipe, images: str | Path, out: str | Path, backbones: list[str] | None = None,
              batch_size: int | None = None, seed: int | None = None, num_steps: int | None = None,
              progress: bool = True, fresh: bool = False, max_images: int | None = None) -> dict:
    """Unified-Bench of a pipeline (uae_lightning.pipeline.UAEPipeline) on a folder of reference images, with a
    progress bar (`progress`, a terminal) or a log line at most every HEARTBEAT_S seconds (a log file). Backbones
    (and where they load from), seed, batch size and `max_images` (the first N images by name; None: all) default to
    the settings of the run the pipeline came from (`pipe.bench`), so a re-run reproduces the run's own score; then
    to the paper's four backbones, seed 0, 16, all images.

    Called by every process of a process group (the training run's ranks), the images are split over the ranks:
    rank r redraws every world-th image still to do and appends its rows to its own file; rank 0 merges them and
    writes the summary, which every rank returns. Each image's noise comes from its name, so the scores are those of
    a 1-process run."""
    root, out = Path(images), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    own = getattr(pipe, "bench", {}) or {}
    backbones = list(backbones or own.get("backbones") or DEFAULT_BACKBONES)
    seed = own.get("seed", 0) if seed is None else seed
    batch_size = batch_size or own.get("batch_size") or 16
    sources = {k: v for k, v in (own.get("backbone_sources") or {}).items() if k in backbones}
    scorer = Scorer(backbones, pipe.device, sources)
    max_images = max_images or own.get("max_images")
    files = list_images(root)[:max_images]
    if not files:
        raise FileNotFoundError(f"no images in {root} (looked for {', '.join(IMAGE_SUFFIXES)})")
    settings = {"mode": "pipeline", "max_images": max_images, "seed": seed, "num_steps": num_steps or pipe.num_steps, "resolution": pipe.resolution,
                "guidance_scale": pipe.guidance_scale, "negative_prompt": pipe.negative_prompt,
                "max_new_tokens": pipe.max_new_tokens, "backbones": backbones, "backbone_sources": sources}
    rank, world = process_group()
    results = Results(out, settings, fresh) if rank == 0 else None
    barrier()  # rank 0 has checked the settings and merged what an interrupted run left
    done = set(results.rows) if rank == 0 else set(read_rows(out / RESULTS)) if (out / RESULTS).is_file() else set()
    own_file = out / RESULTS if rank == 0 else out / f"{RESULTS}.rank{rank}"
    png = png_names([str(f.relative_to(root)) for f in files])
    skipped: Counter = Counter()
    todo = [f for f in files if str(f.relative_to(root)) not in done]
    if len(todo) < len(files) and rank == 0:
        log.info("Unified-Bench: %d of %d images already done in %s; resuming", len(files) - len(todo), len(files), out)
    # Every rank runs the same number of batches (some may be empty): each batch ends at a preemption safe point,
    # where the ranks agree (a collective).
    per_rank = -(-len(todo) // world)
    n_batches = -(-per_rank // batch_size)
    todo = todo[rank::world]
    bar = tqdm(total=len(todo), desc="Unified-Bench", unit="img", disable=not progress or rank != 0)
    beat = time.monotonic()
    for k in range(n_batches):
        batch = todo[k * batch_size : (k + 1) * batch_size]
        loaded = [(f, load_tensor(f, pipe.resolution)) for f in batch]
        for f, img in loaded:
            if img is None:
                skipped["unreadable"] += 1
                log.warning("Unified-Bench: skipped unreadable image %s", f)
        loaded = [(f, img) for f, img in loaded if img is not None]
        if loaded:
            names = [str(f.relative_to(root)) for f, _ in loaded]
            originals = torch.stack([img for _, img in loaded])
            texts, recon = pipe.reconstruct(originals, [seed_for(n, seed) for n in names], num_steps)
            finite = torch.isfinite(recon.flatten(1)).all(1).tolist()
            if not all(finite):  # a PNG would hold them as black pixels, which score above zero
                skipped["nonfinite_reconstruction"] += finite.count(False)
                log.warning("Unified-Bench: %d reconstructions were not finite; skipped", finite.count(False))
            recon = quantize(recon.nan_to_num())
            scores = scorer(originals, recon)
            for i, name in enumerate(names):
                if not finite[i]:
                    continue
                rel = Path("reconstructions") / png[name]
                save_png(recon[i], out / rel)
                append_row(own_file, {"image": name, "caption": texts[i], "reconstruction": str(rel),
                                      "scores": {b: scores[b][i] for b in backbones}})
        bar.update(len(batch))
        if not progress and rank == 0 and k + 1 < n_batches and time.monotonic() - beat >= HEARTBEAT_S:
            beat = time.monotonic()
            log.info("Unified-Bench: batch %d of %d (%d of this rank's %d images)", k + 1, n_batches,
                     min((k + 1) * batch_size, len(todo)), len(todo))
        if preemption.agreed():  # this batch's rows are in the results files: a re-run resumes after them
            bar.close()
            raise preemption.Preempted(f"Unified-Bench of {out}, after batch {k + 1} of {n_batches}")
    bar.close()
    if world > 1:
        counts = [None] * world
        torch.distributed.all_gather_object(counts, dict(skipped))  # also: every rank has finished its share
        skipped = sum((Counter(c) for c in counts), Counter())
    outcome = None
    if rank == 0:
        for path in [out / RESULTS, *sorted(out.glob(RESULTS + ".rank*"))]:
            if path.is_file():
                results.rows.update(read_rows(path))
        results._rewrite()
        for path in out.glob(RESULTS + ".rank*"):
            path.unlink()
        meta = {k: settings[k] for k in ("mode", "seed", "num_steps", "resolution")}
        try:
            outcome = _finish(results, backbones, skipped, out, {**meta, "processes": world}, root, out, pipe.resolution)
        except RuntimeError as err:  # every rank raises it, none waits for a summary that will not come
            outcome = err
    if world > 1:
        box = [outcome]
        torch.distributed.broadcast_object_list(box, src=0)
        outcome = box[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def score_folders(originals: str | Path, reconstructions: str | Path, out: str | Path,
                  backbones: list[str] | None = None, resolution: int = 512, batch_size: int = 16,
                  device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Score reconstructions made elsewhere against their originals with exactly the same scorer. A reconstruction
    pairs with the original of the same relative path (any image suffix); both are centre-cropped and resized to
    `resolution`. Originals without a reconstruction are skipped and counted."""
    root, rec_root, out = Path(originals), Path(reconstructions), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backbones = list(backbones or DEFAULT_BACKBONES)
    scorer = Scorer(backbones, device)
    recon_by_stem: dict[str, Path] = {}
    for f in list_images(rec_root):
        stem = str(f.relative_to(rec_root).with_suffix(""))
        if stem in recon_by_stem:
            raise ValueError(f"{rec_root}: {recon_by_stem[stem].name} and {f.name} would both be the reconstruction of "
                             f"{stem}.*; keep one")
        recon_by_stem[stem] = f
    originals_by_stem = Counter(str(f.relative_to(root).with_suffix("")) for f in list_images(root))
    twice = sorted(s for s, n in originals_by_stem.items() if n > 1)
    if twice:
        raise ValueError(f"{root}: originals that differ only by suffix cannot be paired by name: {twice[:5]}")
    settings = {"mode": "score", "resolution": resolution, "backbones": backbones,
                "reconstructions": str(rec_root.resolve())}
    results = Results(out, settings)
    skipped: Counter = Counter()
    pairs = []
    for f in list_images(root):
        name = str(f.relative_to(root))
        match = recon_by_stem.get(str(Path(name).with_suffix("")))
        if match is None:
            skipped["missing_reconstruction"] += 1
        elif name not in results.rows:
            pairs.append((name, f, match))
    if skipped:
        log.warning("Unified-Bench: %d originals have no reconstruction in %s", skipped["missing_reconstruction"], rec_root)
    for batch in tqdm(list(_batches(pairs, batch_size)), desc="Unified-Bench (score)", unit="batch", disable=not progress):
        loaded = [(n, load_tensor(a, resolution), load_tensor(b, resolution), b) for n, a, b in batch]
        ok = [x for x in loaded if x[1] is not None and x[2] is not None]
        if len(ok) < len(loaded):
            skipped["unreadable"] += len(loaded) - len(ok)
        if not ok:
            continue
        scores = scorer(torch.stack([x[1] for x in ok]), torch.stack([x[2] for x in ok]))
        for i, (name, _, _, rec) in enumerate(ok):
            results.add({"image": name, "caption": None, "reconstruction": str(rec.relative_to(rec_root)),
                         "scores": {b: scores[b][i] for b in backbones}})
    return _finish(results, backbones, skipped, out, {"mode": "score", "resolution": resolution}, root, rec_root,
                   resolution)


def format_summary(summary: dict) -> str:
    width = max(len(b) for b in [*summary["backbones"], "overall"])
    lines = [f"{'backbone':<{width}}  score", "-" * (width + 9)]
    lines += [f"{b:<{width}}  {s:6.2f}" for b, s in summary["backbones"].items()]
    lines += [f"{'overall':<{width}}  {summary['overall']:6.2f}", f"({summary['images']} images"
              + (f"; skipped {summary['skipped']})" if summary["skipped"] else ")")]
    return "\n".join(lines)
