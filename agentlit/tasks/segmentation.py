"""Semantic segmentation: a timm backbone (``features_only=True``) + Semantic FPN or UperNet
(docs/reference.md §3), trained with cross-entropy (ignore index), AdamW and a poly schedule, evaluated
with dataset-level mIoU, whole-image or sliding-window inference.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..errors import check_choice
from ..models.segmentation import SegmentationModel, build_backbone, palette, slide_inference
from ._schedule import warmup_poly
from .base import TaskModule, pair
from .networks import SegmentationNet
from .optim import create_optimizer, param_groups
from .metrics import SegmentationMetrics, format_iou_table

__all__ = ["SegmentationModule", "SegmentationModel", "build_backbone", "palette", "slide_inference"]

Inference = Literal["whole", "slide"]


class SegmentationModule(TaskModule):
    """Semantic segmentation with any ``features_only`` timm backbone (agent backbones included).

    The network is ``net`` when given (any ``nn.Module`` mapping images (B, C, H, W) to logits
    (B, num_classes, h, w), and in training optionally ``(logits, aux_logits)``; e.g. ``class_path:
    agentlit.tasks.networks.SegmentationNet``); otherwise the flat settings ``backbone`` and ``**network``
    build it with :class:`~agentlit.tasks.networks.SegmentationNet`.

    Args:
        backbone: the default network's timm backbone, e.g. ``agent_pvt_tiny``, ``agent_swin_tiny``, ``resnet50``.
        num_classes: classes (ADE20K: 150).
        aux_weight: loss weight of the auxiliary head's logits, when the network returns them in training
            (0: the default network gets no auxiliary head; the UperNet recipe uses 0.4 on the third level).
        ignore_index: label excluded from loss and metrics.
        lr: AdamW peak learning rate.
        weight_decay: AdamW decay (never on norms, biases, position embeddings / tables or agent biases).
        betas: AdamW's moment coefficients (beta1, beta2).
        warmup_iters: linear warm-up length in steps (0: none).
        warmup_ratio: the warm-up starts at ``warmup_ratio · lr``.
        power: exponent of the poly decay ``(1 − t/T)^power``.
        min_lr: floor the poly decay ends at.
        max_iters: schedule length T in steps (None: the trainer's total steps).
        inference: ``whole`` image or ``slide`` window (``crop_size``, ``stride``).
        crop_size: sliding-window size (int or (h, w)).
        stride: sliding-window step (int or (h, w)); windows overlap where it is below ``crop_size``.
        flip: also predict the horizontally flipped image and average the two.
        size_divisor: pad whole images to a multiple of this for the backbone (logits are cropped back).
        class_names: names for the per-class table (None: the datamodule's, else indices).
        output_dir: where ``predict`` writes masks and overlays (None: ``predictions/`` in the evaluation folder,
            e.g. ``version_N/predict/predictions``); a folder an earlier predict wrote into gets a ``-1``, ``-2`` … twin.
        compile: ``torch.compile`` the network (``compiled_modules()``): false, true or {mode: ..., fullgraph: ...}.
        net: the network (None: built from ``backbone`` and ``**network``).
        **network: the default network's other settings, :class:`~agentlit.tasks.networks.SegmentationNet`'s arguments:
            ``head`` (``fpn``: the Agent-PVT recipe, ``upernet``: Agent-Swin), ``backbone_kwargs``, ``out_indices``,
            ``pretrained``, ``backbone_checkpoint`` (classification weights for the backbone), ``head_channels``,
            ``neck_channels``, ``pool_scales``, ``dropout``, ``simple_pyramid``, ``aux_index``, ``aux_channels``,
            ``grad_checkpointing`` (recompute the backbone's activations in backward: less memory, same results).
    """

    task_name = "segmentation"
    monitor = "val/mIoU"
    monitor_mode = "max"
    network_settings = ("backbone", "num_classes", "head", "backbone_kwargs", "out_indices", "head_channels", "neck_channels",
                        "pool_scales", "simple_pyramid", "aux_weight", "aux_index", "aux_channels", "net")
    network_class = SegmentationNet
    network_passed = ("num_classes", "aux")

    def __init__(
        self,
        backbone: str = "agent_pvt_tiny",
        num_classes: int = 150,
        aux_weight: float = 0.0,
        ignore_index: int = 255,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_iters: int = 0,
        warmup_ratio: float = 1e-6,
        power: float = 0.9,
        min_lr: float = 0.0,
        max_iters: int | None = None,
        inference: Inference = "whole",
        crop_size: int | tuple[int, int] = 512,
        stride: int | tuple[int, int] = 341,
        flip: bool = False,
        size_divisor: int = 32,
        class_names: list[str] | None = None,
        output_dir: str | None = None,
        compile: bool | dict[str, Any] = False,
        net: nn.Module | None = None,
        **network: Any,
    ) -> None:
        super().__init__()
        self.save_settings()
        check_choice("inference", inference, Inference)
        given = self.take_network(net, dict(network, backbone=backbone))
        self.model = given if given is not None else SegmentationNet(
            backbone=backbone, num_classes=num_classes, aux=aux_weight > 0, **network)
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.test_metrics = SegmentationMetrics(num_classes, ignore_index)
        self.class_names = self.checked_class_names(class_names, num_classes)

    # -- forward / inference ------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) → logits (B, K, H, W) at input resolution (``inference`` mode, ``flip``)."""
        return self.infer(x)

    # -- task protocol (agentlit profile) ------------------------------------------------------
    def example_batch(self, batch_size: int, img_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Random ``{"image": (B, C, H, W), "mask": (B, H, W)}`` shaped like a training batch.

        Args:
            batch_size: items in the batch.
            img_size: (H, W) of the images (None: :meth:`input_size`, else ``crop_size``).
        """
        h, w = img_size or self.input_size() or pair(self.hparams.crop_size)
        in_chans = int((self.flat_settings()["backbone_kwargs"] or {}).get("in_chans", 3))
        x = torch.randn(batch_size, in_chans, h, w, device=self.device)
        return {"image": x, "mask": torch.randint(0, self.hparams.num_classes, (batch_size, h, w), device=self.device)}

    def input_size(self) -> tuple[int, int] | None:
        """The backbone's ``img_size`` (``backbone_kwargs``), else its default input size."""
        return pair((self.flat_settings()["backbone_kwargs"] or {}).get("img_size")) or super().input_size()

    def at_input_size(self, size: tuple[int, int]) -> "SegmentationModule":
        """Rebuilt with ``backbone_kwargs.img_size = size`` when the config sets one (agent biases
        and position embeddings follow); ``self`` otherwise.

        Args:
            size: the new (H, W).
        """
        kwargs = dict(self.flat_settings()["backbone_kwargs"] or {})
        if "img_size" not in kwargs or pair(kwargs["img_size"]) == tuple(size):
            return self
        kwargs["img_size"] = size[0] if size[0] == size[1] else list(size)
        return self.with_hparams(backbone_kwargs=kwargs)

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
                self._whole, x, self.hparams.num_classes, pair(self.hparams.crop_size), pair(self.hparams.stride)
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

    def setup(self, stage: str) -> None:
        self.check_data_classes()  # before the optimizer is built or any batch is seen

    # -- prediction ---------------------------------------------------------------------------
    def on_predict_epoch_start(self) -> None:
        from ..predict_writers import predictions_folder

        self._predict_dir = predictions_folder(self.trainer, self.hparams.output_dir)  # never an earlier predict's
        self._predict_read, self._predict_skipped = 0, []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Writes ``<predictions folder>/<input name>.png``: a palette PNG (pixel value = class id, colour
        from :func:`palette`) at the input's original size, and beside it ``<input name>_overlay.png``
        (the input | the prediction over it | a legend of class names and colours); returns the
        paths of the masks. Inputs marked ``unreadable`` (``skip_bad_images``) are counted, not predicted."""
        from ..predict_writers import save_overlay

        out_dir = self._predict_dir
        images = batch["image"]
        images = [images[i: i + 1] for i in range(len(images))] if isinstance(images, Tensor) else [i[None] for i in images]
        pal = palette(self.hparams.num_classes).reshape(-1).tolist()
        unreadable = batch.get("unreadable") or [""] * len(images)
        written = []
        for x, name, size, bad, file in zip(images, batch["name"], batch["orig_size"], unreadable,
                                            batch.get("file") or batch["name"]):
            self._predict_read += 1
            if bad:
                self._predict_skipped.append(file)
                continue
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
            dm = getattr(self.trainer, "datamodule", None)
            norm = {k: tuple(getattr(dm, k)) for k in ("mean", "std") if getattr(dm, k, None) is not None}
            save_overlay(out_dir / f"{name}_overlay.png", x, pred, palette(self.hparams.num_classes), self._names(), **norm)
        return written

    def on_predict_epoch_end(self) -> None:
        from ..predict_writers import predict_source, report_predictions

        done = self._predict_read - len(self._predict_skipped)
        report_predictions(self.trainer, self._predict_read, predict_source(self.trainer), f"{done} masks and {done} overlays",
                           self._predict_dir, self._predict_skipped)

    # -- optimisation -------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups ``[decayed, not decayed]`` by the package's one rule (:mod:`agentlit.tasks.optim`):
        no decay on norms, biases, position embeddings / tables and agent biases."""
        return param_groups(self.model, self.hparams.weight_decay)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = create_optimizer(self.model, hp.lr, hp.weight_decay, tuple(hp.betas))
        total = hp.max_iters or max(1, int(self.trainer.estimated_stepping_batches))
        if not math.isfinite(total):
            raise ValueError("set max_iters (or trainer.max_steps / max_epochs) so the poly schedule knows its length")
        schedule = warmup_poly(
            total_steps=int(total), warmup_steps=hp.warmup_iters, warmup_factor=hp.warmup_ratio,
            power=hp.power, min_factor=hp.min_lr / hp.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
