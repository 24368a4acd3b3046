"""Prediction files a person can open: ``predictions.csv`` for classifiers, overlay PNGs for
segmentation, drawn detections — at a size a person can read —, where ``predict`` writes them
(:func:`predictions_folder`) and the line every ``predict`` ends with (:func:`report_predictions`).

Both are written by the task modules themselves (``on_predict_epoch_end`` / ``predict_step``), so
``agentlit predict`` and a plain ``Trainer.predict`` behave the same. Under DDP every rank predicts
its share; the classification rows are gathered and rank 0 alone writes the file.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ClassificationPredictions", "MIN_DRAWING_SIDE", "claim_output_dir", "detection_image", "enlarge", "enlarge_grid",
    "font",
    "format_prediction_table", "output_folder", "overlay_image", "place_labels", "predict_source",
    "predictions_folder", "report_predictions", "save_overlay",
]


def output_folder(trainer: Any) -> Path:
    """The run folder of ``trainer``: its logger's ``version_N`` folder, else ``default_root_dir``.

    Args:
        trainer: the running Lightning Trainer.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


def _gather(rows: list[Any]) -> list[Any]:
    """Every rank's rows, concatenated on every rank (a no-op without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    world = torch.distributed.get_world_size()
    if world == 1:
        return rows
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, rows)
    return [r for part in gathered for r in part]


class ClassificationPredictions:
    """Collects class probabilities batch by batch and writes them as ``predictions.csv``.

    Columns: ``file`` (the item's name, e.g. its path relative to the predicted folder), ``label``
    (the top class's name), ``score`` (its probability), then ``top{k}_label`` / ``top{k}_score``
    for k = 1..top_k, and ``target`` (the true class name) when the data knows it.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, list[float], int | None]] = []  # (item index, probabilities, target or None)
        self.skipped: list[str] = []  # inputs that could not be read (skip_bad_images)
        self._next = 0  # running index for batches that carry none

    def add(self, probs: Tensor, index: Tensor | None = None, target: Tensor | None = None) -> None:
        """Record one batch.

        Args:
            probs: (B, K) class probabilities.
            index: (B,) item indices into the dataset (None: numbered in arrival order).
            target: (B,) true class indices, if known.
        """
        probs = probs.detach().float().cpu()
        if index is None:
            index = torch.arange(self._next, self._next + len(probs))
        self._next = max(self._next, int(index.max()) + 1) if len(index) else self._next
        targets = [None] * len(probs) if target is None else [int(t) for t in target.cpu()]
        for i, p, t in zip(index.cpu().tolist(), probs.tolist(), targets):
            self.rows.append((int(i), p, t))

    def write(
        self,
        trainer: Any,
        class_names: Sequence[str] | None = None,
        item_names: Sequence[str] | None = None,
        top_k: int = 5,
        show: int = 10,
    ) -> Path | None:
        """Gather the rows of every rank; on rank 0 write ``<run folder>/predictions.csv``, print a
        short table and the file's path. Returns the path on rank 0, None elsewhere.

        Args:
            trainer: the running Lightning Trainer (gives the run folder and the rank).
            class_names: one name per class (None: the class indices).
            item_names: one name per dataset item, indexed by the rows' item index (None: the index).
            top_k: how many top classes get their own name/probability columns.
            show: rows printed in the summary table.
        """
        rows = sorted(_gather(self.rows), key=lambda r: r[0])
        skipped = _gather(self.skipped)
        self.rows, self.skipped = [], []
        if not trainer.is_global_zero or not rows:
            return None
        num_classes = len(rows[0][1])
        names = list(class_names) if class_names and len(class_names) == num_classes else [str(i) for i in range(num_classes)]
        k = max(1, min(top_k, num_classes))
        header = ["file", "label", "score"]
        for j in range(1, k + 1):
            header += [f"top{j}_label", f"top{j}_score"]
        has_target = any(t is not None for _, _, t in rows)
        if has_target:
            header.append("target")
        table: list[list[Any]] = []
        for index, p, t in rows:
            order = np.argsort(-np.asarray(p), kind="stable")[:k]
            item = item_names[index] if item_names is not None and 0 <= index < len(item_names) else str(index)
            line: list[Any] = [item, names[order[0]], f"{p[order[0]]:.4f}"]
            for c in order:
                line += [names[c], f"{p[c]:.4f}"]
            if has_target:
                line.append("" if t is None else names[t])
            table.append(line)
        out = output_folder(trainer)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "predictions.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(table)
        print(format_prediction_table(table, header, show), flush=True)
        if has_target:
            right = sum(line[1] == line[-1] for line in table)
            print(f"{right}/{len(table)} predictions match the known labels ({right / len(table):.1%})", flush=True)
        report_predictions(None, len(table) + len(skipped), predict_source(trainer, "held-out images"),
                           f"predictions for {len(table)} images", path, skipped)
        return path


def format_prediction_table(table: list[list[Any]], header: list[str], show: int = 10) -> str:
    """The first ``show`` rows as an aligned text table of file, label, score (and target).

    Args:
        table: CSV rows (``file``, ``label``, ``score``, …).
        header: the CSV header.
        show: rows to include; a last line counts the rest.
    """
    cols = [0, 1, 2] + ([len(header) - 1] if header[-1] == "target" else [])
    shown = [[str(r[c]) for c in cols] for r in table[:show]]
    titles = [header[c] for c in cols]
    # long paths keep their end, where the file name is
    shown = [[("…" + v[-47:]) if i == 0 and len(v) > 48 else v for i, v in enumerate(r)] for r in shown]
    widths = [max(len(t), *(len(r[i]) for r in shown)) for i, t in enumerate(titles)]
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in shown]
    if len(table) > show:
        lines.append(f"… {len(table) - show} more")
    return "\n".join(lines)


def overlay_image(
    image: np.ndarray,
    pred: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    min_size: int = 512,
) -> "Image.Image":
    """One picture of a segmentation: the input | the prediction's colours blended over it | a
    legend of the classes present (colour swatch and name).

    Args:
        image: (H, W, 3) uint8 RGB input at the prediction's size.
        pred: (H, W) integer class map.
        palette: (K, 3) uint8 colour per class.
        class_names: one name per class (None: the class indices).
        alpha: weight of the class colours in the middle panel.
        min_size: small images are enlarged (whole pixels, nearest) until their longer side reaches this.
    """
    from PIL import Image, ImageDraw

    image, _ = enlarge(image, min_size)  # a 64 px prediction is too small to read next to the legend's text
    pred, _ = enlarge(pred, min_size)
    h, w = pred.shape
    colours = palette[np.clip(pred, 0, len(palette) - 1)]  # (H, W, 3)
    blend = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
    present = [int(c) for c in np.unique(pred)]
    names = list(class_names) if class_names else []
    size = max(12, round(max(h, w) / 32))  # text follows the picture: 16 px at 512
    text_font = font(size)
    row_h, swatch, pad = round(size * 1.5), size, max(4, size // 3)
    labels = [names[c] if c < len(names) else str(c) for c in present]
    legend_w = pad * 3 + swatch + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=text_font)) for t in labels)
    height = max(h, pad * 2 + row_h * len(present))
    canvas = Image.new("RGB", (2 * w + legend_w, height), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(Image.fromarray(blend), (w, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (c, text) in enumerate(zip(present, labels)):
        y = pad + r * row_h
        x = 2 * w + pad
        draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(v) for v in palette[c]), outline=(0, 0, 0))
        draw.text((x + swatch + pad, y + swatch / 2), text, fill=(0, 0, 0), font=text_font, anchor="lm")
    return canvas


def save_overlay(
    path: str | Path,
    image: Tensor,
    pred: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] = (123.675, 116.28, 103.53),
    std: Sequence[float] = (58.395, 57.12, 57.375),
) -> Path:
    """Write :func:`overlay_image` for a normalised network input; the input is un-normalised and
    resized to the prediction's size first.

    Args:
        path: the PNG to write.
        image: (3, h, w) or (1, 3, h, w) normalised input, as the model saw it.
        pred: (H, W) integer class map at the original image size.
        palette: (K, 3) uint8 colour per class.
        class_names: one name per class (None: the class indices).
        mean: per-channel mean the input was normalised with, on the 0-255 scale.
        std: per-channel std the input was normalised with, on the 0-255 scale.
    """
    x = image.detach().float().cpu().reshape(-1, *image.shape[-3:])[:1]  # (1, 3, h, w)
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    if tuple(x.shape[-2:]) != tuple(pred.shape):
        x = torch.nn.functional.interpolate(x, size=tuple(pred.shape), mode="bilinear", align_corners=False)
    rgb = x[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    overlay_image(rgb, pred, palette, class_names).save(path)
    return path


# ------------------------------------------------------------------------------- where and what
def claim_output_dir(trainer: Any, path: str | Path) -> Path:
    """``path``, or ``path-1``, ``path-2`` … when an earlier run wrote there
    (:func:`~agentlit.utils.paths.fresh_dir`, claimed atomically on rank 0; the same folder on every rank).

    Args:
        trainer: the running Lightning Trainer (None: this process alone).
        path: the folder asked for.
    """
    from .utils.paths import fresh_dir

    claimed = fresh_dir(path) if trainer is None or trainer.is_global_zero else None
    if trainer is not None and trainer.world_size > 1:
        claimed = trainer.strategy.broadcast(claimed, src=0)
    return Path(claimed)


def predictions_folder(trainer: Any, output_dir: str | Path | None = None) -> Path:
    """Where ``predict`` writes its files: ``output_dir`` when the config sets one, else ``predictions/`` in
    the evaluation folder (``version_N/predict/predictions`` for a run's checkpoint); never a folder an
    earlier predict wrote into (:func:`claim_output_dir`).

    Args:
        trainer: the running Lightning Trainer.
        output_dir: the task's ``output_dir`` setting (None: the evaluation folder's ``predictions/``).
    """
    return claim_output_dir(trainer, output_dir or output_folder(trainer) / "predictions")


def _total(trainer: Any, n: int) -> int:
    """``n`` summed over the ranks (each predicts its share)."""
    if trainer is None or trainer.world_size == 1:
        return n
    return int(trainer.strategy.reduce(torch.tensor(float(n)), reduce_op="sum").item())


def report_predictions(trainer: Any, read: int, inputs: str, wrote: str, where: str | Path,
                       skipped: Sequence[str] = ()) -> str | None:
    """The line every ``predict`` ends with: how many inputs it read (and which it could not), what it
    wrote and where. Counts are summed over the ranks; rank 0 prints it. Returns the line on rank 0.

    Args:
        trainer: the running Lightning Trainer.
        read: inputs this rank predicted.
        inputs: what they were and where from, e.g. ``"images from my digits"``.
        wrote: what was written, e.g. ``"12 masks and 12 overlays"``.
        where: the folder (or file) written to.
        skipped: names of the inputs this rank could not read (skipped with ``skip_bad_images``).
    """
    read, names = _total(trainer, read), _gather(list(skipped))
    if trainer is not None and not trainer.is_global_zero:
        return None
    line = f"agentlit: predict read {read} {inputs}"
    if names:
        line += f" ({len(names)} unreadable, skipped: {', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
    line += f"; wrote {wrote} to {where}"
    print(line, flush=True)
    return line


def predict_source(trainer: Any, default: str = "images of the validation set") -> str:
    """``"images from <predict_root>"`` when the data module predicts a folder, else ``default``.

    Args:
        trainer: the running Lightning Trainer.
        default: what the inputs are otherwise.
    """
    root = getattr(getattr(trainer, "datamodule", None), "predict_root", None)
    return f"images from {root}" if root else default


# ---------------------------------------------------------------------------------------- drawing
#: longer side, in pixels, that drawings of small inputs are enlarged to (whole pixels, nearest)
MIN_DRAWING_SIDE = 512


def font(size: int) -> "ImageFont.ImageFont":
    """PIL's bundled scalable font at ``size`` pixels (its small bitmap font where FreeType is missing).

    Args:
        size: text height in pixels.
    """
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def enlarge(image: np.ndarray, min_size: int = MIN_DRAWING_SIDE) -> tuple[np.ndarray, int]:
    """``image`` repeated by the whole factor that brings its longer side to at least ``min_size``
    (pixels stay sharp, coordinates scale exactly); returns it and the factor.

    Args:
        image: (H, W, ...) array.
        min_size: the longer side to reach (0: unchanged).
    """
    k = max(1, -(-min_size // max(image.shape[:2]))) if min_size else 1
    return (image.repeat(k, 0).repeat(k, 1) if k > 1 else image), k


def enlarge_grid(grid: Tensor, min_size: int = MIN_DRAWING_SIDE) -> Tensor:
    """A (C, H, W) sample grid enlarged by whole pixels until its longer side is at least ``min_size``
    (a grid of 16 px samples is otherwise too small to judge).

    Args:
        grid: (C, H, W) image tensor.
        min_size: the longer side to reach.
    """
    k = max(1, -(-min_size // max(grid.shape[-2:])))
    return grid.repeat_interleave(k, -2).repeat_interleave(k, -1) if k > 1 else grid


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    return (0, 0, 0) if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 140 else (255, 255, 255)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]], width: int, height: int
                 ) -> list[tuple[int, int]]:
    """Top-left corners for one label per box, in the given order (most important first): above the box,
    inside its top edge, below it, inside its bottom edge — the first spot inside the picture that no
    earlier label covers, else the least covered one.

    Args:
        boxes: (x0, y0, x1, y1) per box, in pixels.
        sizes: (w, h) of each label, in pixels.
        width: picture width.
        height: picture height.
    """
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for (x0, y0, x1, y1), (w, h) in zip(boxes, sizes):
        x = min(max(0, int(x0)), max(0, width - w))
        spots = [(x, int(y0) - h), (x, int(y0)), (x, int(y1)), (x, int(y1) - h)]
        spots = [(sx, sy) for sx, sy in spots if 0 <= sy <= height - h] or [(x, max(0, min(int(y0), height - h)))]
        best = min(spots, key=lambda s: sum(_overlap((s[0], s[1], s[0] + w, s[1] + h), p) for p in placed))
        placed.append((best[0], best[1], best[0] + w, best[1] + h))
        corners.append(best)
    return corners


def detection_image(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[str],
    classes: Sequence[int],
    palette: np.ndarray,
    masks: np.ndarray | None = None,
    alpha: float = 0.45,
    min_size: int = MIN_DRAWING_SIDE,
) -> "Image.Image":
    """An image with its detections drawn legibly: enlarged to ``min_size`` when small, masks blended,
    boxes and ``labels`` (e.g. ``"circle 0.93"``) in a size that follows the picture, labels placed so
    that they do not cover each other where there is room (:func:`place_labels`).

    Args:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) boxes x0, y0, x1, y1 in pixels of ``image``, most confident first.
        labels: N texts.
        classes: N class indices (colour from ``palette``).
        palette: (K, 3) uint8 colour per class index.
        masks: (N, H, W) bool masks, or None.
        alpha: weight of the mask colours.
        min_size: small images are enlarged (whole pixels) until their longer side reaches this.
    """
    from PIL import Image, ImageDraw

    rgb = image.astype(np.float32)
    if masks is not None:
        for m, c in zip(masks, classes):
            rgb[m] = rgb[m] * (1 - alpha) + palette[c % len(palette)].astype(np.float32) * alpha
    big, k = enlarge(rgb.round().astype(np.uint8), min_size)
    canvas = Image.fromarray(big)
    draw = ImageDraw.Draw(canvas)
    height, width = big.shape[:2]
    side = max(height, width)
    line = max(2, round(side / 256))
    text_font = font(max(14, round(side / 32)))  # 16 px on a 512 px picture
    pad = max(1, line // 2)
    sizes = []
    for text in labels:
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=text_font)
        sizes.append((int(x1 - x0) + 2 * pad, int(y1 - y0) + 2 * pad))
    scaled = [[float(v) * k for v in b] for b in boxes]
    for b, c in zip(scaled, classes):
        draw.rectangle(b, outline=tuple(int(v) for v in palette[c % len(palette)]), width=line)
    for (x, y), (w, h), text, c in zip(place_labels(scaled, sizes, width, height), sizes, labels, classes):
        fill = tuple(int(v) for v in palette[c % len(palette)])
        draw.rectangle([x, y, x + w, y + h], fill=fill)
        left, top, _, _ = draw.textbbox((0, 0), text, font=text_font)
        draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(fill), font=text_font)
    return canvas
