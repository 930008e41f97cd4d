"""Robust image decoding: every file becomes an RGB image of the training resolution, or a named reason to skip it."""
from __future__ import annotations

import warnings

import numpy as np
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


def load_image(path: str, resolution: int, min_side: int, max_pixels: int) -> tuple[Image.Image, str | None]:
    """Open, validate, convert and centre-crop-resize one image file.

    Raises SkipSample("missing" | "corrupt" | "too_small" | "too_large") for files that must not be trained on.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise SkipSample("too_large", f"{path} is {w}x{h}")
                if min(w, h) < min_side:
                    raise SkipSample("too_small", f"{path} is {w}x{h}")
                img.load()  # decode now so truncated files fail here, not later
                img = ImageOps.exif_transpose(img)
    except SkipSample:
        raise
    except FileNotFoundError as e:
        raise SkipSample("missing", str(path)) from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("corrupt", f"{path}: {e}") from e
    img, converted = to_rgb(img)
    img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC)
    return img, converted
