"""Image files for Unified-Bench and the pipeline command line: listing, loading to tensors, saving PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uae_lightning.data.images import SkipSample, load_image

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
        img, _ = load_image(str(path), resolution, min_side=1, max_pixels=max_pixels)
    except SkipSample:
        return None
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Save float [3,H,W] in [0,1] as an 8-bit PNG, atomically (a killed run never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
    tmp.replace(path)


def save_grid(rows: list[list[torch.Tensor]], path: str | Path, pad: int = 2) -> None:
    """Rows of equally sized images as one PNG (white gutters; a short row is filled with white)."""
    from torchvision.utils import make_grid

    cols = max(len(r) for r in rows)
    blank = torch.ones_like(rows[0][0])
    cells = [img.detach().float().cpu() for r in rows for img in [*r, *[blank] * (cols - len(r))]]
    save_png(make_grid(cells, nrow=cols, padding=pad, pad_value=1.0), path)
