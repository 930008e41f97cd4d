"""Where real training data comes from: a manifest of image files, WebDataset tar shards, or a Hugging Face dataset.

Every source is read by index (a map-style view), so one sampler (`datamodule.ResumableSampler`) gives all of them the
same guarantees under N ranks: each sample of an epoch read by exactly one rank, equal batch counts, an order fixed by
(seed, epoch), and an exact mid-epoch resume. A source yields `Record`s: the encoded image (bytes or a file path) and
the text fields, not yet decoded; `datamodule.DecodedImages` decodes them with the same skip-and-count rules for all.

- WebDataset (`data=webdataset`): tar shards as img2dataset writes them (`00000.tar` holding `{key}.jpg`, `{key}.txt`,
  `{key}.json`), read with `wids.IndexedTarSamples` (webdataset's indexed tar reader: each shard is indexed once, from
  its headers, then members are read by offset through an mmap). Shards are given as a folder, a brace pattern
  (`/data/laion/{00000..00127}.tar`), a glob, or a list of these.
- Hugging Face (`data=hf`): a `save_to_disk` folder, parquet files, or a hub id (`datasets.load_dataset`); the image
  column is read undecoded (`datasets.Image(decode=False)`) so that a broken image is counted, not raised.

Fields are named per source: a WebDataset member by its extension (`txt`) or a key inside a JSON member
(`json.short_caption`); a Hugging Face column (`caption`) or a key inside a dict column (`meta.short_caption`).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import random
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_CAPTION_FIELD = {"manifest": "caption", "webdataset": "txt", "hf": "caption"}
DEFAULT_IMAGE_FIELD = {"webdataset": list(IMAGE_EXTENSIONS), "hf": "image"}


@dataclass
class Record:
    """One sample as stored: `image` is the encoded file (bytes) or its path; a text field is None when the sample
    has no such member/column (an empty string when it has one that is blank)."""

    key: str
    image: bytes | str | None
    image_ext: str
    caption: str | None
    short_caption: str | None = None
    scene: str = ""
    meta: dict = field(default_factory=dict)  # the sample's JSON member or other columns, kept by the recaptioner


def held_out(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices when no separate held-out set is given: a seeded shuffle, the first
    max(1, n * val_fraction) held out. The same rule for every source."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", errors="replace")
    return str(value)


# ---- manifest ----------------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a JSONL or CSV manifest with `path` (relative to the manifest's folder or absolute), `caption` and
    optionally `short_caption`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.manifest: no such file {path}")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"data.manifest: {path} line {n} is not JSON: {e}") from e
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"data.manifest: {path} must end in .jsonl or .csv")
    if rows and "path" not in rows[0]:
        raise ValueError(f"data.manifest: {path} rows need a 'path' field; got fields {sorted(rows[0])}")
    for r in rows:
        r["path"] = str(path.parent / r["path"]) if not Path(r["path"]).is_absolute() else r["path"]
    return rows


class ManifestRecords:
    """Image files listed in a manifest (`read_manifest`)."""

    def __init__(self, path: str | Path):
        self.rows = read_manifest(path)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Record:
        row = self.rows[i]
        meta = {k: v for k, v in row.items() if k not in ("path", "caption", "short_caption")}
        return Record(key=str(row.get("key") or Path(row["path"]).stem), image=row["path"],
                      image_ext=Path(row["path"]).suffix.lstrip(".").lower() or "jpg", caption=_text(row.get("caption")),
                      short_caption=_text(row.get("short_caption")), meta=meta)


# ---- WebDataset ----------------------------------------------------------------------------------------------------
def expand_shards(spec: str | list[str] | None, key: str = "data.shards") -> list[str]:
    """Shard paths from a folder (its *.tar, sorted), a brace pattern, a glob, or a list of these; in order."""
    from braceexpand import braceexpand

    if spec is None or spec == "":
        raise ValueError(f"{key} is not set: give a folder of .tar shards, a pattern like /data/{{00000..00127}}.tar, "
                         "or a list")
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for s in specs:
        s = str(s)
        if os.path.isdir(s):
            found = sorted(glob.glob(os.path.join(s, "*.tar")))
            if not found:
                raise FileNotFoundError(f"{key}: the folder {s} holds no .tar shards")
            out += found
            continue
        for p in braceexpand(s):
            if any(c in p for c in "*?["):
                found = sorted(glob.glob(p))
                if not found:
                    raise FileNotFoundError(f"{key}: nothing matches {p}")
                out += found
            elif not os.path.isfile(p):
                raise FileNotFoundError(f"{key}: no such shard {p}")
            else:
                out.append(p)
    return out


def _default_index_cache() -> Path:
    """The package's cache ($UAE_CACHE_DIR, else ~/.cache/uae_lightning) / webdataset-index."""
    from uae_lightning.models.build import cache_dir

    return cache_dir() / "webdataset-index"


def shard_index(path: str, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sample_starts [n + 1], member_offsets): sample j of the shard is the tar members at
    member_offsets[sample_starts[j]:sample_starts[j + 1]] (header offsets, grouped by key in file order by wids).
    Indexing walks every header of the shard, so the result is cached under `cache` (keyed by the shard's path, size
    and modification time): later runs, ranks and stages read a small file instead of the shard's headers."""
    from wids.wids import IndexedTarSamples

    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    cached = cache / f"{key}.npz" if cache is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            return z["sample_starts"], z["member_offsets"]
    try:
        tar = IndexedTarSamples(path=path, stream=open(path, "rb"))
    except Exception as e:  # noqa: BLE001 - any failure to index a shard means the shard is unusable as a whole
        raise ValueError(f"data: cannot index the WebDataset shard {path} ({type(e).__name__}: {e})") from e
    members = tar.reader.by_index  # [(name, offset, size)] in file order
    starts = np.cumsum([0] + [len(group) for group in tar.samples]).astype(np.int64)
    offsets = np.asarray([members[i][1] for group in tar.samples for i in group], dtype=np.int64)
    tar.close()
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{key}.{os.getpid()}.npz"
        np.savez(tmp, sample_starts=starts, member_offsets=offsets)
        os.replace(tmp, cached)
    return starts, offsets


def _mapped(path: str):
    """A shard memory-mapped for reading members at known offsets (wids' reader, without re-walking the headers)."""
    from wids.wids_mmtar import MMIndexedTar

    class Mapped(MMIndexedTar):
        def _build_index(self):  # the offsets come from shard_index
            self.by_name, self.by_index = {}, []

    return Mapped(path)


def _subfield(mapping: dict, spec: str) -> Any:
    """`spec` = "name" or "name.key": the value, or None when absent (a JSON member that does not parse is absent)."""
    name, _, sub = spec.partition(".")
    value = mapping.get(name)
    if not sub or value is None:
        return value
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        try:
            value = json.loads(bytes(value) if not isinstance(value, str) else value)
        except (ValueError, UnicodeDecodeError):
            return None
    return value.get(sub) if isinstance(value, dict) else None


def _text_fields(mapping: dict, caption: str, short_caption: str | None, scene: str | None) -> dict:
    """The Record text fields read from a sample's members / a row's columns by their field specs."""
    return {"caption": _text(_subfield(mapping, caption)),
            "short_caption": _text(_subfield(mapping, short_caption)) if short_caption else None,
            "scene": (_text(_subfield(mapping, scene)) or "") if scene else ""}


class WebDatasetRecords:
    """WebDataset tar shards read by index. Every shard is indexed once (`shard_index`, cached); each process (a
    DataLoader worker, a rank) then maps shards lazily, keeps the last `open_shards` of them mapped, and reads a sample
    as its members at their offsets."""

    def __init__(self, shards: list[str], image_field: str | list[str] = IMAGE_EXTENSIONS, caption_field: str = "txt",
                 short_caption_field: str | None = None, scene_field: str | None = None, open_shards: int = 64,
                 index_cache: str | Path | None = None, progress: bool = True):
        from tqdm.auto import tqdm

        self.shards = list(shards)
        self.image_fields = [image_field] if isinstance(image_field, str) else list(image_field)
        self.caption_field, self.short_caption_field, self.scene_field = caption_field, short_caption_field, scene_field
        self.open_shards = open_shards
        cache = Path(index_cache) if index_cache else _default_index_cache()
        self.index = [shard_index(p, cache) for p in tqdm(self.shards, desc="indexing shards", unit="shard",
                                                           disable=not progress or len(self.shards) < 16)]
        self.starts = np.cumsum([0] + [len(s) - 1 for s, _ in self.index]).tolist()
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}  # open maps do not travel to worker processes

    def _shard(self, s: int):
        if self._pid != os.getpid():  # a forked worker: the parent's maps are not ours to use
            self._open, self._pid = OrderedDict(), os.getpid()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        self._open[s] = _mapped(self.shards[s])
        if len(self._open) > self.open_shards:
            self._open.popitem(last=False)[1].close()
        return self._open[s]

    def members(self, i: int) -> dict:
        """Sample i as stored: {extension: bytes, "__key__": key}."""
        import bisect

        from wids.wids import splitname

        if not 0 <= i < len(self):
            raise IndexError(i)
        s = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[s]
        starts, offsets = self.index[s]
        tar = self._shard(s)
        out: dict = {}
        for offset in offsets[starts[j] : starts[j + 1]]:
            name, data = tar.get_at_offset(int(offset))
            key, ext = splitname(name)
            out.setdefault("__key__", key.rsplit("/", 1)[-1])
            out[ext[1:]] = bytes(data)
        return out

    def __getitem__(self, i: int) -> Record:
        m = self.members(i)
        image_ext = next((f for f in self.image_fields if f in m), "")
        if "json" in m:  # parsed once, for `meta` and for fields inside it (json.short_caption)
            try:
                m["json"] = json.loads(m["json"])
            except (ValueError, UnicodeDecodeError):
                m["json"] = None
        meta = m.get("json") if isinstance(m.get("json"), dict) else {}
        return Record(key=m["__key__"], image=m.get(image_ext) if image_ext else None, image_ext=image_ext, meta=meta,
                      **_text_fields(m, self.caption_field, self.short_caption_field, self.scene_field))


# ---- Hugging Face datasets -------------------------------------------------------------------------------------------
def load_hf(path: str, name: str | None, split: str, cache_dir: str | None = None):
    """A `datasets.Dataset`: `path` is a `save_to_disk` folder (a DatasetDict's `split` is taken), parquet files (a
    file, a folder of them, a glob or brace pattern), or a hub id / loading script for `datasets.load_dataset`."""
    import datasets
    from braceexpand import braceexpand

    if not sys.stderr.isatty():  # datasets' conversion and loading bars only in a terminal, not in a SLURM log
        datasets.disable_progress_bars()
    p = Path(path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                       or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data.hf_split={split!r}: {path} has splits {sorted(ds)}")
            ds = ds[split]
        return ds
    files = sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else \
        [f for pat in braceexpand(str(path)) for f in sorted(glob.glob(pat))] if str(path).endswith(".parquet") else []
    if str(path).endswith(".parquet") or p.is_dir():
        if not files:
            raise FileNotFoundError(f"data.hf_path: no parquet files at {path}")
        return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
    return datasets.load_dataset(path, name, split=split, cache_dir=cache_dir)


class HFRecords:
    """Rows of a Hugging Face dataset; the image column is read undecoded (bytes or a path)."""

    def __init__(self, ds, image_field: str = "image", caption_field: str = "caption",
                 short_caption_field: str | None = None, scene_field: str | None = None, key_field: str | None = None):
        import datasets

        columns = set(ds.column_names)
        for key, spec in (("image_field", image_field), ("caption_field", caption_field),
                          ("short_caption_field", short_caption_field), ("scene_field", scene_field),
                          ("key_field", key_field)):
            if spec and spec.partition(".")[0] not in columns:
                raise ValueError(f"data.{key}={spec!r}: the dataset has columns {sorted(columns)}")
        if isinstance(ds.features[image_field], datasets.Image):
            ds = ds.cast_column(image_field, datasets.Image(decode=False))
        self.ds = ds
        self.image_field, self.caption_field = image_field, caption_field
        self.short_caption_field, self.scene_field, self.key_field = short_caption_field, scene_field, key_field

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Record:
        row = self.ds[int(i)]
        img = row[self.image_field]
        ext = ""
        if isinstance(img, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
            path = img.get("path") or ""
            img = img.get("bytes") or (path or None)
            ext = Path(path).suffix.lstrip(".").lower()
        elif isinstance(img, str):
            ext = Path(img).suffix.lstrip(".").lower()
        used = {self.image_field, self.caption_field, self.short_caption_field, self.scene_field, self.key_field}
        meta = {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool, type(None)))}
        return Record(key=str(row[self.key_field]) if self.key_field else f"{i:09d}", image=img, image_ext=ext or "jpg",
                      meta=meta, **_text_fields(row, self.caption_field, self.short_caption_field, self.scene_field))


def build_records(h: dict) -> tuple[Any, Any | None]:
    """(records, held-out records or None) for a real-data source from the DataModule's settings `h`."""
    source = h["source"]
    if source not in DEFAULT_CAPTION_FIELD:
        raise ValueError(f"data.source={source!r}; expected toy, manifest, webdataset or hf")
    fields = dict(caption_field=h.get("caption_field") or DEFAULT_CAPTION_FIELD[source],
                  short_caption_field=h.get("short_caption_field"),
                  scene_field=h.get("scene_field"))
    if source == "manifest":
        return ManifestRecords(h["manifest"]), ManifestRecords(h["val_manifest"]) if h.get("val_manifest") else None
    if source == "webdataset":
        image = h.get("image_field") or DEFAULT_IMAGE_FIELD[source]
        fields["index_cache"] = h.get("index_cache")
        train = WebDatasetRecords(expand_shards(h.get("shards")), image_field=image, **fields)
        val = WebDatasetRecords(expand_shards(h["val_shards"], "data.val_shards"), image_field=image,
                                **fields) if h.get("val_shards") else None
        return train, val
    if not h.get("hf_path"):
        raise ValueError("data.hf_path is not set: a save_to_disk folder, parquet files, or a hub id")
    kw = dict(image_field=h.get("image_field") or DEFAULT_IMAGE_FIELD[source], key_field=h.get("key_field"), **fields)
    train = HFRecords(load_hf(h["hf_path"], h.get("hf_name"), h["hf_split"], h.get("hf_cache_dir")), **kw)
    val = HFRecords(load_hf(h["hf_path"], h.get("hf_name"), h["hf_val_split"], h.get("hf_cache_dir")), **kw) \
        if h.get("hf_val_split") else None
    return train, val
