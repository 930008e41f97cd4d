"""One LightningDataModule for every stage: the toy shapes world or image files listed in a manifest.

A batch is a dict: `images` (float [B,3,H,W] in [0,1]), `caption` (long captions), `short_caption`,
`scene` (toy ground truth as JSON, "" for real data) and `skipped` (a Counter of samples dropped from this batch
by reason, plus conversions made). Bad samples never reach a stage: they are skipped and counted.
"""
from __future__ import annotations

import json
import random
import warnings
from collections import Counter
from collections.abc import Callable
from functools import lru_cache

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from uae_lightning.distributed import process_group

from uae_lightning.data import toy
from uae_lightning.data.images import SkipSample, load_uint8
from uae_lightning.data.sources import build_records, held_out


@lru_cache(maxsize=1 << 14)
def _toy_scene(seed: int, index: int, resolution: int, max_objects: int) -> tuple[toy.Scene, torch.Tensor]:
    """Scene `index` and its image (uint8 [3,H,W]). Drawing is most of a sample's cost and a scene never changes,
    so the images of the last 16384 scenes are kept (about 50 MB at 32 px): later epochs and later stages, which
    draw from the same splits, reuse them."""
    scene = toy.make_scene(seed, index, max_objects)
    return scene, torch.from_numpy(toy.image_array(scene, resolution).copy()).permute(2, 0, 1)


class ToyShapes(Dataset):
    """`size` scenes of the shapes world; split "train" and "val" use disjoint seeds."""

    def __init__(self, size: int, seed: int, resolution: int, max_objects: int, caption_levels: dict[str, float]):
        self.size, self.seed, self.resolution, self.max_objects = size, seed, resolution, max_objects
        self.levels = list(caption_levels)
        self.weights = [caption_levels[k] for k in self.levels]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        scene, image = _toy_scene(self.seed, i, self.resolution, self.max_objects)
        # The short caption's level is drawn per sample (seeded by index) from the configured mixture.
        level = random.Random(self.seed * 7919 + i).choices(self.levels, self.weights)[0]
        return {
            "image": image.clone(),  # the cached tensor stays as drawn whatever a consumer does with this one
            "caption": toy.caption(scene, "complete"),
            "short_caption": toy.caption(scene, level),
            "scene": json.dumps(scene.to_dict()),
            "key": f"{self.seed}-{i}",
        }


class DecodedImages(Dataset):
    """Records of a real-data source (`sources.py`), decoded: each becomes a training sample or a skip marker naming
    its reason (counted under data/skipped_<reason>), with the same rules whatever the source."""

    def __init__(self, records, resolution: int, min_side: int, max_pixels: int, indices: list[int] | None = None):
        self.records, self.resolution, self.min_side, self.max_pixels = records, resolution, min_side, max_pixels
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.records)

    def record(self, i: int):
        return self.records[self.indices[i] if self.indices is not None else i]

    def __getitem__(self, i: int) -> dict:
        rec = self.record(i)
        if rec.caption is None:
            return {"skip": "missing_caption", "key": rec.key}
        caption = " ".join(rec.caption.split())
        if not caption:
            return {"skip": "empty_caption", "key": rec.key}
        if rec.image is None:
            return {"skip": "missing_image", "key": rec.key}
        try:
            image, converted = load_uint8(rec.image, self.resolution, self.min_side, self.max_pixels)
        except SkipSample as e:
            return {"skip": e.reason, "key": rec.key}
        out = {
            "image": image,
            "caption": caption,
            "short_caption": " ".join((rec.short_caption or "").split()) or caption,
            "scene": rec.scene,
            "key": rec.key,
        }
        if converted:
            out["converted"] = converted
        return out


def collate(samples: list[dict]) -> dict:
    """Stack the good samples; count the skipped ones and the conversions under `skipped`. Held-out samples also
    carry their `index` in the split and a `weight` (0 for the padding that evens out the ranks' shares)."""
    counts: Counter = Counter()
    good = []
    for s in samples:
        if "skip" in s:
            if not s.get("pad"):  # a padding copy of a skipped sample was counted on the rank that owns it
                counts[f"skipped_{s['skip']}"] += 1
            continue
        if "converted" in s:
            counts[f"converted_{s['converted']}"] += 1
        good.append(s)
    batch: dict = {"skipped": counts}
    if good:
        batch["images"] = torch.stack([s["image"] for s in good]).float() / 255.0
        for key in ("caption", "short_caption", "scene", "key"):
            batch[key] = [s[key] for s in good]
        if "index" in good[0]:
            batch["index"] = [s["index"] for s in good]
            batch["weight"] = torch.tensor([0.0 if s["pad"] else 1.0 for s in good])
    return batch


class EvalSampler(Sampler[int]):
    """The held-out split over the ranks: rank r takes items r, r + W, r + 2W, ... Every rank gets the same number
    (ceil(n / W)), so every rank runs the same number of batches (each forward of a sharded model is a collective);
    positions past the end are padding, which `Indexed` serves as weight-0 copies."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return -(-self.size // process_group()[1])

    def __iter__(self):
        rank, world = process_group()
        return iter(range(rank, world * len(self), world))


class Indexed(Dataset):
    """A held-out dataset whose items carry their index, and whose indices past the end are padding (`pad`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        n = len(self.dataset)
        return {**self.dataset[i % n], "index": i % n, "pad": i >= n}


# Lightning warns on every mid-epoch resume unless the DataLoader object itself is stateful; here ResumableSampler
# starts each pass at the restored trained-batch count (tested to match an uninterrupted run).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class ResumableSampler(Sampler[int]):
    """Shuffled training order that is a pure function of (seed, global batches trained), sharded over ranks.

    The order is one stream: data epoch e is a permutation of all samples seeded by (seed, e), and the epochs follow
    each other. The stream is cut into global batches (batch_size x world_size); rank r takes every world_size-th
    index of a global batch starting at r, so each global batch holds the same samples whether it is processed by one
    process or by several, every rank runs the same number of batches, and every sample of a data epoch is read once,
    by one rank (when the sample count is not a multiple of the global batch, a batch spans two data epochs; nothing
    is dropped). A pass (Lightning's epoch) is `size // global batch` batches. Each pass starts where training
    stands: `position()` is the number of global batches trained so far (Lightning's processed-batch count, restored
    from a checkpoint on resume), and the pass runs from there to the end of its pass. Lightning's (epoch, batch) pair
    is not used: a checkpoint written at max_steps has the epoch counter already advanced, one written at an epoch's
    last batch restarts that epoch with the counter unchanged; the trained-batch count is right in both.
    """

    def __init__(self, size: int, batch_size: int, seed: int, position: Callable[[], int]):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.position = position

    def batches_per_epoch(self) -> int:
        rank, world = process_group()
        per_global = self.batch_size * world
        n_batches = self.size // per_global
        if n_batches == 0:
            raise ValueError(f"{self.size} training samples cannot fill one global batch of {per_global} "
                             f"(data.batch_size={self.batch_size} x {world} processes)")
        return n_batches

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size

    def stream(self, start: int, count: int) -> list[int]:
        """Items start .. start + count - 1 of the stream of data epochs."""
        out: list[int] = []
        epoch, offset = divmod(start, self.size)
        while len(out) < count:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            out += order[offset : offset + count - len(out)].tolist()
            epoch, offset = epoch + 1, 0
        return out

    def __iter__(self):
        rank, world = process_group()
        per_global = self.batch_size * world
        n_batches = self.batches_per_epoch()
        position = self.position()
        end = (position // n_batches + 1) * n_batches
        return iter(self.stream(position * per_global, (end - position) * per_global)[rank::world])


class UAEDataModule(L.LightningDataModule):
    """The shared DataModule. `source="toy"` generates the shapes world; `"manifest"`, `"webdataset"` and `"hf"` read
    real data (`sources.py`): image files listed in a manifest, WebDataset tar shards, a Hugging Face dataset."""

    def __init__(
        self,
        source: str = "toy",
        resolution: int = 32,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        train_size: int = 4096,
        val_size: int = 64,
        max_objects: int = 3,
        caption_levels: dict[str, float] | None = None,
        manifest: str | None = None,
        val_manifest: str | None = None,
        val_fraction: float = 0.01,
        min_side: int = 16,
        max_pixels: int = 8192 * 8192,
        shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        index_cache: str | None = None,
        hf_path: str | None = None,
        hf_name: str | None = None,
        hf_split: str = "train",
        hf_val_split: str | None = None,
        hf_cache_dir: str | None = None,
        image_field: str | list[str] | None = None,
        caption_field: str | None = None,
        short_caption_field: str | None = None,
        scene_field: str | None = None,
        key_field: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.sampler: ResumableSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        if h.source == "toy":
            levels = dict(h.caption_levels or {"short": 1.0})
            self.train_set = ToyShapes(h.train_size, h.seed, h.resolution, h.max_objects, levels)
            self.val_set = ToyShapes(h.val_size, h.seed + 10_000, h.resolution, h.max_objects, levels)
            return
        records, val_records = build_records(dict(h))
        decode = dict(resolution=h.resolution, min_side=h.min_side, max_pixels=h.max_pixels)
        if val_records is not None:
            self.train_set = DecodedImages(records, **decode)
            self.val_set = DecodedImages(val_records, **decode)
        else:  # no separate held-out set: a seeded val_fraction of the samples, the same rule for every source
            train, val = held_out(len(records), h.val_fraction, h.seed)
            self.train_set = DecodedImages(records, indices=train, **decode)
            self.val_set = DecodedImages(records, indices=val, **decode)

    def _loader(self, ds: Dataset, batch_size: int, sampler: Sampler | None = None) -> DataLoader:
        # A generator of its own: creating an iterator draws a base seed, which must not come from (and shift) the
        # global random stream, or a run resumed mid-epoch would sample different noise than an uninterrupted one.
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.hparams.seed),
            num_workers=self.hparams.num_workers,
            collate_fn=collate,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.sampler = ResumableSampler(len(self.train_set), self.hparams.batch_size, self.hparams.seed,
                                        position=self._batches_trained)
        return self._loader(self.train_set, self.hparams.batch_size, self.sampler)

    def _batches_trained(self) -> int:
        """Global batches trained so far (0 outside a trainer)."""
        trainer = self.trainer
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed if trainer is not None else 0

    def test_dataloader(self) -> DataLoader:
        """The held-out split, shared out over the ranks (EvalSampler); the stages sum each metric over its images
        and all ranks, so the result is the 1-process one."""
        return self._loader(Indexed(self.val_set), self.hparams.eval_batch_size, EvalSampler(len(self.val_set)))

    def val_dataloader(self) -> DataLoader:
        """The same held-out split: the evaluations during training (trainer.val_check_interval) are the test's."""
        return self.test_dataloader()
