"""A 4-level pyramid from single-stride features (plain ViT / Agent-DeiT), as in ViTDet's simple
feature pyramid and BEiT's segmentation adapter: ×4 (two 2×2 transposed convs), ×2 (one), ×1, ×½
(2×2 max-pool)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["SimplePyramid"]


class SimplePyramid(nn.Module):
    """[x_i (B, C, h, w)] (k maps at one stride s) → 4 maps (B, C, ·) at strides s/4, s/2, s, 2s.

    With 4 inputs (features of 4 depths, the BEiT/mmseg recipe) input i feeds level i; with any
    other count the last (deepest) map feeds all 4 levels (ViTDet).
    """

    scales = (4.0, 2.0, 1.0, 0.5)

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.levels = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(c, c, 2, stride=2), nn.BatchNorm2d(c), nn.GELU(), nn.ConvTranspose2d(c, c, 2, stride=2)
                ),
                nn.ConvTranspose2d(c, c, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        )

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        inputs = list(feats) if len(feats) == 4 else [feats[-1]] * 4
        return [level(x) for level, x in zip(self.levels, inputs)]

    @staticmethod
    def strides(stride: int) -> list[int]:
        """Output strides for input stride ``stride`` (e.g. 16 → [4, 8, 16, 32])."""
        return [max(int(stride / s), 1) for s in SimplePyramid.scales]
