import json

import numpy as np
import pytest
import torch
from PIL import Image

from uae_lightning.data.datamodule import UAEDataModule, collate
from uae_lightning.data.sources import read_manifest


@pytest.fixture
def messy_folder(tmp_path):
    """One image of every kind a real crawl contains, and the manifest listing them."""
    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "good.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 48), 128, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((rng.random((40, 48)) * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(rgb[:8, :8]).save(tmp_path / "tiny.png")
    Image.fromarray(rgb).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    Image.new("RGB", (3000, 3000)).save(tmp_path / "huge.png")
    rows = [
        {"path": "good.png", "caption": "a good image", "short_caption": "good"},
        {"path": "gray.png", "caption": "a gray image"},
        {"path": "rgba.png", "caption": "an image with alpha"},
        {"path": "deep.png", "caption": "a 16-bit image"},
        {"path": "tiny.png", "caption": "too small"},
        {"path": "truncated.jpg", "caption": "cut in half"},
        {"path": "corrupt.png", "caption": "garbage"},
        {"path": "huge.png", "caption": "too large"},
        {"path": "missing.png", "caption": "not there"},
        {"path": "good.png", "caption": "   "},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path, manifest


def test_bad_images_are_skipped_or_converted_and_counted(messy_folder):
    folder, manifest = messy_folder
    dm = UAEDataModule(source="manifest", manifest=str(manifest), val_manifest=str(manifest), resolution=32,
                       batch_size=10, min_side=16, max_pixels=2000 * 2000)
    dm.setup()
    batch = collate([dm.train_set[i] for i in range(len(dm.train_set))])
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["images"].dtype == torch.float32 and 0 <= batch["images"].min() and batch["images"].max() <= 1
    assert batch["caption"] == ["a good image", "a gray image", "an image with alpha", "a 16-bit image"]
    assert batch["short_caption"][:2] == ["good", "a gray image"]  # falls back to the caption
    assert dict(batch["skipped"]) == {
        "converted_grayscale": 1, "converted_alpha": 1, "converted_high_bit_depth": 1,
        "skipped_too_small": 1, "skipped_corrupt": 1, "skipped_truncated": 1, "skipped_too_large": 1,
        "skipped_missing": 1,
        "skipped_empty_caption": 1,
    }
    gray = batch["images"][1]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    # 16-bit values are rescaled into the 8-bit range, not clipped to white.
    assert 0.2 < batch["images"][3].mean() < 0.8


def test_all_bad_batch_has_no_images_but_keeps_its_counts():
    batch = collate([{"skip": "corrupt"}, {"skip": "corrupt"}])
    assert "images" not in batch and batch["skipped"]["skipped_corrupt"] == 2


def test_manifest_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.manifest"):
        read_manifest(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\na.png,x\n")
    with pytest.raises(ValueError, match="'path' field"):
        read_manifest(bad)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"path": "a.png"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        read_manifest(bad_json)


def test_csv_manifest_and_seeded_validation_split(tmp_path):
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "r.png")
    (tmp_path / "m.csv").write_text("path,caption\n" + "".join(f"r.png,red {i}\n" for i in range(100)))
    a = UAEDataModule(source="manifest", manifest=str(tmp_path / "m.csv"), val_fraction=0.1, seed=1)
    b = UAEDataModule(source="manifest", manifest=str(tmp_path / "m.csv"), val_fraction=0.1, seed=1)
    a.setup(), b.setup()
    assert len(a.train_set) == 90 and len(a.val_set) == 10
    assert a.val_set.indices == b.val_set.indices and len(set(a.val_set.indices)) == 10
    assert not {a.val_set[i]["caption"] for i in range(10)} & {a.train_set[i]["caption"] for i in range(90)}


def test_toy_datamodule_is_seeded_and_splits_are_disjoint():
    dm = UAEDataModule(source="toy", train_size=32, val_size=16, batch_size=8, caption_levels={"short": 1.0})
    dm.setup()
    first = next(iter(dm.train_dataloader()))
    other = UAEDataModule(source="toy", train_size=32, val_size=16, batch_size=8, caption_levels={"short": 1.0})
    other.setup()
    again = next(iter(other.train_dataloader()))
    assert first["caption"] == again["caption"]
    assert first["images"].shape == (8, 3, 32, 32)
    assert all(len(s.split()) < len(c.split()) for s, c in zip(first["short_caption"], first["caption"]))
    train_scenes = {dm.train_set[i]["scene"] for i in range(32)}
    val_scenes = {dm.val_set[i]["scene"] for i in range(16)}
    assert len(train_scenes & val_scenes) <= 2  # only by chance (a few hundred distinct small scenes)


def test_resumable_sampler_skips_trained_batches_and_shards_global_batches(monkeypatch):
    """The pass starts at the trained-batch count: 10 global batches per epoch, so 23 trained = data epoch 2 after its
    3rd batch, whatever Lightning's epoch counter says; the next pass (30 trained) is the whole of data epoch 3."""
    from uae_lightning.data.datamodule import ResumableSampler

    done = {"n": 20}
    full = ResumableSampler(40, batch_size=4, seed=3, position=lambda: done["n"])
    order = list(full)
    assert len(order) == len(full) == 40 and sorted(order) == list(range(40))
    done["n"] = 30
    epoch3 = list(full)
    assert epoch3 != order  # a new permutation each epoch
    resumed = ResumableSampler(40, batch_size=4, seed=3, position=lambda: 23)
    assert list(resumed) == order[12:]  # the 3 trained batches of data epoch 2 are skipped
    done["n"] = 20
    assert list(full) == order  # a pass at a whole-epoch count is that epoch, whole
    # Two ranks with batch 2 see the samples of one process with batch 4, global batch by global batch.
    monkeypatch.setattr("uae_lightning.data.datamodule.process_group", lambda: (0, 2))
    r0 = ResumableSampler(40, batch_size=2, seed=3, position=lambda: 20)
    rank0 = list(r0)
    monkeypatch.setattr("uae_lightning.data.datamodule.process_group", lambda: (1, 2))
    r1 = ResumableSampler(40, batch_size=2, seed=3, position=lambda: 20)
    rank1 = list(r1)
    for b in range(10):
        assert sorted(rank0[2 * b : 2 * b + 2] + rank1[2 * b : 2 * b + 2]) == sorted(order[4 * b : 4 * b + 4])


def test_toy_images_kept_from_an_earlier_draw_are_the_drawn_ones_whatever_a_consumer_did():
    """The toy world keeps the images it drew (datamodule._toy_scene). What a sample returns must equal a fresh
    drawing of its scene at the sample's own resolution, also after another resolution of the same scene was drawn and
    after a consumer wrote into an earlier copy."""
    from uae_lightning.data import toy
    from uae_lightning.data.datamodule import ToyShapes

    levels = {"short": 1.0}
    at32, at24 = ToyShapes(4, 7, 32, 3, levels), ToyShapes(4, 7, 24, 3, levels)
    first = at32[2]["image"]
    first.zero_()  # a consumer writing into its copy
    for ds, side in ((at32, 32), (at24, 24), (at32, 32)):
        image = ds[2]["image"]
        drawn = torch.from_numpy(toy.image_array(toy.make_scene(7, 2, 3), side).copy()).permute(2, 0, 1)
        assert image.shape == (3, side, side) and torch.equal(image, drawn)


def test_sampler_drops_nothing_when_the_epoch_is_not_whole_global_batches(monkeypatch):
    """42 samples, global batch 2 x 4: a pass is 5 batches, and data epoch 0 ends 2 samples into the 6th global
    batch. Read over both ranks, the stream holds each sample once per data epoch: nothing is dropped at an epoch's
    end (a drop-last sampler would never show 2 samples of each epoch)."""
    from uae_lightning.data.datamodule import ResumableSampler

    per_rank = {}
    for rank in (0, 1):
        monkeypatch.setattr("uae_lightning.data.datamodule.process_group", lambda r=rank: (r, 2))
        out = []
        for position in (0, 5, 10, 15):  # 4 passes of 5 batches = 160 samples = 3 data epochs and 34
            out += list(ResumableSampler(42, batch_size=4, seed=1, position=lambda p=position: p))
        per_rank[rank] = out
    assert len(per_rank[0]) == len(per_rank[1]) == 80
    # A global batch is rank 0's and rank 1's batches interleaved (rank r holds its items r, r + 2, ...).
    flat = [per_rank[r][4 * b + i] for b in range(20) for i in range(4) for r in (0, 1)]
    for e in range(3):
        assert sorted(flat[42 * e : 42 * (e + 1)]) == list(range(42))
    assert flat[:42] != flat[42:84]
    # Resuming at global batch 7 (mid-pass) continues the same stream.
    monkeypatch.setattr("uae_lightning.data.datamodule.process_group", lambda: (1, 2))
    assert list(ResumableSampler(42, batch_size=4, seed=1, position=lambda: 7)) == per_rank[1][28:40]
