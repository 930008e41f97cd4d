"""Data-loading throughput you can plan a cluster job with: images/s of one DataLoader worker for each real-data source
(a manifest of JPEG files, WebDataset shards, a Hugging Face dataset from save_to_disk and from parquet), with source
JPEGs of 512² and 1024² decoded and centre-crop-resized to the training resolution; the memory of a worker; and the
workers one GPU needs to keep stage 1 fed.

    python benchmarks/data_speed.py [--images 256] [--sizes 512 1024] [--resolution 512] [--gpu-images-per-s 12.1]

The corpus is written to a temporary folder first (synthetic photographs: smooth colour fields with fine texture,
JPEG quality 90, about the bytes per pixel of web images). A worker's rate is timed in one process reading the samples
in the training order through the DataModule's dataset (decode, convert, crop, resize, to tensor: what a worker does);
its memory is the proportional set size (PSS, shared pages split between the processes sharing them) of a real
DataLoader worker process after it served the whole corpus. The GPU's appetite defaults to the decoder-training
anchor of ../shared/reference/gpu-anchors.md: SD3.5-large forward+backward at 512², 12.1 images/s on one H200.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from uae_lightning.data.datamodule import UAEDataModule, collate


def photo(rng: np.random.Generator, size: int) -> bytes:
    """A synthetic photograph: an upsampled random colour field plus fine noise, as a quality-90 JPEG."""
    coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    arr = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_corpus(root: Path, n: int, size: int) -> dict[str, dict]:
    """The same n images as each source; returns DataModule settings per source."""
    import datasets
    import webdataset as wds

    rng = np.random.default_rng(size)
    images = [photo(rng, size) for _ in range(n)]
    captions = [f"a synthetic photograph number {i}" for i in range(n)]
    (root / "files").mkdir(parents=True)
    with (root / "train.jsonl").open("w") as f:
        for i, (img, cap) in enumerate(zip(images, captions)):
            (root / "files" / f"{i:06d}.jpg").write_bytes(img)
            f.write(f'{{"path": "files/{i:06d}.jpg", "caption": "{cap}"}}\n')
    (root / "wds").mkdir()
    per_shard = max(1, n // 4)
    for s in range(0, n, per_shard):
        with wds.TarWriter(str(root / "wds" / f"{s // per_shard:05d}.tar")) as tar:
            for i in range(s, min(s + per_shard, n)):
                tar.write({"__key__": f"{i:06d}", "jpg": images[i], "txt": captions[i]})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "caption": captions},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.save_to_disk(str(root / "arrow"))
    (root / "parquet").mkdir()
    ds.to_parquet(str(root / "parquet" / "train.parquet"))
    return {
        "manifest (JPEG files)": dict(source="manifest", manifest=str(root / "train.jsonl")),
        "webdataset (tar shards)": dict(source="webdataset", shards=str(root / "wds")),
        "hf save_to_disk": dict(source="hf", hf_path=str(root / "arrow"), hf_cache_dir=str(root / "cache")),
        "hf parquet": dict(source="hf", hf_path=str(root / "parquet" / "train.parquet"),
                           hf_cache_dir=str(root / "cache")),
    }


def worker_rate(dm: UAEDataModule) -> float:
    """Images/s of one process producing the training samples (the first pass's order) and collating them."""
    ds, order = dm.train_set, list(dm.train_dataloader().sampler)
    ds[order[0]]  # open the shard / file system caches once, as a running worker has
    t0 = time.perf_counter()
    for start in range(0, len(order), dm.hparams.batch_size):
        collate([ds[i] for i in order[start : start + dm.hparams.batch_size]])
    return len(order) / (time.perf_counter() - t0)


def pss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_memory(dm: UAEDataModule) -> float:
    """PSS (MB) of a DataLoader worker process after it served a whole pass."""
    dm.hparams.num_workers = 1
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in it:
        pass
    pids = [w.pid for w in it._workers] if hasattr(it, "_workers") else []
    mem = max((pss_mb(p) for p in pids), default=float("nan"))
    it._shutdown_workers()
    return mem


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--resolution", type=int, default=512, help="training resolution (the paper presets: 512)")
    p.add_argument("--gpu-images-per-s", type=float, default=12.1,
                   help="images/s one GPU trains on (default: the H200 stage-1 anchor, SD3.5-large at 512²)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            sources = write_corpus(Path(tmp) / str(size), args.images, size)
            for name, settings in sources.items():
                dm = UAEDataModule(resolution=args.resolution, batch_size=8, val_fraction=0.01, min_side=16,
                                   num_workers=0, **settings)
                dm.setup()
                rate = worker_rate(dm)
                mem = worker_memory(dm)
                rows.append({"source": name, "jpeg": f"{size}²", "rate": rate, "mem": mem,
                             "workers": math.ceil(args.gpu_images_per_s / rate)})
    print(f"\nDataLoader worker throughput: {args.images} JPEGs per size, centre crop + resize to {args.resolution}², "
          f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}\n")
    print(f"| source | source JPEG | images/s per worker | worker PSS (MB) | workers per GPU at "
          f"{args.gpu_images_per_s:g} img/s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['source']} | {r['jpeg']} | {r['rate']:.1f} | {r['mem']:.0f} | {r['workers']} |")
    return rows


if __name__ == "__main__":
    main()
