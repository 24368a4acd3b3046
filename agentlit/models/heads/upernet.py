"""UperNet (Xiao et al., "Unified Perceptual Parsing", 2018) as in mmseg's ``UPerHead``: a pyramid
pooling module (PSPNet) on the coarsest level, FPN-style top-down fusion, all levels upsampled to
the finest one, concatenated and fused — the head of the paper's Agent-Swin ADE20K results
(docs/reference.md §3). :class:`FCNHead` is the auxiliary head trained next to it (loss weight 0.4)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fpn import ConvNormAct

__all__ = ["PyramidPooling", "UperNetHead", "FCNHead"]


class PyramidPooling(nn.Module):
    """PPM: x (B, C, H, W) → cat[x, up(conv1×1(avgpool_s(x))) for s in scales] → 3×3 conv → (B, channels, H, W)."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1)) for s in pool_scales
        )
        self.bottleneck = ConvNormAct(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """forward([x_i (B, C_i, H_i, W_i)], fine → coarse) → logits (B, num_classes, H_0, W_0).

    Args:
        in_channels: channels of each level, fine → coarse.
        num_classes: output classes.
        channels: width of every fused map (mmseg/Swin: 512).
        pool_scales: PPM bins on the coarsest level.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats[:-1])]
        laterals.append(self.ppm(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        fused = self.fpn_bottleneck(torch.cat(outs, dim=1))  # (B, channels, H_0, W_0)
        return self.cls(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: x (B, C, H, W) → 3×3 conv-BN-ReLU → dropout → 1×1 → (B, num_classes, H, W)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvNormAct(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.dropout(self.conv(x)))
