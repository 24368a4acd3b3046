"""Reading images robustly: one walker for every image folder, any common mode to RGB, and
unreadable files (truncated, not an image, a decompression bomb) named in a one-line error."""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMG_EXTENSIONS", "BadImageError", "image_files", "is_image_file", "load_rgb", "open_image", "to_rgb",
           "unique_names"]

#: File endings read as images everywhere in agentlit (lower case; matching ignores case).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_SKIP_HINT = " (or set the data module's skip_bad_images: true to skip such files with a warning)"


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` ends with one of :data:`IMG_EXTENSIONS` (any case).

    Args:
        path: a file name or path.
    """
    return str(path).lower().endswith(IMG_EXTENSIONS)


def image_files(root: str | Path, recursive: bool = True) -> list[Path]:
    """Every image file under ``root``, sorted by its path below ``root``: the one folder walk behind
    every dataset, predict folder and reference folder in agentlit.

    Hidden files and folders (a leading dot: ``.git``, macOS ``._x.jpg``) are skipped. Links are
    followed, but each folder is read once and each file listed once: a directory link back into a
    folder already read (a loop) or a second way to the same folder or file is skipped, and one
    warning says how many were.

    Args:
        root: the folder to walk (must exist).
        recursive: also walk sub-folders (False: the files directly in ``root``).

    Returns:
        The image paths as reached from ``root`` (links not resolved).
    """
    root = Path(root)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    found: list[tuple[str, Path]] = []
    skipped: list[str] = []

    def walk(folder: Path, rel: str) -> None:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen_dirs:
            skipped.append(rel or ".")
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir()  # follows links; a dangling link is neither dir nor file
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue
            if is_dir:
                if recursive:
                    walk(Path(entry.path), name)
            elif is_file and is_image_file(entry.name):
                st = entry.stat()
                if (st.st_dev, st.st_ino) in seen_files:
                    skipped.append(name)
                    continue
                seen_files.add((st.st_dev, st.st_ino))
                found.append((name, Path(entry.path)))

    walk(root, "")
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} link(s) to folders or files already read (a link loop or a "
                      f"second path to the same images), e.g. {skipped[0]}", stacklevel=2)
    return [path for _, path in sorted(found, key=lambda item: item[0])]


def unique_names(paths: Sequence[str | Path], root: str | Path | None = None) -> list[str]:
    """One output name per input file: its stem, or — where stems collide (``a.png`` / ``a.jpg``) —
    its path below ``root`` with ``/`` as ``_`` (``a.png``, ``sub_a.png``), numbered if that still
    collides; so no prediction overwrites another.

    Args:
        paths: the input files.
        root: the folder the paths lie in (None: their file names).
    """
    stems = [Path(p).stem for p in paths]
    count: dict[str, int] = {}
    for s in stems:
        count[s] = count.get(s, 0) + 1
    names = []
    for p, s in zip(paths, stems):
        if count[s] == 1:
            names.append(s)
            continue
        rel = Path(p).relative_to(root) if root is not None else Path(Path(p).name)
        names.append(rel.as_posix().replace("/", "_"))
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 0
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


class BadImageError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, not an image, a decompression bomb)."""


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


def open_image(path: str | Path, what: str = "image", skippable: bool = False) -> Image.Image:
    """``path`` decoded in full, in its own mode (so truncation is caught here, not mid-transform).

    Args:
        path: the image file.
        what: how the error names the file (``image``, ``mask``).
        skippable: the error mentions ``skip_bad_images`` (for data modules that offer it).

    Raises:
        BadImageError: one line naming the file: truncated, corrupt, not an image, or more pixels
            than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    try:
        with Image.open(path) as img:
            img.load()  # decodes everything now; the closed file is no longer needed
            return img
    except Image.DecompressionBombError as err:
        reason = f"{err} If the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS; otherwise delete the file"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        reason = f"{err}. Replace or delete the file"
    raise BadImageError(f"cannot read {what} {path}: {reason}" + (_SKIP_HINT if skippable else "")) from None


def load_rgb(path: str | Path, skippable: bool = True) -> Image.Image:
    """``path`` as an RGB image (see :func:`open_image` for the errors and :func:`to_rgb` for the modes).

    Args:
        path: the image file.
        skippable: the error mentions ``skip_bad_images`` (for data modules that offer it).
    """
    return to_rgb(open_image(path, "image", skippable))
