"""Joint image/mask transforms for semantic segmentation (the mmseg ADE20K pipeline).

A sample is a dict: ``image`` float (3, H, W) in [0, 255], ``mask`` int64 (H, W) with the ignore
index on unlabeled pixels, plus pass-through keys (``name``, ``orig_size``). Geometric transforms
move image and mask together (bilinear for the image, nearest for the mask); padding fills the
mask with the ignore index so padded pixels never reach the loss or the metric.
Randomness comes from torch's global generator (seeded per worker by Lightning).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Compose",
    "Resize",
    "RandomResize",
    "RandomCrop",
    "RandomFlip",
    "PhotoMetricDistortion",
    "Normalize",
    "Pad",
    "build_train_transform",
    "build_eval_transform",
    "IMAGENET_MEAN_255",
    "IMAGENET_STD_255",
]

Sample = dict[str, Any]
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def _resize(sample: Sample, size: tuple[int, int], resize_mask: bool = True) -> Sample:
    img = sample["image"]
    if tuple(img.shape[-2:]) == tuple(size):
        return sample
    sample["image"] = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    if resize_mask and "mask" in sample:
        sample["mask"] = F.interpolate(sample["mask"][None, None].float(), size=size, mode="nearest")[0, 0].long()
    return sample


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest (h', w') with long side ≤ max(scale) and short side ≤ min(scale)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample


class Resize:
    """Keep-ratio resize into ``scale`` (e.g. (2048, 512): short side 512, long ≤ 2048).
    ``resize_mask=False`` for evaluation: the prediction is resized back to the original mask."""

    def __init__(self, scale: tuple[int, int], resize_mask: bool = True) -> None:
        self.scale, self.resize_mask = tuple(scale), resize_mask

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[-2:]
        return _resize(sample, rescale_size(h, w, self.scale), self.resize_mask)


class RandomResize:
    """Keep-ratio resize into ``scale`` × r, r ~ U(ratio_range) (mmseg: img_scale, ratio_range=(0.5, 2.0))."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0)) -> None:
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def __call__(self, sample: Sample) -> Sample:
        r = _uniform(*self.ratio_range)
        h, w = sample["image"].shape[-2:]
        return _resize(sample, rescale_size(h, w, (int(self.scale[0] * r), int(self.scale[1] * r))))


class RandomCrop:
    """Random (crop × crop) window; retries up to 10 times for a crop where no single class covers
    more than ``cat_max_ratio`` of the labeled pixels (mmseg's cat_max_ratio=0.75)."""

    def __init__(self, size: int | tuple[int, int], cat_max_ratio: float = 1.0, ignore_index: int = 255) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.cat_max_ratio, self.ignore_index = cat_max_ratio, ignore_index

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        y = int(torch.randint(0, h - ch + 1, ()).item())
        x = int(torch.randint(0, w - cw + 1, ()).item())
        return y, y + ch, x, x + cw

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[-2:]
        box = self._window(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                m = sample["mask"][box[0]: box[1], box[2]: box[3]]
                _, counts = torch.unique(m[m != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                box = self._window(h, w)
        y0, y1, x0, x1 = box
        sample["image"] = sample["image"][:, y0:y1, x0:x1]
        sample["mask"] = sample["mask"][y0:y1, x0:x1]
        return sample


class RandomFlip:
    """Horizontal flip with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()).item() < self.p:
            sample["image"] = sample["image"].flip(-1)
            sample["mask"] = sample["mask"].flip(-1)
        return sample


class PhotoMetricDistortion:
    """mmseg's photometric distortion, each step with probability ½: additive brightness
    (±32), contrast ×U(0.5, 1.5) (before or after the colour steps), saturation ×U(0.5, 1.5),
    hue shift ±18° of 180 (OpenCV's hue scale, i.e. ±36° of the colour circle). Image only.

    Saturation blends with the luma image and hue rotates the chroma plane of YIQ: both are
    3×3 linear maps (cheap enough for CPU data loading) that match the HSV operations closely.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: float = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = contrast_range, saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.rand(()).item() < 0.5)

    def _contrast(self, img: Tensor) -> Tensor:
        return (img * _uniform(*self.contrast_range)).clamp(0, 255) if self._coin() else img

    def __call__(self, sample: Sample) -> Sample:
        img = sample["image"]
        if self._coin():
            img = (img + _uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 255)
        contrast_first = self._coin()
        if contrast_first:
            img = self._contrast(img)
        colour = torch.eye(3)
        if self._coin():
            colour = saturation_matrix(_uniform(*self.saturation_range)) @ colour
        if self._coin():
            colour = hue_matrix(_uniform(-self.hue_delta, self.hue_delta) * 2.0) @ colour
        if not torch.equal(colour, torch.eye(3)):
            img = torch.einsum("ij,jhw->ihw", colour, img).clamp(0, 255)
        if not contrast_first:
            img = self._contrast(img)
        sample["image"] = img
        return sample


_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def saturation_matrix(factor: float) -> Tensor:
    """RGB → RGB map blending each pixel with its luma: factor·x + (1 − factor)·Y."""
    return factor * torch.eye(3) + (1 - factor) * _LUMA.expand(3, 3)


def hue_matrix(degrees: float) -> Tensor:
    """RGB → RGB hue rotation by ``degrees``: rotate the (I, Q) chroma plane of YIQ."""
    a = math.radians(degrees)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])
    return torch.linalg.inv(_RGB2YIQ) @ rot @ _RGB2YIQ


class Normalize:
    """(image − mean) / std, per channel, on the 0–255 scale."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN_255, std: Sequence[float] = IMAGENET_STD_255) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: Sample) -> Sample:
        sample["image"] = (sample["image"] - self.mean) / self.std
        return sample


class Pad:
    """Pad bottom/right to at least ``size``: image with 0 (after normalisation: the mean), mask with the ignore index."""

    def __init__(self, size: int | tuple[int, int], ignore_index: int = 255) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.ignore_index = ignore_index

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[-2:]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            sample["image"] = F.pad(sample["image"], (0, pw, 0, ph), value=0.0)
            sample["mask"] = F.pad(sample["mask"], (0, pw, 0, ph), value=self.ignore_index)
        return sample


def build_train_transform(
    crop_size: int | tuple[int, int],
    scale: tuple[int, int] | None,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_MEAN_255,
    std: Sequence[float] = IMAGENET_STD_255,
) -> Compose:
    """mmseg's ADE20K train pipeline: random resize → random crop (cat_max_ratio) → flip →
    photometric distortion → normalise → pad to the crop with the ignore index. ``scale=None``
    resizes relative to each image's own size (× U(ratio_range))."""
    steps: list[Callable[[Sample], Sample]] = []
    if scale is not None:
        steps.append(RandomResize(scale, ratio_range))
    elif tuple(ratio_range) != (1.0, 1.0):
        steps.append(_RelativeRandomResize(ratio_range))
    steps += [RandomCrop(crop_size, cat_max_ratio, ignore_index), RandomFlip(flip_prob)]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Normalize(mean, std), Pad(crop_size, ignore_index)]
    return Compose(steps)


def build_eval_transform(
    scale: tuple[int, int] | None,
    mean: Sequence[float] = IMAGENET_MEAN_255,
    std: Sequence[float] = IMAGENET_STD_255,
) -> Compose:
    """Evaluation: keep-ratio resize of the image only (the mask stays at its original size; the
    prediction is resized back to it), then normalise."""
    steps: list[Callable[[Sample], Sample]] = []
    if scale is not None:
        steps.append(Resize(scale, resize_mask=False))
    steps.append(Normalize(mean, std))
    return Compose(steps)


class _RelativeRandomResize:
    """Resize by r ~ U(ratio_range) relative to the image's own size."""

    def __init__(self, ratio_range: tuple[float, float]) -> None:
        self.ratio_range = tuple(ratio_range)

    def __call__(self, sample: Sample) -> Sample:
        r = _uniform(*self.ratio_range)
        h, w = sample["image"].shape[-2:]
        return _resize(sample, (max(int(math.floor(h * r + 0.5)), 1), max(int(math.floor(w * r + 0.5)), 1)))
