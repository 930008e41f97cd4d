"""Image files for Unified-Bench and the pipeline command line: listing, loading to tensors, saving PNGs."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uae_lightning.data.images import SkipSample, load_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def list_images(paths: list[str | Path] | str | Path) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in folders."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
    return out


def load_tensor(path: str | Path, resolution: int, max_pixels: int = 16384 * 16384) -> torch.Tensor | None:
    """An image file as float [3,R,R] in [0,1] (RGB-converted, centre-cropped and resized), or None when the file
    cannot be decoded (the caller counts it)."""
    try:
        return load_uint8(str(path), resolution, min_side=1, max_pixels=max_pixels)[0].float() / 255.0
    except SkipSample:
        return None


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Save float [3,H,W] in [0,1] as an 8-bit PNG, atomically (a killed run never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
    tmp.replace(path)


def save_grid(rows: list[dict], path: str | Path, cell_px: int = 160) -> None:
    """The bench's look at its results: one line per image, original | reconstruction (each drawn `cell_px` wide,
    nearest-neighbour, so a 32 px toy image stays sharp) | its caption, wrapped, with the image's name and overall
    score. `rows`: {"name", "original", "reconstruction" (float [3,H,W] in [0,1]), "caption", "score"}. The captions
    are also in the PNG's Description field, one per line. Written atomically."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dpi, text_px = 100, 4 * cell_px
    fig, axes = plt.subplots(len(rows), 3, squeeze=False, dpi=dpi, figsize=((2 * cell_px + text_px) / dpi, len(rows) * (cell_px + 24) / dpi),
                             gridspec_kw={"width_ratios": [cell_px, cell_px, text_px], "wspace": 0.03, "hspace": 0.15})
    height = len(rows) * (cell_px + 24)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=4 / height, top=1 - 20 / height)
    for i, row in enumerate(rows):
        for j, key in enumerate(("original", "reconstruction")):
            ax = axes[i, j]
            ax.imshow(to_uint8(row[key]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(key, fontsize=9)
        ax = axes[i, 2]
        ax.axis("off")
        score = f"  (overall {row['score']:.1f})" if row.get("score") is not None else ""
        caption = "\n".join(textwrap.wrap(row.get("caption") or "(no caption)", width=70)[:6])
        ax.text(0.0, 0.95, f"{row['name']}{score}", fontsize=8, fontweight="bold", va="top", transform=ax.transAxes)
        ax.text(0.0, 0.78, caption, fontsize=9, va="top", transform=ax.transAxes, family="monospace")
    tmp = path.with_name(path.name + ".tmp")
    description = "\n".join(f"{r['name']}: {r.get('caption') or ''}" for r in rows)
    fig.savefig(tmp, format="png", dpi=dpi, metadata={"Description": description})
    plt.close(fig)
    tmp.replace(path)


def png_names(names: list[str]) -> dict[str, str]:
    """Where each image's PNG goes: its name with the suffix .png, or its whole name + .png when two images differ
    only by suffix (a.jpg, a.png), so that no output overwrites another."""
    stems = Counter(str(Path(n).with_suffix("")) for n in names)
    return {n: str(Path(n).with_suffix(".png")) if stems[str(Path(n).with_suffix(""))] == 1 else n + ".png"
            for n in names}
