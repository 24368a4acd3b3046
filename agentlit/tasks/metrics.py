"""The metrics of agentlit's tasks, in one place.

Segmentation: dataset-level mIoU, per-class IoU, pixel accuracy (the mmseg convention).
Intersections and unions are summed over the whole evaluation set in a confusion matrix, then
IoU_c = I_c / U_c and mIoU is the mean over the classes whose union is non-empty (a class that is
neither in the ground truth nor predicted is skipped, one predicted but absent scores 0). This is
*not* torchmetrics' ``segmentation.MeanIoU``, which averages per image.

Image generation: FID (torchmetrics' ``FrechetInceptionDistance`` with Inception features, or the
local fixed :class:`RandomConvFeatures` where Inception weights are unavailable) and, for digits,
conditional accuracy by an RBF SVM fit on scikit-learn's 8×8 digits, a classifier that no model
trained here has seen (:func:`classify_digits`, :func:`score_generation`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassJaccardIndex

__all__ = [
    "RandomConvFeatures", "SegmentationMetrics", "classify_digits", "digits_classifier", "fid_metric", "format_iou_table",
    "score_generation", "to_uint8",
]


# ---------------------------------------------------------------------------------- segmentation
class SegmentationMetrics(MulticlassJaccardIndex):
    """Confusion-matrix accumulator; ``compute()`` returns a dict of tensors.

    update(preds (B, H, W) int class ids — or logits (B, C, H, W) —, target (B, H, W) int with
    ``ignore_index`` where unlabeled). Keys of the result: ``iou`` (C,) with NaN for classes with
    empty union, ``acc`` (C,) per-class pixel recall (NaN when absent), ``mIoU``, ``mAcc``, ``aAcc``
    (overall pixel accuracy over labeled pixels).
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        # validate_args=False: labels are checked where they are read (with the file name).
        super().__init__(num_classes=num_classes, average="none", ignore_index=ignore_index, validate_args=False)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        conf = self.confmat.double()  # rows: target, cols: prediction (summed over devices)
        inter = conf.diag()
        label_area = conf.sum(1)
        union = label_area + conf.sum(0) - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        acc = torch.where(label_area > 0, inter / label_area.clamp(min=1), torch.full_like(inter, float("nan")))
        total = label_area.sum()
        return {
            "iou": iou.float(),
            "acc": acc.float(),
            "mIoU": iou.nanmean().float() if (union > 0).any() else torch.tensor(float("nan")),
            "mAcc": acc.nanmean().float() if (label_area > 0).any() else torch.tensor(float("nan")),
            "aAcc": (inter.sum() / total).float() if total > 0 else torch.tensor(float("nan")),
        }


def format_iou_table(iou: Tensor, acc: Tensor, class_names: Sequence[str] | None = None, title: str = "") -> str:
    """Plain aligned per-class table (class, IoU %, Acc %); absent classes show as ``-``."""
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    width = max([5] + [len(n) for n in names])
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    lines.append("-" * (width + 16))

    def pct(v: float) -> str:
        return "     -" if v != v else f"{100 * v:6.2f}"  # v != v: NaN

    for name, i, a in zip(names, iou.tolist(), acc.tolist()):
        lines.append(f"{name:<{width}}  {pct(i)}  {pct(a)}")
    lines.append("-" * (width + 16))
    lines.append(f"{'mean':<{width}}  {pct(float(iou.nanmean()))}  {pct(float(acc.nanmean()))}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- generation: FID
class RandomConvFeatures(nn.Module):
    """A small fixed random-conv feature extractor for FID where Inception weights are unavailable.

    Takes uint8 images (B, 3, H, W) as torchmetrics passes them and returns (B, num_features). Its
    distances are only comparable with each other, never with published (Inception) FID numbers.
    """

    def __init__(self, num_features: int = 64, size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.num_features, self.size = num_features, size
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 32, 4, stride=2)
        self.conv2 = nn.Conv2d(32, num_features, 4, stride=2)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight[0].numel() ** 0.5)
                conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = F.relu(self.conv1(x * 2 - 1))
        return F.relu(self.conv2(x)).mean((2, 3))  # (B, num_features)


def fid_metric(feature: int | nn.Module | None) -> nn.Module:
    """torchmetrics' FID over uint8 images (B, 3, H, W).

    Args:
        feature: an Inception feature size (64/192/768/2048; needs torch-fidelity and its weights) or a
            feature module; None: :class:`RandomConvFeatures` (local and fixed).

    Raises:
        ModuleNotFoundError: Inception features without torch-fidelity, naming the alternative.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        return FrechetInceptionDistance(feature=RandomConvFeatures() if feature is None else feature, normalize=False)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"FID with Inception features needs torch-fidelity (pip install torch-fidelity) and its weights; or "
            f"set `fid_feature` to a feature module such as agentlit.tasks.RandomConvFeatures ({err})"
        ) from err


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] → uint8 (B, 3, H, W) (grey replicated), as the FID metric takes them."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


# ---------------------------------------------------------------------------------- generation: digits
_SVM: Any = None


def digits_classifier() -> Any:
    """An RBF SVM fit on scikit-learn's 8×8 digits (all 1,797 of them), built once per process.

    Independent of every model trained here: it is the yardstick for conditional accuracy.
    """
    global _SVM
    if _SVM is None:
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        digits = load_digits()
        _SVM = SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)
    return _SVM


def classify_digits(images: Tensor) -> Tensor:
    """Digit classes (B,) the SVM of :func:`digits_classifier` sees in images (B, C, H, W) in [-1, 1]:
    channels averaged to grey, area-downsampled to 8×8 and scaled to 0..16 like the SVM's training data."""
    grey = images.float().mean(1, keepdim=True).clamp(-1, 1) * 0.5 + 0.5  # (B, 1, H, W) in [0, 1]
    small = F.adaptive_avg_pool2d(grey, 8) * 16.0  # (B, 1, 8, 8)
    pred = digits_classifier().predict(small.flatten(1).cpu().double().numpy())
    return torch.as_tensor(pred, dtype=torch.long)


def score_generation(json_path: str | Path) -> dict[str, Any]:
    """Conditional accuracy of a predict run's ``generation.json`` by the digits SVM.

    Args:
        json_path: the ``generation.json`` written by ``agentlit predict`` (entries with ``file`` and ``label``).

    Returns:
        ``{"samples", "classes", "cond_acc", "per_class": {label: accuracy}}``.
    """
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    path = Path(json_path)
    entries = json.loads(path.read_text())
    images = torch.stack([pil_to_tensor(Image.open(path.parent / e["file"]).convert("L")).float() / 127.5 - 1
                          for e in entries])
    labels = torch.tensor([e["label"] for e in entries])
    pred = classify_digits(images)
    per_class = {int(c): (pred[labels == c] == c).float().mean().item() for c in labels.unique()}
    return {"samples": len(entries), "classes": len(per_class), "cond_acc": (pred == labels).float().mean().item(),
            "per_class": per_class}
