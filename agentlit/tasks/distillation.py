"""Recover a converted model's accuracy by distillation from the softmax original (docs/any-model.md).

The student is the classifier built and loaded exactly as :class:`ClassificationModule` builds it
(``model_name`` + ``checkpoint_path``: a timm name with a local weights file, one of our checkpoints,
an export), converted to agent attention by :func:`agentlit.convert`; the teacher is a frozen copy of
it taken before the conversion. Training minimises

    (1 - label_weight) · T² · KL(softmax(teacher / T) ‖ softmax(student / T))
      + label_weight · CE(student, labels) + feature_weight · mean over converted layers of MSE(outputs)

so with ``label_weight: 0`` (the default) the images' labels are never read: any image folder works.
Optimiser, schedule, EMA and metrics are the classification task's.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..conversion import convert
from .classification import ClassificationModule

__all__ = ["DistillationModule"]


def _images_and_labels(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(images, labels or None) from a tuple/list batch, a ``{"image"[, "target"]}`` dict or bare images."""
    if isinstance(batch, dict):
        return batch["image"], batch.get("target")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class DistillationModule(ClassificationModule):
    """Distil an agent-attention copy of a softmax classifier from the frozen original.

    Args:
        agent_num: agents per converted layer (see :func:`agentlit.convert`).
        layers: which attention layers to convert: None (all), the first k, or names / patterns.
        agents: "pooled" or "learned" agents.
        dwc_kernel: depthwise conv kernel of the converted layers (0: none).
        temperature: softmax temperature T of the logit distillation.
        label_weight: weight of the label cross-entropy (0: labels unused), the KL term gets the rest.
        feature_weight: weight of matching each converted layer's output to the teacher's layer (0: off).
        **kwargs: :class:`ClassificationModule`'s arguments: ``model_name`` / ``checkpoint_path`` /
            ``pretrained`` / ``model_kwargs`` / ``img_size`` / ``num_classes`` define the softmax model
            (teacher, and student before conversion); ``lr``, ``weight_decay``, ``warmup_epochs``, …
            the student's optimisation.
    """

    task_name = "distillation"
    monitor = "val/agree"  # top-1 agreement with the teacher: needs no labels
    monitor_mode = "max"
    network_settings = (*ClassificationModule.network_settings, "agent_num", "layers", "agents", "dwc_kernel")

    def __init__(
        self,
        agent_num: int | tuple[int, ...] = 49,
        layers: int | list[str] | None = None,
        agents: str = "pooled",
        dwc_kernel: int = 3,
        temperature: float = 1.0,
        label_weight: float = 0.0,
        feature_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        if not 0.0 <= label_weight <= 1.0 or feature_weight < 0:
            raise ValueError(f"label_weight={label_weight} must be in [0, 1] and feature_weight={feature_weight} >= 0")
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.conversion = convert(self.model, agent_num, layers, agents=agents, dwc_kernel=dwc_kernel)
        if self.ema is not None:  # the EMA follows the student, not the softmax model it was copied from
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.val_agree = MeanMetric()
        self.teacher_metrics = self.val_metrics.clone(prefix="val/teacher_")
        self._features: dict[str, list[Tensor]] = {"student": [], "teacher": []}
        if feature_weight > 0:
            for name in self.conversion.converted:
                self.model.get_submodule(name).register_forward_hook(self._keep("student"))
                self.teacher.get_submodule(name).register_forward_hook(self._keep("teacher"))

    def _keep(self, side: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.training:
                self._features[side].append(output[0] if isinstance(output, tuple) else output)
        return hook

    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout / drop path, whatever Lightning sets
        return self

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = _images_and_labels(batch)
        hp = self.hparams
        for feats in self._features.values():
            feats.clear()
        with torch.no_grad():
            target = self.teacher(x)
        logits = self(x)
        T = hp.temperature
        kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(target / T, -1), reduction="batchmean",
                      log_target=True) * T * T
        loss = (1.0 - hp.label_weight) * kd
        if hp.label_weight > 0:
            if y is None:
                raise ValueError("label_weight > 0 needs labelled batches (images, labels); set label_weight: 0")
            loss = loss + hp.label_weight * F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
        if hp.feature_weight > 0:
            pairs = list(zip(self._features["student"], self._features["teacher"]))
            feat = torch.stack([F.mse_loss(s, t.detach()) for s, t in pairs]).mean()
            self.log("train/feature", feat, on_step=True, on_epoch=True, batch_size=len(x))
            loss = loss + hp.feature_weight * feat
        self.log("train/kd", kd, on_step=True, on_epoch=True, batch_size=len(x))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))
        return loss  # a non-finite loss stops training in TaskModule.on_before_backward

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = _images_and_labels(batch)
        logits, target = self(x), self.teacher(x)
        self.val_agree.update((logits.argmax(-1) == target.argmax(-1)).float())
        self.log("val/agree", self.val_agree, prog_bar=True, on_epoch=True, batch_size=len(x))
        if y is None:
            return
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=len(y))
        for metrics, out in ((self.val_metrics, logits), (self.teacher_metrics, target)):
            metrics.update(out, y)
            self.log_dict(metrics, prog_bar=metrics is self.val_metrics, on_epoch=True, batch_size=len(y))
        if self.ema is not None:
            self.ema_metrics.update(self.ema(x), y)
            self.log_dict(self.ema_metrics, on_epoch=True, batch_size=len(y))
