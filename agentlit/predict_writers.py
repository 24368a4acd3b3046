"""Prediction files a person can open: ``predictions.csv`` for classifiers, overlay PNGs for
segmentation.

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
    "ClassificationPredictions", "format_prediction_table", "output_folder", "overlay_image", "save_overlay",
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
        self.rows = []
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
        print(f"predictions for {len(table)} images written to {path}", flush=True)
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
    min_size: int = 192,
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
    from PIL import Image, ImageDraw, ImageFont

    scale = max(1, min_size // max(pred.shape))
    if scale > 1:  # a 64 px prediction is too small to read next to the legend's text
        image = image.repeat(scale, 0).repeat(scale, 1)
        pred = pred.repeat(scale, 0).repeat(scale, 1)
    h, w = pred.shape
    colours = palette[np.clip(pred, 0, len(palette) - 1)]  # (H, W, 3)
    blend = (image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
    present = [int(c) for c in np.unique(pred)]
    names = list(class_names) if class_names else []
    font = ImageFont.load_default()
    row_h, swatch, pad = 14, 10, 4
    labels = [names[c] if c < len(names) else str(c) for c in present]
    legend_w = pad * 3 + swatch + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in labels)
    height = max(h, pad * 2 + row_h * len(present))
    canvas = Image.new("RGB", (2 * w + legend_w, height), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(Image.fromarray(blend), (w, 0))
    draw = ImageDraw.Draw(canvas)
    for r, (c, text) in enumerate(zip(present, labels)):
        y = pad + r * row_h
        x = 2 * w + pad
        draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(v) for v in palette[c]), outline=(0, 0, 0))
        draw.text((x + swatch + pad, y - 1), text, fill=(0, 0, 0), font=font)
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
