"""Real-data sources written by the real libraries at test time: a WebDataset folder as img2dataset lays it out
(webdataset.TarWriter), and a Hugging Face dataset both as `save_to_disk` and as parquet. Each is read through the one
DataModule by 2 ranks x 2 DataLoader workers: every sample of an epoch exactly once, bad samples counted, the order
fixed by the seed, and a Lightning run stopped mid-epoch resumes to the batches of an uninterrupted one."""
import io
import json
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from uae_lightning.data.datamodule import UAEDataModule

N_SAMPLES = 26  # 24 train + 2 held out (val_fraction 0.1): 24 = 6 global batches of 2 x 2 ranks
BAD = {"skipped_corrupt": 1, "skipped_truncated": 1, "skipped_missing_caption": 1, "skipped_empty_caption": 1,
       "skipped_too_small": 1}
CONVERTED = {"converted_grayscale": 1, "converted_high_bit_depth": 1}


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def corpus() -> list[dict]:
    """26 samples as a crawl has them: JPEGs with captions, and one of each kind of bad or odd sample."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(N_SAMPLES):
        rgb = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        s = {"key": f"{i:09d}", "image": _encode(rgb, "JPEG"), "ext": "jpg", "caption": f"caption number {i}",
             "meta": {"url": f"https://example.com/{i}.jpg", "key": f"{i:09d}", "status": "success", "width": 48,
                      "height": 40}}
        samples.append(s)
    samples[3]["image"] = b"this is not a jpeg"                                   # corrupt member
    samples[5]["image"] = samples[5]["image"][: len(samples[5]["image"]) // 2]  # truncated
    samples[7]["caption"] = None                                                  # no .txt member
    samples[9]["caption"] = "   "                                                 # empty caption
    samples[11]["image"] = _encode((rng.random((8, 8, 3)) * 255).astype(np.uint8), "JPEG")  # too small
    samples[13]["image"] = _encode((rng.random((40, 48)) * 255).astype(np.uint8), "JPEG")  # grayscale
    samples[15].update(image=_encode((rng.random((40, 48)) * 65535).astype(np.uint16), "PNG"), ext="png")  # 16 bit
    return samples


def write_webdataset(folder, samples, per_shard=10):
    """img2dataset's layout: 00000.tar, 00001.tar, ... each holding {key}.jpg, {key}.txt, {key}.json."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for n in range(0, len(samples), per_shard):
        with wds.TarWriter(str(folder / f"{n // per_shard:05d}.tar")) as tar:
            for s in samples[n : n + per_shard]:
                member = {"__key__": s["key"], s["ext"]: s["image"], "json": s["meta"]}
                if s["caption"] is not None:
                    member["txt"] = s["caption"]
                tar.write(member)
        (folder / f"{n // per_shard:05d}_stats.json").write_text(json.dumps({"successes": per_shard}))
    return folder


def hf_dataset(samples):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "key": datasets.Value("string")})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": s["image"], "path": f"{s['key']}.{s['ext']}"} for s in samples],
        "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}, features=features)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """DataModule settings for each source over the same 26 samples."""
    root = tmp_path_factory.mktemp("corpora")
    samples = corpus()
    write_webdataset(root / "wds", samples)
    ds = hf_dataset(samples)
    ds.save_to_disk(str(root / "arrow"))
    (root / "parquet").mkdir()
    ds.to_parquet(str(root / "parquet" / "train-00000.parquet"))
    common = dict(resolution=32, min_side=16, val_fraction=0.1, batch_size=2, eval_batch_size=4, num_workers=2, seed=3)
    return {
        "webdataset": dict(source="webdataset", shards=str(root / "wds" / "{00000..00002}.tar"), **common),
        "hf_save_to_disk": dict(source="hf", hf_path=str(root / "arrow"), key_field="key",
                                hf_cache_dir=str(root / "hf_cache"), **common),
        "hf_parquet": dict(source="hf", hf_path=str(root / "parquet" / "*.parquet"), key_field="key",
                           hf_cache_dir=str(root / "hf_cache"), **common),
    }


def read_pass(settings, rank, world, monkeypatch, position=0, **over):
    """Batches one rank reads in the pass that starts at `position` global batches (a fresh DataModule: new workers)."""
    monkeypatch.setattr("uae_lightning.data.datamodule.process_group", lambda: (rank, world))
    dm = UAEDataModule(**{**settings, **over})
    dm.setup()
    dm._batches_trained = lambda: position
    batches = list(dm.train_dataloader())
    monkeypatch.undo()
    return dm, batches


@pytest.mark.parametrize("name", ["webdataset", "hf_save_to_disk", "hf_parquet"])
def test_two_ranks_two_workers_read_every_sample_once_an_epoch_and_count_the_bad(sources, name, monkeypatch):
    settings = sources[name]
    epochs = []
    for position in (0, 6):  # data epochs 0 and 1 (24 training samples = 6 global batches)
        keys, counts, n_batches = [], Counter(), []
        for rank in (0, 1):
            dm, batches = read_pass(settings, rank, 2, monkeypatch, position=position)
            n_batches.append(len(batches))
            for b in batches:
                keys += b.get("key", [])
                counts.update(b["skipped"])
        assert n_batches == [6, 6]  # equal batch counts: each batch of a sharded model is a collective
        train_keys = {dm.train_set.record(i).key for i in range(len(dm.train_set))}
        held_keys = {dm.val_set.record(i).key for i in range(len(dm.val_set))}
        assert len(train_keys) == 24 and len(held_keys) == 2 and not train_keys & held_keys
        bad_in_train = Counter(dm.train_set[i]["skip"] for i in range(24) if "skip" in dm.train_set[i])
        assert len(keys) == len(set(keys)) == 24 - sum(bad_in_train.values())  # no sample twice
        assert set(keys) | {dm.train_set.record(i).key for i in range(24) if "skip" in dm.train_set[i]} == train_keys
        assert {k: v for k, v in counts.items() if k.startswith("skipped_")} == \
            {f"skipped_{k}": v for k, v in bad_in_train.items()}  # each bad training sample counted once
        epochs.append(keys)
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])  # a new order each epoch, same samples
    # Over the whole corpus (both splits) every kind of bad sample is found, and the odd images are converted.
    everything = Counter()
    for ds in (dm.train_set, dm.val_set):
        for i in range(len(ds)):
            s = ds[i]
            everything.update([f"skipped_{s['skip']}"] if "skip" in s else
                              [f"converted_{s['converted']}"] if "converted" in s else [])
    assert dict(everything) == {**BAD, **CONVERTED}


@pytest.mark.parametrize("name", ["webdataset", "hf_save_to_disk", "hf_parquet"])
def test_the_order_is_fixed_by_the_seed_and_the_held_out_split_by_the_seed(sources, name, monkeypatch):
    _, a = read_pass(sources[name], 0, 2, monkeypatch)
    _, b = read_pass(sources[name], 0, 2, monkeypatch)
    _, c = read_pass(sources[name], 0, 2, monkeypatch, seed=4)
    assert [x.get("key") for x in a] == [x.get("key") for x in b]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b) if "images" in x)
    assert [x.get("key") for x in a] != [x.get("key") for x in c]


def test_sources_agree_sample_for_sample(sources, monkeypatch):
    """The same samples through the three sources are the same training batches: same keys, captions, pixels."""
    reads = {name: read_pass(s, 1, 2, monkeypatch)[1] for name, s in sources.items()}
    ref = reads["webdataset"]
    for name, batches in reads.items():
        assert [b.get("key") for b in batches] == [b.get("key") for b in ref], name
        assert [b.get("caption") for b in batches] == [b.get("caption") for b in ref], name
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(batches, ref) if "images" in x), name


class KeyRecorder(L.LightningModule):
    """A model that only records the keys of the batches it trains on; stops the run at step `kill_at`."""

    def __init__(self, kill_at: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.kill_at, self.keys = kill_at, []

    def training_step(self, batch, i):
        if self.kill_at is not None and self.global_step == self.kill_at:
            raise KeyboardInterrupt  # stands in for SIGKILL after the last checkpoint
        self.keys.append(list(batch.get("key", [])))
        return (self.w * batch["images"].mean()).sum() if "images" in batch else self.w.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("name", ["webdataset", "hf_parquet"])
def test_a_run_stopped_mid_epoch_resumes_at_the_exact_next_sample(sources, name, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(folder, steps):
        ckpt = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt], num_sanity_val_steps=0, limit_val_batches=0)

    settings = {**sources[name], "batch_size": 4}  # 24 training samples: 6 batches an epoch
    whole = KeyRecorder()
    trainer(tmp_path / "whole", 10).fit(whole, datamodule=UAEDataModule(**settings))
    killed = KeyRecorder(kill_at=3)  # mid-epoch 0, after the checkpoint of step 3 (3 batches trained)
    try:
        trainer(tmp_path / "killed", 10).fit(killed, datamodule=UAEDataModule(**settings))
    except (KeyboardInterrupt, SystemExit):
        pass
    resumed = KeyRecorder()
    trainer(tmp_path / "killed", 10).fit(resumed, datamodule=UAEDataModule(**settings),
                                         ckpt_path=str(tmp_path / "killed" / "step=3.ckpt"))
    assert len(whole.keys) == 10 and killed.keys == whole.keys[:3]
    assert resumed.keys == whole.keys[3:]  # the rest of epoch 0, then epoch 1, batch for batch


def test_shard_patterns_and_missing_settings_give_clear_errors(sources, tmp_path):
    from uae_lightning.data.sources import expand_shards

    wds_folder = sources["webdataset"]["shards"].rsplit("/", 1)[0]
    assert [p.rsplit("/", 1)[1] for p in expand_shards(wds_folder)] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_shards(wds_folder + "/{00000..00001}.tar") == expand_shards(wds_folder + "/0000[01].tar")
    with pytest.raises(FileNotFoundError, match="no such shard .*00008.tar"):
        expand_shards(wds_folder + "/{00008..00009}.tar")
    with pytest.raises(ValueError, match="data.shards is not set"):
        expand_shards(None)
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 100)
    dm = UAEDataModule(source="webdataset", shards=str(tmp_path / "broken.tar"))
    with pytest.raises(ValueError, match="broken.tar"):
        dm.setup()
    dm = UAEDataModule(source="hf", hf_path=sources["hf_save_to_disk"]["hf_path"], caption_field="text")
    with pytest.raises(ValueError, match="caption_field='text'.*columns"):
        dm.setup()


def test_hydra_data_options_compose_over_a_paper_preset(tmp_path):
    """`+experiment=pretrain data=webdataset` replaces the preset's manifest source, keeps the paper model."""
    from conftest import compose_cfg
    from uae_lightning.config import validate
    from uae_lightning.errors import ConfigError

    # A brace pattern is quoted for Hydra (README: "data.shards='/data/{00000..00127}.tar'"); a folder or a glob is not.
    cfg = compose_cfg(["+experiment=pretrain", "data=webdataset", "data.shards='/data/{00000..00127}.tar'"])
    assert cfg.data.source == "webdataset" and cfg.model.encoder.pretrained == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert cfg.data.shards == "/data/{00000..00127}.tar"
    cfg = compose_cfg(["+experiment=pretrain", "data=hf", "data.hf_path=/data/parquet/*.parquet"])
    assert cfg.data.source == "hf" and cfg.data.image_field == "image" and cfg.data.hf_path == "/data/parquet/*.parquet"
    with pytest.raises(ConfigError, match="data.shards is not set"):
        validate(compose_cfg(["+experiment=pretrain", "data=webdataset"]))


def test_toy_export_reads_back_as_the_toy_samples(tmp_path):
    """The lossless export, read through data=webdataset, is the toy world's data: same images, captions, short
    captions and scenes, in the same training order."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "uae_lightning.data.export_toy", str(tmp_path), "+experiment=toy_pretrain",
                          "data.train_size=96", "data.val_size=8", "--per-shard", "40"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    toy = UAEDataModule(source="toy", train_size=96, val_size=8, batch_size=32, caption_levels={"short": 1.0})
    wds = UAEDataModule(source="webdataset", shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"),
                        resolution=32, min_side=32, batch_size=32, short_caption_field="json.short_caption",
                        scene_field="json.scene")
    for dm in (toy, wds):
        dm.setup()
    for a, b in zip(toy.train_dataloader(), wds.train_dataloader()):
        assert torch.equal(a["images"], b["images"])
        assert all(a[k] == b[k] for k in ("caption", "short_caption", "scene"))
    assert [toy.val_set[i]["caption"] for i in range(8)] == [wds.val_set[i]["caption"] for i in range(8)]


@pytest.mark.slow
def test_toy_pretrain_runs_from_the_webdataset_export_and_meets_the_pretrain_margin(tmp_path):
    """README's two commands as they are: export the toy world, then run the printed `+experiment=toy_pretrain
    data=webdataset ...` command. The stage reads its captions (the default run's margin: complete caption over empty
    caption >= 0.15 similarity)."""
    import shlex
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "uae_lightning.data.export_toy", str(tmp_path / "toy_wds"),
                          "+experiment=toy_pretrain"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    [command] = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("python -m uae_lightning ")]
    args = shlex.split(command)[1:] + [f"paths.runs_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false"]
    assert "data=webdataset" in args
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    [done] = list((tmp_path / "runs").rglob("pretrain/done.json"))
    m = json.loads(done.read_text())["metrics"]
    assert m["similarity_complete_caption"] - m["similarity_empty_caption"] >= 0.15, m
    assert not [k for k in json.loads(done.read_text())["data"] if k.startswith("skipped_")]  # every PNG decoded


def test_shard_indexes_are_cached_and_reads_need_no_header_walk(sources, tmp_path, monkeypatch):
    """Indexing walks every tar header; a second run (another rank, stage or job) reads the cached offsets instead,
    and a sample is read from its offsets alone."""
    from uae_lightning.data.sources import WebDatasetRecords, expand_shards

    shards = expand_shards(sources["webdataset"]["shards"])
    first = WebDatasetRecords(shards, index_cache=tmp_path / "index")
    assert len(list((tmp_path / "index").glob("*.npz"))) == 3 and len(first) == N_SAMPLES

    def no_walk(*a, **k):
        raise AssertionError("a shard's headers were walked again")

    monkeypatch.setattr("wids.wids.IndexedTarSamples", no_walk)
    again = WebDatasetRecords(shards, index_cache=tmp_path / "index")
    for i in (0, 7, 15, 25):
        a, b = first.members(i), again.members(i)
        assert a == b and a["__key__"] == f"{i:09d}"
    assert again[15].image_ext == "png" and again[7].caption is None and again[9].caption == "   "
    assert again[0].caption == "caption number 0" and again[0].meta["url"] == "https://example.com/0.jpg"


@pytest.mark.parametrize("name", ["webdataset", "hf_parquet"])
def test_two_real_ranks_of_a_process_group_split_an_epoch_exactly(sources, name, tmp_path, monkeypatch):
    """The same, with 2 processes in a gloo process group (the rank comes from torch.distributed, as in a run) and 2
    DataLoader workers each: together they read every training sample once, equal batch counts, and their batches
    interleave into the one-process order, global batch by global batch."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).resolve().parent / "workers" / "read_epoch.py"
    settings = json.dumps({**sources[name], "batch_size": 2})
    procs = [subprocess.Popen([sys.executable, str(worker), settings, str(tmp_path / f"rank{r}.json")],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["batches"]) for r in ranks] == [6, 6]
    keys = [k for r in ranks for b in r["batches"] for k in b]
    skipped = sum((Counter(r["skipped"]) for r in ranks), Counter())
    dm, one = read_pass({**sources[name], "batch_size": 4}, 0, 1, monkeypatch)  # one process, the same global batch
    assert len(keys) == len(set(keys)) == 24 - sum(v for k, v in skipped.items() if k.startswith("skipped_"))
    assert [sorted(ranks[0]["batches"][b] + ranks[1]["batches"][b]) for b in range(6)] == \
        [sorted(b.get("key", [])) for b in one]
