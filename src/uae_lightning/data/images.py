"""Robust image decoding: every file becomes an RGB image of the training resolution, or a named reason to skip it."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps


class SkipSample(Exception):
    """A sample that cannot be trained on; `reason` is the counter it is logged under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to 8-bit RGB; returns the image and the name of the conversion made (or None)."""
    if img.mode == "RGB":
        return img, None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), "high_bit_depth"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB"), "alpha"
    if img.mode in ("L", "1"):
        return img.convert("RGB"), "grayscale"
    return img.convert("RGB"), f"mode_{img.mode}"


def load_image(source: str | bytes, resolution: int, min_side: int, max_pixels: int) -> tuple[Image.Image, str | None]:
    """Open (a file path, or the encoded bytes of a WebDataset member / dataset cell), validate, convert and
    centre-crop-resize one image.

    Raises SkipSample("missing" | "corrupt" | "truncated" | "too_small" | "too_large") for images that must not be
    trained on.
    """
    name = source if isinstance(source, str) else f"<{len(source)} bytes>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise SkipSample("too_large", f"{name} is {w}x{h}")
                if min(w, h) < min_side:
                    raise SkipSample("too_small", f"{name} is {w}x{h}")
                img.load()  # decode now so truncated files fail here, not later
                img = ImageOps.exif_transpose(img)
    except SkipSample:
        raise
    except FileNotFoundError as e:
        raise SkipSample("missing", str(name)) from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL names a file that ends early ("image file is truncated", "Truncated File Read"); anything else that
        # does not decode is corrupt.
        reason = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise SkipSample(reason, f"{name}: {e}") from e
    img, converted = to_rgb(img)
    img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC)
    return img, converted


def load_uint8(source: str | bytes, resolution: int, min_side: int, max_pixels: int) -> tuple[torch.Tensor, str | None]:
    """`load_image` as a uint8 tensor [3, resolution, resolution]; raises SkipSample as it does."""
    img, converted = load_image(source, resolution, min_side, max_pixels)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), converted
