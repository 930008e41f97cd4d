"""Long captions for a corpus, written as training data: the paper's stage-1 data made by the package.

    python -m uae_lightning.recaption OUT [hydra overrides]

The overrides choose the source and the captioner as for a run, e.g.

    srun --ntasks=8 --gpus-per-task=1 python -m uae_lightning.recaption /data/laion_long +experiment=pretrain \\
        data=webdataset data.shards=/data/laion

captions every sample of `data` (the whole source: no held-out split is made here) with the composed
`model.encoder` (the paper preset: Qwen2.5-VL-3B-Instruct with the official UAE captioning prompt), greedy, at most
`bench.max_new_tokens` (512 in the paper presets) new tokens, `--batch-size` images a batch. The image the captioner
sees is the training crop (`data.resolution`, centre crop), so the caption describes what the decoder will be trained
to draw.

The source's samples are cut into chunks of `--shard-size`; chunk k goes to task k mod N (SLURM_PROCID / SLURM_NTASKS,
or torchrun's RANK / WORLD_SIZE; one process otherwise), each task on its own GPU (SLURM_LOCALID / LOCAL_RANK). Chunk
k becomes OUT/NNNNN.tar, a WebDataset shard: per sample the original image bytes (`{key}.jpg`, `.png`, ...), the long
caption (`{key}.txt`) and `{key}.json` (the source's JSON fields, `short_caption`: the original caption, and
`caption_model`). Train on it with `data=webdataset data.shards=OUT data.short_caption_field=json.short_caption`.

Resuming: every finished batch is appended to OUT/_progress/NNNNN.jsonl; re-running the same command skips finished
chunks and continues a chunk at its first unfinished batch (batches keep their composition, so a resumed chunk has
the captions an uninterrupted one has). Samples whose image does not decode are skipped and counted in
OUT/NNNNN_stats.json. Throughput (captions/s, tokens/s) is logged as the work goes.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

import torch

from uae_lightning import quiet  # first: silences third-party notices

log = logging.getLogger("uae_lightning.recaption")
SETTINGS = "recaption.json"
SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")


def chunk_ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def read_progress(path: Path) -> list[dict]:
    """The finished batches of a chunk: whole lines only (a line cut by a kill is the unfinished batch)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().split("\n"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def check_settings(out: Path, settings: dict) -> None:
    """Write the captioning settings, or check that a folder being resumed was made with the same ones."""
    from uae_lightning.checkpointing import resume_settings

    changed = resume_settings(out / SETTINGS, settings)
    if changed:
        raise SystemExit(f"{out} holds captions made with other settings ({', '.join(changed)}); resume with the "
                         "same command or write to another folder")


def image_extension(data: bytes, stated: str) -> str:
    """The member extension for encoded image bytes: what the bytes are (PIL reads the header only), not what a
    source called them (a dataset cell has no name; a path column may lie)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except OSError:
        fmt = ""
    return {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp", "tiff": "tiff"}.get(fmt) \
        or stated or "jpg"


def device_for_task() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("SLURM_LOCALID", os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", local % torch.cuda.device_count())


class Recaptioner:
    """Captions chunks of a record source (`data/sources.py`) with an Encoder and writes them as shards."""

    def __init__(self, records, encoder, out: Path, resolution: int, min_side: int, max_pixels: int,
                 batch_size: int, max_new_tokens: int, model_name: str):
        self.records, self.encoder, self.out = records, encoder, out
        self.resolution, self.min_side, self.max_pixels = resolution, min_side, max_pixels
        self.batch_size, self.max_new_tokens, self.model_name = batch_size, max_new_tokens, model_name
        self.captions = self.tokens = 0
        self.seconds = 0.0

    def decode(self, i: int):
        from uae_lightning.data.images import SkipSample, load_uint8

        rec = self.records[i]
        if rec.image is None:
            return rec, None, "missing_image"
        try:
            return rec, load_uint8(rec.image, self.resolution, self.min_side, self.max_pixels)[0], None
        except SkipSample as e:
            return rec, None, e.reason

    def caption_batch(self, indices: list[int]) -> list[dict]:
        decoded = [self.decode(i) for i in indices]
        good = [(i, rec, img) for i, (rec, img, skip) in zip(indices, decoded) if img is not None]
        rows = {i: {"i": i, "skip": skip} for i, (rec, img, skip) in zip(indices, decoded) if img is None}
        if good:
            t0 = time.perf_counter()
            images = torch.stack([img for _, _, img in good]).float().div(255.0)
            caps = self.encoder.caption(images, do_sample=False, max_new_tokens=self.max_new_tokens)
            self.seconds += time.perf_counter() - t0
            self.captions += len(good)
            self.tokens += int(caps.completion_mask.sum())
            for (i, rec, _), text in zip(good, caps.texts):
                # A caption that is empty after whitespace is collapsed would be skipped by every stage: count it here.
                rows[i] = {"i": i, "caption": text} if text.strip() else {"i": i, "skip": "empty_generated_caption"}
        return [rows[i] for i in indices]

    def write_shard(self, k: int, start: int, end: int, rows: list[dict]) -> dict:
        """Chunk k as OUT/NNNNN.tar (written to a temporary name, then renamed) and its stats."""
        import webdataset as wds

        path = self.out / f"{k:05d}.tar"
        tmp = self.out / f".{k:05d}.tar.{os.getpid()}"
        skipped, written = Counter(), 0
        by_index = {r["i"]: r for r in rows}
        with wds.TarWriter(str(tmp)) as tar:
            for i in range(start, end):
                row = by_index[i]
                if "skip" in row:
                    skipped[row["skip"]] += 1
                    continue
                rec = self.records[i]
                image = rec.image if isinstance(rec.image, bytes) else Path(rec.image).read_bytes()
                key = rec.key if SAFE_KEY.match(rec.key) else f"{i:09d}"
                meta = {**rec.meta, "short_caption": rec.caption or "", "caption_model": self.model_name,
                        "source_index": i, "source_key": rec.key}
                tar.write({"__key__": key, image_extension(image, rec.image_ext): image, "txt": row["caption"],
                           "json": meta})
                written += 1
        os.replace(tmp, path)
        stats = {"shard": path.name, "samples": end - start, "written": written, "skipped": dict(skipped)}
        (self.out / f"{k:05d}_stats.json").write_text(json.dumps(stats, indent=1))
        return stats

    def run_chunk(self, k: int, start: int, end: int, bar) -> dict:
        progress = self.out / "_progress" / f"{k:05d}.jsonl"
        rows = read_progress(progress)
        batches = [list(range(s, min(s + self.batch_size, end))) for s in range(start, end, self.batch_size)]
        done = len(rows)
        if done:
            log.info(f"chunk {k:05d}: resuming after {done} of {end - start} samples")
            bar.update(done)
            # Drop what a kill left of an unfinished batch's line before appending.
            progress.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with progress.open("a") as f:
            for batch in batches:
                if batch[-1] < start + done:
                    continue
                new = self.caption_batch(batch)
                f.write("".join(json.dumps(r) + "\n" for r in new))
                f.flush()
                os.fsync(f.fileno())
                rows += new
                bar.update(len(batch))
                bar.set_postfix_str(self.rate())
        stats = self.write_shard(k, start, end, rows)
        progress.unlink()
        log.info(f"chunk {k:05d}: {stats['written']} captioned, skipped {stats['skipped'] or 'none'}; {self.rate()}")
        return stats

    def rate(self) -> str:
        s = max(self.seconds, 1e-9)
        return f"{self.captions / s:.2f} captions/s, {self.tokens / s:.0f} tokens/s"


def main(argv: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from uae_lightning.chain import compose
    from uae_lightning.data.sources import build_records
    from uae_lightning.distributed import shard
    from uae_lightning.models.build import build_encoder

    p = argparse.ArgumentParser(prog="python -m uae_lightning.recaption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out", type=Path, help="folder for the captioned shards")
    p.add_argument("overrides", nargs="*", help="hydra overrides: the source (data=...) and the captioner (model)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples an output shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="images a captioning batch (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="caption budget (default: bench.max_new_tokens)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    quiet.hide_loading_bars()

    cfg = compose(args.overrides)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if data["source"] == "toy":
        raise SystemExit("data=toy: choose a real-data source (data=webdataset, data=hf or data=manifest)")
    max_new_tokens = args.max_new_tokens or int(cfg.bench.max_new_tokens)
    records = build_records({**data, "val_shards": None, "val_manifest": None, "hf_val_split": None})[0]
    enc_cfg = OmegaConf.to_container(cfg.model.encoder, resolve=True)
    model_name = enc_cfg.get("pretrained") or enc_cfg["architecture"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "_progress").mkdir(exist_ok=True)
    check_settings(args.out, {"source": {k: data.get(k) for k in ("source", "manifest", "shards", "hf_path", "hf_name",
                                                                  "hf_split", "image_field", "caption_field")},
                              "samples": len(records), "shard_size": args.shard_size, "batch_size": args.batch_size,
                              "max_new_tokens": max_new_tokens, "resolution": data["resolution"], "model": model_name,
                              "prompt": enc_cfg["prompt"]})

    rank, world = shard()
    chunks = [(k, s, e) for k, (s, e) in enumerate(chunk_ranges(len(records), args.shard_size))]
    mine = [c for c in chunks if c[0] % world == rank]
    todo = [c for c in mine if not (args.out / f"{c[0]:05d}.tar").is_file()]
    log.info(f"task {rank}/{world}: {len(records)} samples in {len(chunks)} shards; {len(mine)} are this task's, "
             f"{len(todo)} to caption")
    if not todo:
        return {"rank": rank, "captioned": 0}
    device = device_for_task()
    encoder = build_encoder(enc_cfg, data["resolution"], cfg.model.get("condition_padding", "mask")).to(device).eval()
    worker = Recaptioner(records, encoder, args.out, data["resolution"], data.get("min_side", 16),
                         data.get("max_pixels", 8192 * 8192), args.batch_size, max_new_tokens, model_name)
    bar = tqdm(total=sum(e - s for _, s, e in todo), desc=f"captioning (task {rank})", unit="img",
               mininterval=10 if not os.isatty(2) else 0.1)
    skipped = Counter()
    for k, s, e in todo:
        skipped.update(worker.run_chunk(k, s, e, bar)["skipped"])
    bar.close()
    log.info(f"task {rank}/{world}: done, {worker.captions} captioned, skipped {dict(skipped) or 'none'}; "
             f"{worker.rate()}")
    return {"rank": rank, "captioned": worker.captions, "skipped": dict(skipped)}


if __name__ == "__main__":
    main()
