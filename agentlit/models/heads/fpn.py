"""Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", 2019), as in mmseg's
``FPN`` neck + ``FPNHead`` — the head of the paper's Agent-PVT ADE20K results (docs/reference.md §3)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvNormAct", "FPN", "SemanticFPNHead"]


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) → BatchNorm → ReLU: mmseg's ``ConvModule`` with its default norm/act."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class FPN(nn.Module):
    """Feature Pyramid Network neck (Lin et al., 2017): 1×1 laterals, top-down sum, 3×3 smoothing.

    forward([x_i (B, C_i, H_i, W_i)], fine → coarse) → [y_i (B, out_channels, H_i, W_i)].
    Top-down upsampling targets the finer map's exact size, so odd sizes and equal strides work.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):  # coarse → fine
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


class SemanticFPNHead(nn.Module):
    """FPN neck + semantic branch: each level goes through 3×3 conv-BN-ReLU (+ 2× upsampling)
    blocks until it reaches the finest stride, the levels are summed, then dropout + 1×1 classifier.

    forward([x_i]) → logits (B, num_classes, H_0, W_0) at the finest input's resolution.

    Args:
        in_channels: channels of each input level, fine → coarse.
        strides: each level's stride (reduction); a level at stride s gets log2(s / s_0) upsampling
            blocks (at least one conv block).
        num_classes: output classes.
        neck_channels: FPN width (mmseg: 256). channels: semantic-branch width (mmseg: 128).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        neck_channels: int = 256,
        channels: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"SemanticFPNHead: {len(in_channels)} in_channels but {len(strides)} strides")
        self.neck = FPN(in_channels, neck_channels)
        self.scale_heads = nn.ModuleList()
        for s in strides:
            n_up = max(int(round(math.log2(s / strides[0]))), 0)
            blocks: list[nn.Module] = []
            for k in range(max(n_up, 1)):
                blocks.append(ConvNormAct(neck_channels if k == 0 else channels, channels))
                if n_up:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        levels = self.neck(feats)
        out = self.scale_heads[0](levels[0])  # (B, channels, H_0, W_0)
        for head, x in zip(self.scale_heads[1:], levels[1:]):
            y = head(x)
            if y.shape[-2:] != out.shape[-2:]:  # odd input sizes: 2^k upsampling over/undershoots by a pixel
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        return self.cls(self.dropout(out))

