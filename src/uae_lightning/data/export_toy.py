"""Write the toy shapes world as a WebDataset, losslessly: the same scenes a toy stage trains on, as files.

    python -m uae_lightning.data.export_toy OUT [hydra overrides]      e.g. +experiment=toy_pretrain

writes OUT/train/00000.tar ... and OUT/val/00000.tar ... (the held-out scenes), each sample a `{key}.png` (the image
at data.resolution), `{key}.txt` (the complete caption) and `{key}.json` (`short_caption`, and `scene`: the ground
truth the toy's informativeness reads). The stage's data settings (seed, sizes, caption levels) are those of the
composed config, so `+experiment=toy_pretrain data=webdataset` on the export trains on exactly the data=toy samples,
in the same order; the command to do so is printed at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm


def write_split(dataset, folder: Path, per_shard: int, desc: str) -> list[Path]:
    """Every sample of a ToyShapes split into folder/NNNNN.tar (each shard written to a temporary name, then
    renamed, so a shard that exists is whole)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=len(dataset), desc=desc, unit="img")
    for start in range(0, len(dataset), per_shard):
        path = folder / f"{start // per_shard:05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with wds.TarWriter(str(tmp)) as tar:
            for i in range(start, min(start + per_shard, len(dataset))):
                item = dataset[i]
                png = io.BytesIO()
                Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(png, "PNG")
                tar.write({"__key__": f"{i:08d}", "png": png.getvalue(), "txt": item["caption"],
                           "json": {"short_caption": item["short_caption"], "scene": item["scene"]}})
                bar.update()
        os.replace(tmp, path)
        written.append(path)
    bar.close()
    return written


def main(argv: list[str] | None = None) -> None:
    from uae_lightning.chain import compose
    from uae_lightning.data.datamodule import UAEDataModule
    from uae_lightning.runner import _merged

    p = argparse.ArgumentParser(prog="python -m uae_lightning.data.export_toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder to write train/ and val/ shards into")
    p.add_argument("overrides", nargs="*", help="hydra overrides choosing the toy data settings (+experiment=...)")
    p.add_argument("--stage", default="pretrain", help="whose data settings (stages.<stage>.data over data) to export")
    p.add_argument("--per-shard", type=int, default=1000, help="samples a shard (default 1000)")
    args = p.parse_args(argv)
    cfg = compose(args.overrides)
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(_merged(cfg.data, cfg.stages[args.stage].get("data")), resolve=True)
    if data["source"] != "toy":
        raise SystemExit(f"data.source={data['source']}: only the toy world is exported (choose data=toy)")
    dm = UAEDataModule(**{k: v for k, v in data.items() if k != "_target_"})
    dm.setup()
    train = write_split(dm.train_set, args.out / "train", args.per_shard, "train")
    val = write_split(dm.val_set, args.out / "val", args.per_shard, "val")
    (args.out / "export.json").write_text(json.dumps({"data": data, "stage": args.stage,
                                                      "train_shards": len(train), "val_shards": len(val)}, indent=1))
    print(f"wrote {len(dm.train_set)} training and {len(dm.val_set)} held-out scenes to {args.out}")
    print("train on them with:\n  python -m uae_lightning " + " ".join(args.overrides or ["+experiment=toy_pretrain"])
          + " " + " ".join(webdataset_overrides(args.out, data)))


def webdataset_overrides(out: Path, data: dict) -> list[str]:
    """The data=webdataset overrides that read an export with the toy data settings it was written with."""
    return ["data=webdataset", f"data.shards={out / 'train'}", f"data.val_shards={out / 'val'}",
            f"data.resolution={data['resolution']}", f"data.batch_size={data['batch_size']}",
            f"data.eval_batch_size={data['eval_batch_size']}", f"data.num_workers={data['num_workers']}",
            f"data.min_side={data['resolution']}", "data.short_caption_field=json.short_caption",
            "data.scene_field=json.scene"]


if __name__ == "__main__":
    main()
