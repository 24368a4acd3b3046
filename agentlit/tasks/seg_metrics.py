"""Dataset-level segmentation metrics: mIoU, per-class IoU, pixel accuracy (the mmseg convention).

Intersections and unions are summed over the whole evaluation set in a confusion matrix, then
IoU_c = I_c / U_c and mIoU is the mean over the classes whose union is non-empty (a class that is
neither in the ground truth nor predicted is skipped, one predicted but absent scores 0). This is
*not* torchmetrics' ``segmentation.MeanIoU``, which averages per image.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassJaccardIndex

__all__ = ["SegmentationMetrics", "format_iou_table"]


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
