"""A generated instance-segmentation set: textured shapes that occlude each other, each one an
object instance with its visible mask, the box around that mask and a COCO-style ``area``.

It reuses the renderer of the semantic shapes set (:mod:`agentlit.data.shapes`), so textures and
geometry are the same; here every shape is kept as its own instance. A later shape hides what it
covers, so an instance's mask is what stays *visible*; instances hidden below ``min_visible`` of
their full area are dropped (the pixels stay in the image as clutter). Every sample is a pure
function of (seed, index), so nothing has to be stored. :func:`export_coco` writes a split as a
COCO 2017 folder (``annotations/instances_<split>.json`` + ``<split>/*.png``), so the COCO reading
path can be exercised offline.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .shapes import SHAPE_CLASSES, paint_shapes

__all__ = ["INSTANCE_CLASSES", "InstanceShapesDataset", "export_coco", "render_instances"]

#: object classes of the generated set (no background entry: detection labels count objects only)
INSTANCE_CLASSES = SHAPE_CLASSES[1:]


def render_instances(
    index: int,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = INSTANCE_CLASSES,
    num_shapes: tuple[int, int] = (1, 4),
    radius: tuple[float, float] = (0.1, 0.25),
    noise: float = 0.03,
    shape_contrast: float = 1.0,
    background_contrast: float = 1.0,
    hue_jitter: float = 0.5,
    min_visible: float = 0.5,
) -> dict[str, np.ndarray]:
    """Sample ``index`` of the set ``seed``.

    Args:
        index: sample index (any int; the sample is a pure function of (seed, index)).
        size: image side in pixels.
        seed: the set's seed.
        classes: shape classes drawn, a subset of :data:`INSTANCE_CLASSES` (label k = classes[k-1]).
        num_shapes: inclusive range of shapes per image.
        radius: shape radius range as a fraction of ``size``.
        noise: std of the additive Gaussian pixel noise.
        shape_contrast: texture contrast inside shapes.
        background_contrast: texture contrast of the background.
        hue_jitter: class k's hue band half-width (0.5: colour carries no class information).
        min_visible: keep an instance only if at least this fraction of its full mask is visible.

    Returns:
        ``image`` uint8 (size, size, 3), ``masks`` bool (N, size, size) (visible parts),
        ``labels`` int64 (N,) in 1..len(classes), ``boxes`` float32 (N, 4) xyxy in pixels
        (tight around the visible mask), ``area`` float32 (N,) (visible pixels).
    """
    unknown = [c for c in classes if c not in INSTANCE_CLASSES]
    if unknown or not classes:
        raise ValueError(f"classes={list(classes)}: unknown {unknown}; choose a non-empty subset of {list(INSTANCE_CLASSES)}")
    rng = np.random.default_rng([seed, index, 7])
    labels: list[int] = []

    def draw_class() -> tuple[int, float]:
        labels.append(int(rng.integers(1, len(classes) + 1)))
        shape_id = INSTANCE_CLASSES.index(classes[labels[-1] - 1]) + 1  # the renderer's class index
        return shape_id, (shape_id - 1) / len(INSTANCE_CLASSES)

    image, full, _ = paint_shapes(rng, size, num_shapes, draw_class, radius, (0.15, 0.85), shape_contrast,
                                  background_contrast, hue_jitter)
    image = np.clip(image + rng.normal(0, noise, image.shape), 0, 1)
    masks, keep = [], []
    covered = np.zeros((size, size), dtype=bool)
    for i in range(len(full) - 1, -1, -1):  # topmost first: what is above hides what is below
        visible = full[i] & ~covered
        covered |= full[i]
        if full[i].sum() > 0 and visible.sum() >= max(min_visible * full[i].sum(), 4):
            masks.append(visible)
            keep.append(i)
    masks, keep = masks[::-1], keep[::-1]
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for j, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # pixel edges: a 1-px object has width 1
    return {
        "image": (image * 255 + 0.5).astype(np.uint8),
        "masks": np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool),
        "labels": np.array([labels[i] for i in keep], dtype=np.int64),
        "boxes": boxes,
        "area": np.array([m.sum() for m in masks], dtype=np.float32),
    }


class InstanceShapesDataset(Dataset):
    """``length`` generated samples, indices ``offset .. offset+length-1`` of the stream ``seed``,
    rendered once and cached. Items are detection samples (see :mod:`agentlit.data.coco`):
    ``{"image": tv Image uint8, "boxes": tv BoundingBoxes, "masks": tv Mask, "labels", "iscrowd",
    "area", "image_id", "name"}``.

    Args:
        length: number of samples.
        img_size: image side.
        seed: the set's seed.
        offset: first index of the stream.
        split: name used in the samples' ``name``.
        **render_kwargs: :func:`render_instances` arguments (classes, num_shapes, radius, …).
    """

    def __init__(self, length: int, img_size: int = 128, seed: int = 0, offset: int = 0, split: str = "train",
                 **render_kwargs: Any) -> None:
        self.length, self.img_size, self.seed, self.offset, self.split = length, img_size, seed, offset, split
        self.render_kwargs = render_kwargs
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def render(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._cache:
            self._cache[i] = render_instances(self.offset + i, self.img_size, self.seed, **self.render_kwargs)
        return self._cache[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.render(i)
        size = (self.img_size, self.img_size)
        return {
            "image": tv_tensors.Image(torch.from_numpy(s["image"]).permute(2, 0, 1).contiguous()),
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(s["boxes"]), format="XYXY", canvas_size=size),
            "masks": tv_tensors.Mask(torch.from_numpy(s["masks"]).to(torch.uint8)),
            "labels": torch.from_numpy(s["labels"]),
            "iscrowd": torch.zeros(len(s["labels"]), dtype=torch.int64),
            "area": torch.from_numpy(s["area"]),
            "image_id": i,
            "name": f"instances_{self.split}_{i:05d}",
        }


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def export_coco(
    root: str | Path,
    splits: dict[str, int] | None = None,
    img_size: int = 128,
    seed: int = 0,
    category_ids: Sequence[int] | None = None,
    **render_kwargs: Any,
) -> Path:
    """Write generated splits as a COCO 2017 folder: ``root/<split>/<id>.png`` and
    ``root/annotations/instances_<split>.json`` (masks as compressed RLE, boxes ``[x, y, w, h]``).

    Args:
        root: output folder (created).
        splits: samples per split name, default ``{"train2017": 64, "val2017": 16}``; split k draws
            stream indices from k·1,000,000 so splits never share samples.
        img_size: image side.
        seed: the set's seed.
        category_ids: the COCO id of each class, in class order (default 1..K); non-contiguous ids
            such as [3, 7, 11] mimic COCO's own numbering.
        **render_kwargs: :func:`render_instances` arguments (classes, num_shapes, radius, …).

    Returns:
        ``root``.
    """
    root = Path(root)
    splits = splits or {"train2017": 64, "val2017": 16}
    classes = list(render_kwargs.get("classes", INSTANCE_CLASSES))
    ids = list(category_ids) if category_ids is not None else list(range(1, len(classes) + 1))
    if len(ids) != len(classes) or len(set(ids)) != len(ids):
        raise ValueError(f"category_ids={ids} must be {len(classes)} distinct ids, one per class {classes}")
    categories = [{"id": int(c), "name": n, "supercategory": "shape"} for c, n in zip(ids, classes)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for k, (split, n) in enumerate(splits.items()):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            s = render_instances(k * 1_000_000 + i, img_size, seed, **render_kwargs)
            image_id = i + 1
            file_name = f"{image_id:012d}.png"
            Image.fromarray(s["image"]).save(root / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "height": img_size, "width": img_size})
            for box, label, mask, area in zip(s["boxes"], s["labels"], s["masks"], s["area"]):
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": ids[int(label) - 1], "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(area), "segmentation": _rle(mask),
                })
                ann_id += 1
        data = {"info": {"description": "agentlit generated instance shapes"}, "images": images,
                "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root
