"""torchvision detectors (Mask R-CNN, Faster R-CNN, RetinaNet) over any timm ``features_only``
backbone, set to the paper's mmdet COCO configs where torchvision defaults differently.

:class:`DetectionBackbone` is the small adapter torchvision needs: the feature extractor, an
optional LayerNorm per output stage (official Swin detection code), an FPN over the chosen stages
and the extra levels (a max-pooled P6 for the R-CNNs; P6/P7 by stride-2 convs from C5 for
RetinaNet, mmdet's ``add_extra_convs='on_input'``), and ``out_channels``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ["DETECTORS", "DetectionBackbone", "SeededSampler", "build_detector", "default_out_indices", "seeded_samplers"]

DETECTORS = ("mask_rcnn", "faster_rcnn", "retinanet")


def default_out_indices(detector: str, num_stages: int = 4) -> tuple[int, ...]:
    """Stages the FPN reads: all four for the R-CNNs (P2–P5 + pooled P6, strides 4–64), the last
    three for RetinaNet (P3–P5 + P6/P7, strides 8–128), as the paper's mmdet configs.

    Args:
        detector: one of :data:`DETECTORS`.
        num_stages: stages of the backbone.
    """
    return tuple(range(num_stages)) if detector != "retinanet" else tuple(range(max(0, num_stages - 3), num_stages))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DetectionBackbone(nn.Module):
    """timm feature extractor → (LayerNorm per output) → FPN (+ extra levels).

    forward(x (B, 3, H, W)) → OrderedDict of (B, out_channels, H/s, W/s) maps, finest first:
    keys "0".."3" + "pool" (R-CNNs) or "0".."2" + "p6", "p7" (RetinaNet).

    Args:
        body: a ``features_only`` model (``feature_info`` gives channels and strides).
        out_channels: FPN width.
        extra: ``pool`` (max-pooled P6 from P5, the R-CNNs), ``p6p7`` (two stride-2 convs from C5,
            RetinaNet) or ``none``.
        out_norm: a LayerNorm on every backbone output (official Swin detection backbones).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra: Literal["pool", "p6p7", "none"] = "pool",
                 out_norm: bool = False) -> None:
        super().__init__()
        self.body = body
        channels = list(body.feature_info.channels())
        self.strides = list(body.feature_info.reduction())
        self.norms = nn.ModuleList(LayerNorm2d(c) for c in channels) if out_norm else None
        if extra == "pool":
            blocks: nn.Module | None = LastLevelMaxPool()
        elif extra == "p6p7":
            blocks = LastLevelP6P7(channels[-1], out_channels)
            blocks.use_P5 = False  # from C5 whatever its width (torchvision picks P5 when widths match)
        elif extra == "none":
            blocks = None
        else:
            raise ValueError(f"extra={extra!r} is not one of 'pool' (R-CNN), 'p6p7' (RetinaNet), 'none'")
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=blocks)
        self.out_channels = out_channels
        self.in_channels = channels

    def features(self, x: Tensor) -> list[Tensor]:
        """The backbone's maps (B, C_i, H/s_i, W/s_i), normalised when ``out_norm``."""
        feats = []
        for i, (f, c) in enumerate(zip(self.body(x), self.in_channels)):
            if f.ndim == 4 and f.shape[1] != c and f.shape[-1] == c:  # NHWC maps (some timm models)
                f = f.permute(0, 3, 1, 2)
            f = f.contiguous()
            feats.append(self.norms[i](f) if self.norms is not None else f)
        return feats

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.features(x))))


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's positive / negative sampler of the RPN and the RoI heads (per image: up to
    ``positive_fraction`` of ``batch_size_per_image`` positives, negatives for the rest), with image
    i's picks drawn from a CPU generator seeded with ``seeds[i]`` when the caller sets ``seeds``
    before a training forward: an image then draws the same whichever images share its batch or
    process, and on any device. ``seeds`` None: torchvision's draws from the global RNG.

    Args:
        batch_size_per_image: anchors / proposals sampled per image.
        positive_fraction: the largest share of positives among them.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        super().__init__(batch_size_per_image, positive_fraction)
        self.seeds: list[int] | None = None

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """matched_idxs: per image (A_i,) labels (≥ 1 positive, 0 negative, < 0 ignored) →
        (positive masks, negative masks), per image (A_i,) uint8."""
        if self.seeds is None:
            return super().__call__(matched_idxs)
        if len(self.seeds) != len(matched_idxs):
            raise ValueError(f"{len(self.seeds)} sampling seeds for {len(matched_idxs)} images")
        pos_masks, neg_masks = [], []
        for seed, matched in zip(self.seeds, matched_idxs):
            g = torch.Generator().manual_seed(seed)
            positive, negative = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            masks = []
            for idx, num in ((positive, num_pos), (negative, num_neg)):
                mask = torch.zeros_like(matched, dtype=torch.uint8)
                mask[idx[torch.randperm(idx.numel(), generator=g)[:num].to(idx.device)]] = 1
                masks.append(mask)
            pos_masks.append(masks[0])
            neg_masks.append(masks[1])
        return pos_masks, neg_masks


def seeded_samplers(model: nn.Module) -> list[SeededSampler]:
    """The samplers of a :func:`build_detector` model, RPN first, then the RoI heads (RetinaNet: none).

    Args:
        model: a detector from :func:`build_detector`.
    """
    owners = (getattr(model, "rpn", None), getattr(model, "roi_heads", None))
    return [o.fg_bg_sampler for o in owners if isinstance(getattr(o, "fg_bg_sampler", None), SeededSampler)]


def _anchors(sizes: Sequence[int], detector: str) -> AnchorGenerator:
    ratios = (0.5, 1.0, 2.0)
    if detector == "retinanet":  # octave base scale 4 × 3 scales per octave: (s, s·2^(1/3), s·2^(2/3))
        per_level = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
    else:
        per_level = tuple((s,) for s in sizes)
    return AnchorGenerator(per_level, (ratios,) * len(per_level))


def build_detector(
    detector: Literal["mask_rcnn", "faster_rcnn", "retinanet"],
    backbone: DetectionBackbone,
    num_classes: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    size_divisible: int = 32,
    anchor_sizes: Sequence[int] | None = None,
    representation_size: int = 1024,
    mask_head_channels: int = 256,
    roi_sampling_ratio: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """A torchvision detector over ``backbone`` with the paper's mmdet settings.

    Args:
        detector: ``mask_rcnn``, ``faster_rcnn`` or ``retinanet``.
        backbone: the adapter (its number of output levels must match the anchor sizes).
        num_classes: object classes, background not counted (torchvision's heads get K + 1).
        image_mean: per-channel mean of [0, 1] images (the backbone's ``pretrained_cfg``).
        image_std: per-channel std.
        min_size: short side images are resized to; a list draws one per training step (multi-scale).
        max_size: cap of the long side.
        size_divisible: batched images are padded to a multiple of this.
        anchor_sizes: base anchor size per FPN level (None: 32, 64, 128, 256, 512, mmdet's scale 8 ×
            strides 4–64 for the R-CNNs and octave base 4 × strides 8–128 for RetinaNet).
        representation_size: width of the box head's two FC layers (R-CNNs).
        mask_head_channels: width of the mask head's four convs (Mask R-CNN).
        roi_sampling_ratio: RoIAlign sampling points per bin side (0: adaptive, mmdet's setting;
            torchvision's default is 2).
        **kwargs: further torchvision constructor arguments (``rpn_post_nms_top_n_train`` …),
            overriding the paper's values set here.
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector={detector!r} is not one of {list(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must count at least one object class (background is added inside)")
    levels = len(backbone.in_channels) + (2 if detector == "retinanet" else 1)
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else (32, 64, 128, 256, 512)
    if len(sizes) != levels:
        raise ValueError(
            f"anchor_sizes has {len(sizes)} entries but the FPN gives {levels} levels "
            f"({len(backbone.in_channels)} stages + {levels - len(backbone.in_channels)} extra); give one size per level"
        )
    min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else int(min_size)
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
                  size_divisible=size_divisible)
    if detector == "retinanet":
        # mmdet RetinaNet test cfg: 1000 candidates per level, score 0.05, NMS 0.5, 100 per image.
        args: dict[str, Any] = dict(topk_candidates=1000, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
        return RetinaNet(backbone, num_classes + 1, anchor_generator=_anchors(sizes, detector), **common, **{**args, **kwargs})
    # mmdet R-CNN: RPN 2000 pre-NMS (1000 at test), 1000 post-NMS in training and test; 100 detections.
    args = dict(
        rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000,
        box_detections_per_img=100, box_score_thresh=0.05, box_nms_thresh=0.5,
    )
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, representation_size)
    levels_in = [str(i) for i in range(len(backbone.in_channels))]  # RoIs pool from P2-P5, not the extra level
    common.update(box_roi_pool=MultiScaleRoIAlign(levels_in, 7, roi_sampling_ratio))
    if detector == "mask_rcnn":
        common.update(mask_roi_pool=MultiScaleRoIAlign(levels_in, 14, roi_sampling_ratio))
    common.update(rpn_anchor_generator=_anchors(sizes, detector), box_head=box_head,
                  box_predictor=FastRCNNPredictor(representation_size, num_classes + 1))
    if detector == "faster_rcnn":
        model = FasterRCNN(backbone, None, **common, **{**args, **kwargs})
    else:
        mask_head = MaskRCNNHeads(backbone.out_channels, (mask_head_channels,) * 4, 1)
        model = MaskRCNN(backbone, None, mask_head=mask_head,
                         mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1),
                         **common, **{**args, **kwargs})
    for owner in (model.rpn, model.roi_heads):  # same sampling rule, drawn per image when seeded
        owner.fg_bg_sampler = SeededSampler(owner.fg_bg_sampler.batch_size_per_image, owner.fg_bg_sampler.positive_fraction)
    return model
