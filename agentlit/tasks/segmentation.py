"""Semantic segmentation: a timm backbone (``features_only=True``) + Semantic FPN or UperNet
(REFERENCE.md §3), trained with cross-entropy (ignore index), AdamW and a poly schedule, evaluated
with dataset-level mIoU, whole-image or sliding-window inference.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor, nn

from ..core.bias import AGENT_BIAS_AXES
from ..models import create_model, unwrap_checkpoint
from ..models.heads import FCNHead, SemanticFPNHead, SimplePyramid, UperNetHead
from ._schedule import warmup_poly
from .seg_metrics import SegmentationMetrics, format_iou_table

__all__ = ["SegmentationModule", "SegmentationModel", "build_backbone", "load_checkpoint_file", "palette", "slide_inference"]

# Parameters never decayed in the dense recipes: norms (by module type), position embeddings /
# relative-position tables, class tokens and agent biases (by name).
_NO_DECAY_NAMES = ("pos_embed", "absolute_pos_embed", "relative_position_bias_table", "cls_token", "dist_token")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_FEATURE_EXAMPLES = ("resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "vit_small_patch16_224")


def load_checkpoint_file(path: str | Path) -> dict[str, Tensor]:
    """Weights of a checkpoint file: official ``{'model': …}``, a Lightning checkpoint of ours
    (``state_dict`` with the ``model.`` prefix) or a bare state dict (``.safetensors`` too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # Lightning checkpoints may pickle hyper-parameter objects; the file is the user's own
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return unwrap_checkpoint(ckpt)


def _backbone_names_with_features() -> list[str]:
    return timm.list_models("agent_*") + list(_FEATURE_EXAMPLES)


def build_backbone(
    name: str,
    out_indices: tuple[int, ...] | None = None,
    state_dict: dict[str, Tensor] | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, features_only=True, …)`` → a module returning [(B, C_i, H_i, W_i)].

    ``state_dict``: classification weights, loaded *before* the feature wrapping through the
    family's ``checkpoint_filter_fn`` (so official and our checkpoints both map, biases resized).
    """
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    if state_dict is not None:
        kwargs["pretrained_cfg_overlay"] = dict(state_dict=state_dict)
        pretrained = True
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    builder_log = logging.getLogger("timm.models._builder")
    builder_log.addHandler(handler)
    old_level = builder_log.level
    builder_log.setLevel(logging.INFO)
    try:
        model = create_model(name, features_only=True, pretrained=pretrained, **kwargs)
    except ValueError as e:
        if "unknown model name" in str(e):
            raise
        _raise_if_no_features(name, kwargs, e)
        raise
    except (AssertionError, RuntimeError, AttributeError, NotImplementedError, TypeError, KeyError) as e:
        _raise_if_no_features(name, kwargs, e)
        raise
    finally:
        builder_log.removeHandler(handler)
        builder_log.setLevel(old_level)
    if state_dict is not None:
        cfg = getattr(model, "pretrained_cfg", None)
        classifier = (cfg or {}).get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        for rec in records:  # timm loads non-strictly for features: surface what did not match
            msg = rec.getMessage()
            if msg.startswith(("Missing keys", "Unexpected keys")):
                keys = [k.strip() for k in msg[msg.find("(") + 1: msg.find(")")].split(",")]
                keys = [k for k in keys if not any(k.startswith(c + ".") for c in classifier)]  # the dropped classifier
                if keys:
                    rank_zero_warn(f"backbone checkpoint for {name}: {msg.split(' (')[0]}: {keys}")
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)  # do not keep a second copy of the weights around
    if not hasattr(model, "feature_info"):
        _raise_if_no_features(name, kwargs, None)
    return model


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _raise_if_no_features(name: str, kwargs: dict[str, Any], err: Exception | None) -> None:
    """If ``name`` builds fine without ``features_only``, the feature API is what is missing."""
    if err is not None and ("out of range" in str(err) or "out_indices" in str(err)):
        raise ValueError(
            f"backbone {name!r}: out_indices={kwargs.get('out_indices', 'default')} do not fit the model ({err}); "
            "pass out_indices with valid stage/block indices (e.g. [0, 1, 2, 3] for a 4-stage pyramid, "
            "or the last blocks of a shallow ViT)"
        ) from err
    plain = {k: v for k, v in kwargs.items() if k not in ("out_indices", "pretrained_cfg_overlay")}
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
    x (B, 3, H, W) → (B, K, H, W). Images smaller than the crop are predicted whole."""
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


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SegmentationModule(L.LightningModule):
    """Semantic segmentation with any ``features_only`` timm backbone (agent backbones included).

    Args:
        backbone: timm model name, e.g. ``agent_pvt_tiny``, ``agent_swin_tiny``, ``resnet50``.
        num_classes: classes (ADE20K: 150).
        head: ``fpn`` (Semantic FPN: the paper's Agent-PVT recipe) or ``upernet`` (Agent-Swin recipe).
        backbone_kwargs: extra model arguments (``img_size``, ``agent_num``, ``drop_path_rate``,
            reduced ``embed_dims``/``depths`` …).
        out_indices: which feature levels to use (None: the model's default pyramid).
        pretrained: load the model's registered pretrained weights.
        backbone_checkpoint: a classification checkpoint to initialise the backbone from — one of
            ours (Lightning ``.ckpt``) or an official release file; classifier weights are dropped,
            agent biases / position embeddings resized by the family's filter.
        head_channels: decode width (None: 128 for fpn, 512 for upernet); neck_channels: FPN width.
        pool_scales: UperNet's PPM bins. dropout: before the classifier.
        simple_pyramid: build a 4-level pyramid from single-stride (ViT) features; None = when the
            backbone reports a single stride.
        aux_weight: loss weight of an auxiliary FCN head on level ``aux_index`` (0 = no aux head;
            the UperNet recipe uses 0.4 on the third level).
        ignore_index: label excluded from loss and metrics.
        lr, weight_decay, betas: AdamW (no decay on norms, position embeddings/tables, agent biases).
        warmup_iters, warmup_ratio: linear warm-up from ``warmup_ratio·lr``.
        power, min_lr: poly decay ``(1 − t/T)^power`` to ``min_lr`` over ``max_iters`` (None: the
            trainer's total steps).
        inference: ``whole`` image or ``slide`` window (``crop_size``, ``stride``); ``flip`` adds
            the horizontally flipped prediction; ``size_divisor`` pads whole images for the backbone.
        class_names: names for the per-class table (None: the datamodule's, else indices).
        output_dir: where ``predict`` writes masks (None: ``<log dir>/predictions``).
    """

    monitor = "val/mIoU"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: str = "agent_pvt_tiny",
        num_classes: int = 150,
        head: Literal["fpn", "upernet"] = "fpn",
        backbone_kwargs: dict[str, Any] | None = None,
        out_indices: tuple[int, ...] | None = None,
        pretrained: bool = False,
        backbone_checkpoint: str | None = None,
        head_channels: int | None = None,
        neck_channels: int = 256,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        simple_pyramid: bool | None = None,
        aux_weight: float = 0.0,
        aux_index: int = -2,
        aux_channels: int = 256,
        ignore_index: int = 255,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
        power: float = 0.9,
        min_lr: float = 0.0,
        max_iters: int | None = None,
        inference: Literal["whole", "slide"] = "whole",
        crop_size: int | tuple[int, int] = 512,
        stride: int | tuple[int, int] = 341,
        flip: bool = False,
        size_divisor: int = 32,
        class_names: list[str] | None = None,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if inference not in ("whole", "slide"):
            raise ValueError(f"inference={inference!r} must be 'whole' or 'slide'")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        state_dict = load_checkpoint_file(backbone_checkpoint) if backbone_checkpoint else None
        net = build_backbone(backbone, out_indices, state_dict, pretrained, **(backbone_kwargs or {}))
        self.model = SegmentationModel(
            net, num_classes, head, head_channels, neck_channels, tuple(pool_scales), dropout,
            simple_pyramid, aux_weight > 0, aux_index, aux_channels,
        )
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.test_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.class_names = list(class_names) if class_names else None

    # -- forward / inference ------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) → logits (B, K, H, W) at input resolution (``inference`` mode, ``flip``)."""
        return self.infer(x)

    def _whole(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        d = self.hparams.size_divisor
        ph, pw = (-H) % d if d > 1 else 0, (-W) % d if d > 1 else 0
        if ph or pw:  # pad for backbones that need multiples of their stride, crop the logits back
            x = F.pad(x, (0, pw, 0, ph))
        logits = self.model(x)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :H, :W]

    def _infer_once(self, x: Tensor) -> Tensor:
        if self.hparams.inference == "slide":
            return slide_inference(
                self._whole, x, self.hparams.num_classes, _pair(self.hparams.crop_size), _pair(self.hparams.stride)
            )
        return self._whole(x)

    @torch.no_grad()
    def infer(self, x: Tensor) -> Tensor:
        """Evaluation logits (B, K, H, W); with ``flip`` the flipped pass is averaged in."""
        logits = self._infer_once(x)
        if self.hparams.flip:
            logits = (logits + self._infer_once(x.flip(-1)).flip(-1)) / 2
        return logits

    # -- training -----------------------------------------------------------------------------
    def _loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, mask, ignore_index=self.hparams.ignore_index)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, mask = batch["image"], batch["mask"]
        out = self.model(x)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = self._loss(logits, mask)
        self.log("train/loss_decode", loss, batch_size=len(x))
        if aux is not None:
            aux_loss = self._loss(aux, mask)
            self.log("train/loss_aux", aux_loss, batch_size=len(x))
            loss = loss + self.hparams.aux_weight * aux_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], metrics: SegmentationMetrics, prefix: str) -> None:
        images, masks = batch["image"], batch["mask"]
        if isinstance(images, Tensor) and isinstance(masks, Tensor):
            pairs = [(images, masks)]
        else:  # differently sized images: one at a time
            pairs = [(img[None], m[None]) for img, m in zip(images, masks)]
        for x, mask in pairs:
            logits = self.infer(x)
            if logits.shape[-2:] != mask.shape[-2:]:  # images resized for evaluation: back to the label size
                logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, mask, ignore_index=self.hparams.ignore_index)
            self.log(f"{prefix}/loss", loss, sync_dist=True, batch_size=len(x))
            metrics.update(logits.argmax(1), mask)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _names(self) -> list[str] | None:
        if self.class_names:
            return self.class_names
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "class_names", ()) or ())
        return names if len(names) == self.hparams.num_classes else None

    def _end_epoch(self, metrics: SegmentationMetrics, prefix: str) -> None:
        res = metrics.compute()
        metrics.reset()
        for key in ("mIoU", "mAcc", "aAcc"):
            self.log(f"{prefix}/{key}", res[key], prog_bar=key == "mIoU", sync_dist=False)
        if self.trainer.sanity_checking:
            return
        title = f"{prefix} per-class IoU (epoch {self.current_epoch}, step {self.global_step})"
        self.last_table = format_iou_table(res["iou"], res["acc"], self._names(), title)
        if self.trainer.is_global_zero:
            print("\n" + self.last_table + "\n", flush=True)

    def on_validation_epoch_end(self) -> None:
        self._end_epoch(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch(self.test_metrics, "test")

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n = getattr(dm, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ValueError(
                f"model num_classes={self.hparams.num_classes} but the datamodule {type(dm).__name__} has {n} classes"
            )

    # -- prediction ---------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Writes ``<output_dir>/<input name>.png``: a palette PNG (pixel value = class id, colour
        from :func:`palette`) at the input's original size; returns the written paths."""
        out_dir = Path(self.hparams.output_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions")
        out_dir.mkdir(parents=True, exist_ok=True)
        images = batch["image"]
        images = [images[i: i + 1] for i in range(len(images))] if isinstance(images, Tensor) else [i[None] for i in images]
        pal = palette(self.hparams.num_classes).reshape(-1).tolist()
        written = []
        for x, name, size in zip(images, batch["name"], batch["orig_size"]):
            logits = self.infer(x)
            size = tuple(int(s) for s in size)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            pred = logits.argmax(1)[0].to(torch.uint8 if self.hparams.num_classes <= 256 else torch.int32).cpu().numpy()
            im = Image.fromarray(pred, mode="P") if pred.dtype == np.uint8 else Image.fromarray(pred)
            if pred.dtype == np.uint8:
                im.putpalette(pal)
            path = out_dir / f"{name}.png"
            im.save(path)
            written.append(str(path))
        return written

    # -- optimisation -------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decay for weights, none for norms, position embeddings and agent biases."""
        no_decay_backbone = set()
        inner = getattr(self.model.backbone, "model", None)
        for mod in (self.model.backbone, inner):
            if mod is not None and hasattr(mod, "no_weight_decay"):
                no_decay_backbone |= set(mod.no_weight_decay())
        decay, no_decay, seen = [], [], set()
        for mod_name, module in self.model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                skip = (
                    isinstance(module, _NORMS)
                    or p_name in AGENT_BIAS_AXES
                    or any(k in p_name for k in _NO_DECAY_NAMES)
                    or any(full.endswith("backbone." + n) or full.endswith("backbone.model." + n) for n in no_decay_backbone)
                )
                (no_decay if skip else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas))
        total = hp.max_iters or max(1, int(self.trainer.estimated_stepping_batches))
        if not math.isfinite(total):
            raise ValueError("set max_iters (or trainer.max_steps / max_epochs) so the poly schedule knows its length")
        schedule = warmup_poly(
            total_steps=int(total), warmup_steps=hp.warmup_iters, warmup_factor=hp.warmup_ratio,
            power=hp.power, min_factor=hp.min_lr / hp.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
