"""Semantic segmentation networks: a timm backbone (``features_only=True``) + Semantic FPN or
UperNet (docs/reference.md §3), sliding-window inference and the label palette.

The Lightning task (loss, metrics, optimisation) lives in :mod:`agentlit.tasks.segmentation`;
detection and other dense tasks build on :func:`build_backbone` too.
"""
from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np
import timm
import torch
from timm.models._features import FeatureGetterNet
from torch import Tensor, nn

from ..checkpoint import load_fitting
from ..errors import UserError
from ._helpers import create_model
from .heads import FCNHead, SemanticFPNHead, SimplePyramid, UperNetHead

__all__ = ["SegmentationModel", "build_backbone", "palette", "slide_inference"]

_FEATURE_EXAMPLES = ("resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "vit_small_patch16_224")
# Arguments that only exist for the feature wrapper, not for the plain classifier.
_FEATURE_ONLY_KWARGS = ("out_indices", "feature_cls", "output_stride", "pretrained_cfg_overlay")


def _backbone_names_with_features() -> list[str]:
    return timm.list_models("agent_*") + list(_FEATURE_EXAMPLES)


def build_backbone(
    name: str,
    out_indices: tuple[int, ...] | None = None,
    state_dict: dict[str, Tensor] | None = None,
    pretrained: bool = False,
    grad_checkpointing: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, features_only=True, …)``: a module returning [(B, C_i, H_i, W_i)].

    Args:
        name: a timm model name with a feature-extraction API (``agent_pvt_tiny``, ``resnet50`` …).
        out_indices: which stages/blocks to return (None: the model's default pyramid).
        state_dict: classification weights (official layout or ours), mapped through the family's ``checkpoint_filter_fn``.
        pretrained: load the model's registered pretrained weights (ignored when ``state_dict`` is given).
        grad_checkpointing: recompute the backbone's block activations in backward instead of storing them
            (timm's ``set_grad_checkpointing``): less training memory for one more forward of the blocks.
        **kwargs: model arguments (``img_size``, ``agent_num``, reduced ``depths`` …).

    Returns:
        The feature extractor; ``feature_info`` gives each level's channels and stride.
    """
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    try:
        model = create_model(name, features_only=True, pretrained=pretrained and state_dict is None, **kwargs)
    except ValueError as e:
        if "unknown model name" in str(e):
            raise
        _raise_if_no_features(name, kwargs, e)
        raise
    except (AssertionError, RuntimeError, AttributeError, NotImplementedError, TypeError, KeyError) as e:
        _raise_if_no_features(name, kwargs, e)
        raise
    if not hasattr(model, "feature_info"):
        _raise_if_no_features(name, kwargs, None)
    if state_dict is not None:
        _load_backbone_state(model, name, state_dict, kwargs)
    if grad_checkpointing:
        _set_grad_checkpointing(model, name)
    return model


def _set_grad_checkpointing(model: nn.Module, name: str) -> None:
    """Turn on timm's gradient checkpointing in a feature extractor. timm's hook and module wrappers
    have ``set_grad_checkpointing`` themselves; the getter wrapper (``forward_intermediates`` models:
    every agent family) does not, and runs the wrapped model's blocks, so the model is switched."""
    target = model.model if isinstance(model, FeatureGetterNet) else model
    if not hasattr(target, "set_grad_checkpointing"):
        raise UserError(
            f"backbone {name!r} ({type(target).__name__}) has no set_grad_checkpointing: it cannot recompute its "
            "activations; set grad_checkpointing: false, or pick a backbone that supports it (every agentlit family does)"
        )
    target.set_grad_checkpointing(True)


def _load_backbone_state(model: nn.Module, name: str, state_dict: dict[str, Tensor], kwargs: dict[str, Any]) -> None:
    """Load classification weights into a feature extractor under the package's one fit rule
    (:func:`agentlit.checkpoint.check_fit`).

    The family's filter needs the full classifier (position grids, agent grids, head), so it runs
    against a weight-less copy on the meta device; of the filtered weights, the parts the feature
    wrapper pruned (classifier, final norm …) are left out on purpose, everything else must fit.
    """
    plain_kwargs = {k: v for k, v in kwargs.items() if k not in _FEATURE_ONLY_KWARGS}
    with torch.device("meta"):
        full = create_model(name, pretrained=False, **plain_kwargs)
    filter_fn = getattr(sys.modules.get(type(full).__module__), "checkpoint_filter_fn", None)
    state = dict(state_dict)
    if filter_fn is not None:
        state = filter_fn(state, full)
    target = model.model if isinstance(model, FeatureGetterNet) else model
    own, full_keys = target.state_dict(), set(full.state_dict())
    state = {k: v for k, v in state.items() if k in own or k not in full_keys}  # pruned parts: dropped on purpose
    load_fitting(target, state, f"backbone checkpoint does not fit {name} with {plain_kwargs or 'default arguments'}")


def _raise_if_no_features(name: str, kwargs: dict[str, Any], err: Exception | None) -> None:
    """If ``name`` builds fine without ``features_only``, the feature API is what is missing."""
    if err is not None and ("out of range" in str(err) or "out_indices" in str(err)):
        raise ValueError(
            f"backbone {name!r}: out_indices={kwargs.get('out_indices', 'default')} do not fit the model ({err}); "
            "pass out_indices with valid stage/block indices (e.g. [0, 1, 2, 3] for a 4-stage pyramid, "
            "or the last blocks of a shallow ViT)"
        ) from err
    plain = {k: v for k, v in kwargs.items() if k not in _FEATURE_ONLY_KWARGS}
    try:
        with torch.device("meta"):
            create_model(name, pretrained=False, **plain)
    except Exception:
        return  # the model itself fails to build: let the original error speak
    raise ValueError(
        f"backbone {name!r} does not support features_only=True (timm's feature-extraction API: "
        f"{type(err).__name__ if err else 'no feature_info'}: {err}). Backbones with feature maps include "
        f"{_backbone_names_with_features()} and most timm CNNs / hierarchical transformers"
    ) from err

class SegmentationModel(nn.Module):
    """backbone → (simple pyramid for single-stride backbones) → decode head (+ auxiliary head).

    forward(x (B, 3, H, W)) → logits (B, K, H/s0, W/s0) at the finest feature stride s0, or
    (logits, aux_logits) in training when an auxiliary head exists.

    Args:
        backbone: a ``features_only`` timm model (see :func:`build_backbone`).
        num_classes: output classes K.
        head: ``fpn`` (Semantic FPN) or ``upernet``.
        head_channels: decode width (None: 128 for fpn, 512 for upernet).
        neck_channels: FPN neck width.
        pool_scales: UperNet's pyramid-pooling bins.
        dropout: dropout before the classifier convolution.
        simple_pyramid: build a 4-level pyramid from single-stride (ViT) features; None: when all strides are equal.
        aux: add an auxiliary FCN head on level ``aux_index``.
        aux_index: feature level of the auxiliary head.
        aux_channels: width of the auxiliary head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: Literal["fpn", "upernet"] = "fpn",
        head_channels: int | None = None,
        neck_channels: int = 256,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        simple_pyramid: bool | None = None,
        aux: bool = False,
        aux_index: int = -2,
        aux_channels: int = 256,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        channels = list(backbone.feature_info.channels())
        strides = list(backbone.feature_info.reduction())
        if simple_pyramid is None:  # a plain ViT reports every level at one stride
            simple_pyramid = len(set(strides)) == 1 and len(strides) >= 1
        self.pyramid = SimplePyramid(channels[-1]) if simple_pyramid else None
        if self.pyramid is not None:
            channels, strides = [channels[-1]] * 4, SimplePyramid.strides(strides[-1])
        self.channels, self.strides = channels, strides
        if head == "fpn":
            self.decode_head: nn.Module = SemanticFPNHead(
                channels, strides, num_classes, neck_channels, head_channels or 128, dropout
            )
        elif head == "upernet":
            self.decode_head = UperNetHead(channels, num_classes, head_channels or 512, pool_scales, dropout)
        else:
            raise ValueError(f"head={head!r} is not one of 'fpn' (Semantic FPN), 'upernet'")
        self.aux_index = aux_index
        self.aux_head = FCNHead(channels[aux_index], num_classes, aux_channels, dropout) if aux else None

    def features(self, x: Tensor) -> list[Tensor]:
        feats = []
        for f, c in zip(self.backbone(x), self.backbone.feature_info.channels()):
            if f.ndim == 4 and f.shape[1] != c and f.shape[-1] == c:  # NHWC feature maps (some timm models)
                f = f.permute(0, 3, 1, 2)
            feats.append(f.contiguous())
        return self.pyramid(feats) if self.pyramid is not None else feats

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        feats = self.features(x)
        logits = self.decode_head(feats)
        if self.training and self.aux_head is not None:
            return logits, self.aux_head(feats[self.aux_index])
        return logits


def slide_inference(
    predict: Any, x: Tensor, num_classes: int, crop: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """Sliding-window logits: crops of ``crop`` every ``stride`` (the last window flush with the
    border), each predicted at full crop resolution, logits averaged where windows overlap.
    x (B, 3, H, W) → (B, K, H, W). Images smaller than the crop are predicted whole.

    Args:
        predict: callable mapping a crop (B, 3, h, w) to logits (B, K, h, w).
        x: the images (B, 3, H, W).
        num_classes: K.
        crop: window size (h, w).
        stride: window step (rows, columns).
    """
    B, _, H, W = x.shape
    ch, cw = min(crop[0], H), min(crop[1], W)
    sh, sw = stride
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    out = x.new_zeros(B, num_classes, H, W)
    count = x.new_zeros(1, 1, H, W)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, H - ch), min(c * sw, W - cw)
            out[:, :, y1: y1 + ch, x1: x1 + cw] += predict(x[:, :, y1: y1 + ch, x1: x1 + cw])
            count[:, :, y1: y1 + ch, x1: x1 + cw] += 1
    return out / count


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: the PASCAL VOC bit-interleaving palette (0 = black), distinct for K ≤ 256."""
    pal = np.zeros((max(num_classes, 256), 3), dtype=np.uint8)
    for i in range(len(pal)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal
