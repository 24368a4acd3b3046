"""Reading images robustly: any common mode to RGB, and unreadable files named in the error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMG_EXTENSIONS", "BadImageError", "is_image_file", "load_rgb", "to_rgb"]

#: File endings read as images everywhere in agentlit (lower case; matching ignores case).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` ends with one of :data:`IMG_EXTENSIONS` (any case).

    Args:
        path: a file name or path.
    """
    return str(path).lower().endswith(IMG_EXTENSIONS)


class BadImageError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, not an image)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA/LA (alpha composited on black, as dropping it would), CMYK and
    16/32-bit integer or float images, as 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Wide images: scale by the type's range, not clip at 255 (PIL's convert would saturate).
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else (a.max() if a.max() > 255 else 255.0)
        a = np.clip(a / max(top, 1e-12) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` fully (so truncation is caught here, not mid-transform) as RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(
            f"cannot read image {path}: {err}. Replace or delete the file"
            " (or set the data module's skip_bad_images: true to skip such files with a warning)"
        ) from err
