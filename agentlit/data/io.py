"""Reading images robustly: one walker for every image folder, any common mode to RGB, and
unreadable files (truncated, not an image, a decompression bomb) named in a one-line error."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

__all__ = ["IMG_EXTENSIONS", "BadImageError", "PredictFolder", "image_files", "is_image_file", "load_rgb", "open_image",
           "predict_files", "to_rgb", "unique_names", "warn_unreadable"]

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


class BadImageError(UserError):
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


def predict_files(root: str | Path, option: str = "predict_root") -> tuple[list[Path], list[str]]:
    """The images ``predict`` reads from ``root`` (:func:`image_files`: recursive, any layout, hidden files
    skipped) and one output name per image (:func:`unique_names`: its stem, or its path below ``root`` where
    stems collide), or a one-line error naming the folder.

    Args:
        root: the folder to predict.
        option: the setting that named it (for the message).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{option} {root} is not a folder; give a folder of images (searched recursively, any layout)")
    files = image_files(root)
    if not files:
        raise FileNotFoundError(f"{option} {root} holds no images with extensions {IMG_EXTENSIONS} (searched recursively)")
    return files, unique_names(files, root)


class PredictFolder:
    """The images under a folder for ``predict``, each item ``make(RGB image)`` plus ``name`` (a unique
    output name), ``file`` (its path below the folder), ``index`` and ``unreadable`` (""). An unreadable
    file is a one-line error naming it; with ``skip_bad`` it is reported once (a warning naming it) and its
    item is made from a blank image, with ``unreadable`` holding the error and ``index = -1``, so batches
    keep their shape and the task leaves it out and counts it.

    Args:
        root: the folder, searched recursively (:func:`predict_files`).
        make: RGB image → the item's fields (e.g. ``{"image": transformed tensor}``).
        skip_bad: skip unreadable files with a warning instead of stopping.
        option: the setting that named the folder (for messages).
    """

    def __init__(self, root: str | Path, make: Callable[[Image.Image], dict], skip_bad: bool = False,
                 option: str = "predict_root") -> None:
        self.root = Path(root)
        self.files, self.names = predict_files(self.root, option)
        self.relative = [p.relative_to(self.root).as_posix() for p in self.files]
        self.make, self.skip_bad = make, skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        info = {"name": self.names[index], "file": self.relative[index]}
        try:
            image = load_rgb(self.files[index], skippable=not self.skip_bad)
        except BadImageError as err:
            if not self.skip_bad:
                raise
            warn_unreadable(str(err))
            blank = Image.new("RGB", (32, 32))
            return {**self.make(blank), **info, "index": -1, "unreadable": str(err)}
        return {**self.make(image), **info, "index": index, "unreadable": ""}  # every item has every key (collate)


_warned: set[str] = set()


def warn_unreadable(message: str) -> None:
    """One warning per unreadable file skipped with ``skip_bad_images`` (on rank 0).

    Args:
        message: the file's one-line read error.
    """
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"skipping unreadable image (skip_bad_images=true): {message}", stacklevel=2)
