"""Image classification: any timm model (ours included) + label smoothing, mixup/cutmix, EMA."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from ._ema import ema_update
from ._schedule import warmup_cosine
from .optim import create_optimizer, param_groups
from .base import TaskModule
from .networks import TimmClassifier

__all__ = ["ClassificationModule"]


class ClassificationModule(TaskModule):
    """A classifier trained the DeiT/Swin way (docs/reference.md §2 recipe).

    The network is ``net`` when given (any ``nn.Module`` mapping images (B, C, H, W) to logits
    (B, num_classes), e.g. ``class_path: agentlit.tasks.networks.TimmClassifier``); otherwise the flat
    settings ``model_name`` and ``**network`` build it with :class:`~agentlit.tasks.networks.TimmClassifier`.

    Args:
        model_name: the default network's timm name, e.g. ``agent_deit_tiny`` (agentlit's are registered on import).
        num_classes: classifier width (with ``net``: the width of its logits, checked against ``net.num_classes``).
        lr: peak learning rate at ``lr_reference_batch`` (None: use ``lr`` as is).
        lr_reference_batch: batch size ``lr`` was tuned for; the effective lr scales linearly with the global batch.
        weight_decay: AdamW decay (never on norms, biases, position embeddings or agent biases).
        betas: AdamW's moment coefficients (beta1, beta2).
        warmup_epochs: linear warm-up length (fractions allowed), from ``warmup_lr`` to the peak.
        warmup_lr: lr at the first warm-up step, at ``lr_reference_batch`` (scaled like ``lr``).
        min_lr: floor of the cosine decay and the lr of the cool-down, at ``lr_reference_batch`` (scaled like ``lr``).
        cooldown_epochs: epochs at ``min_lr`` after the cosine, counted in ``trainer.max_epochs`` (300 + 10 = 310).
        label_smoothing: for the plain cross-entropy and inside mixup targets.
        mixup_alpha: timm's Mixup: Beta(alpha, alpha) of the mixup blend (0: no mixup; off when both alphas are 0).
        cutmix_alpha: timm's Mixup: Beta(alpha, alpha) of the cutmix box area (0: no cutmix).
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both alphas are set.
        ema_decay: keep an exponential moving average of the weights (None: off); validated as ``val_ema/*``.
        compile: ``torch.compile`` the network (``compiled_modules()``): false, true or {mode: ..., fullgraph: ...}.
        net: the network (None: built from ``model_name`` and ``**network``).
        **network: the default network's other settings, :class:`~agentlit.tasks.networks.TimmClassifier`'s arguments:
            ``img_size``, ``pretrained``, ``checkpoint_path`` (initial weights from a local file, adapted by the
            family's ``checkpoint_filter_fn``), ``drop_path_rate``, ``model_kwargs`` (``agent_num``, ``depth`` …).
    """

    task_name = "classification"
    monitor = "val/acc1"
    monitor_mode = "max"
    network_settings = ("model_name", "num_classes", "img_size", "model_kwargs", "net")
    network_class = TimmClassifier

    def __init__(
        self,
        model_name: str = "agent_deit_tiny",
        num_classes: int = 1000,
        lr: float = 5e-4,
        lr_reference_batch: int | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        cooldown_epochs: float = 0.0,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        compile: bool | dict[str, Any] = False,
        net: nn.Module | None = None,
        **network: Any,
    ) -> None:
        super().__init__()
        self.save_settings()
        given = self.take_network(net, dict(network, model_name=model_name))
        self.model = given if given is not None else TimmClassifier(model_name=model_name, num_classes=num_classes, **network)
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=mixup_prob, switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing, num_classes=num_classes,
            )
        self.ema: nn.Module | None = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        top_k = min(5, num_classes)
        metrics = MetricCollection(
            {"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
             f"acc{top_k}": MulticlassAccuracy(num_classes, top_k=top_k, average="micro")}
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.ema_metrics = metrics.clone(prefix="val_ema/") if self.ema is not None else None
        # Epoch means as metrics (synced once per epoch): ranks may hold different numbers of
        # evaluation batches, so nothing may all-reduce per step.
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) → logits (B, num_classes)."""
        return self.model(x)

    def example_batch(self, batch_size: int, img_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """Random (images (B, C, H, W), labels (B,)) shaped like a training batch.

        Args:
            batch_size: items in the batch.
            img_size: (H, W) of the images (None: :meth:`input_size`, else 224²).
        """
        h, w = img_size or self.input_size() or (224, 224)
        in_chans = int((self.flat_settings()["model_kwargs"] or {}).get("in_chans", 3))
        x = torch.randn(batch_size, in_chans, h, w, device=self.device)
        return x, torch.randint(0, self.hparams.num_classes, (batch_size,), device=self.device)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.mixup is not None:
            x, soft = self.mixup(x, y)  # soft targets (B, num_classes), label smoothing included
            loss = torch.sum(-soft * F.log_softmax(self(x), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        return loss  # a non-finite loss stops training in TaskModule.on_before_backward

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: checkpoint callbacks run before that module hook, so an
        # update made there would be missing from a checkpoint written at this step.
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step after an optimizer step; the decay warms up as in timm's ModelEmaV3."""
        if self.ema is not None:
            ema_update(self.ema, self.model, self.global_step, self.hparams.ema_decay)

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups ``[decayed, not decayed]`` by the package's one rule (:mod:`agentlit.tasks.optim`):
        no decay on norms, biases, position embeddings / tables, class tokens and agent biases."""
        return param_groups(self.model, self.hparams.weight_decay)

    def configure_optimizers(self):
        lr = self.effective_lr()
        optimizer = create_optimizer(self.model, lr, self.hparams.weight_decay, tuple(self.hparams.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        steps_per_epoch = total / epochs if epochs else None
        warmup = int(self.hparams.warmup_epochs * steps_per_epoch) if steps_per_epoch else 0
        cosine = total
        if self.hparams.cooldown_epochs:
            if not epochs or self.hparams.cooldown_epochs >= epochs:
                raise ValueError(
                    f"cooldown_epochs={self.hparams.cooldown_epochs} needs trainer.max_epochs larger than it (got "
                    f"{self.trainer.max_epochs}); set max_epochs to the cosine epochs + cooldown_epochs, e.g. 300 + 10 = 310"
                )
            cosine = int((epochs - self.hparams.cooldown_epochs) * steps_per_epoch)
        # Factors relative to the unscaled lr, so warm-up lr and min lr scale with the global batch exactly
        # as lr does (the release scales all three by global batch / 512). Cosine over the absolute step
        # with the warm-up in place of its first steps, then flat at min lr: timm's CosineLRScheduler as
        # the release steps it per iteration.
        base = self.hparams.lr
        schedule = warmup_cosine(
            total_steps=cosine, warmup_steps=warmup, warmup_factor=self.hparams.warmup_lr / base if base else 0.0,
            min_factor=self.hparams.min_lr / base if base else 0.0, warmup_prefix=False,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def effective_lr(self) -> float:
        """``lr`` scaled linearly to the global batch when ``lr_reference_batch`` is set."""
        ref = self.hparams.lr_reference_batch
        if not ref:
            return self.hparams.lr
        dm = getattr(self.trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None)
        if per_device is None:
            return self.hparams.lr
        global_batch = per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches
        return self.hparams.lr * global_batch / ref

    # -- evaluation -------------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.log("val/loss", self.val_loss, prog_bar=True, on_epoch=True, batch_size=len(y))
        self.val_metrics.update(logits, y)
        self.log_dict(self.val_metrics, prog_bar=True, on_epoch=True, batch_size=len(y))
        if self.ema is not None:
            self.ema_metrics.update(self.ema(x), y)
            self.log_dict(self.ema_metrics, on_epoch=True, batch_size=len(y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        model = self.ema if self.ema is not None else self.model
        logits = model(x)
        self.test_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.log("test/loss", self.test_loss, on_epoch=True, batch_size=len(y))
        self.test_metrics.update(logits, y)
        self.log_dict(self.test_metrics, on_epoch=True, batch_size=len(y))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities (B, num_classes); batches may be images, (images, labels) or the
        classification DataModules' ``{"image", "index"[, "target"]}`` dicts."""
        if isinstance(batch, dict):
            x = batch["image"]
        else:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
        model = self.ema if self.ema is not None else self.model
        return model(x).softmax(-1)

    # -- class names and predictions.csv -----------------------------------------------------
    #: names of the classes (index → name); from the datamodule at setup, from the checkpoint when
    #: one is loaded, so ``predict`` on a plain folder needs no training data
    class_names: list[str] | None = None

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "class_names", None)
        if names and len(names) == self.hparams.num_classes:
            self.class_names = [str(n) for n in names]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # refuses non-finite weights
        if self.class_names:
            checkpoint["class_names"] = list(self.class_names)  # plain strings: loads with weights_only

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # the weights must fit the configured network
        names = checkpoint.get("class_names")
        if names and len(names) == self.hparams.num_classes:
            self.class_names = [str(n) for n in names]

    def on_predict_epoch_start(self) -> None:
        from ..predict_writers import ClassificationPredictions

        self._predictions = ClassificationPredictions()

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, Tensor) or getattr(self, "_predictions", None) is None:
            return
        index = target = None
        if isinstance(batch, dict) and "index" in batch:
            index = torch.as_tensor(batch["index"])
            target = torch.as_tensor(batch["target"]) if "target" in batch else None
            keep = index >= 0  # unreadable files skipped with skip_bad_images
            self._predictions.skipped += [f for f, k in zip(batch.get("file", ()), keep.tolist()) if not k]
            outputs, index = outputs[keep], index[keep]
            target = target[keep] if target is not None else None
        self._predictions.add(outputs, index, target)

    def on_predict_epoch_end(self) -> None:
        """Writes ``<run folder>/predictions.csv`` (rank 0) and prints a short table and its path."""
        writer = getattr(self, "_predictions", None)
        if writer is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        names = dm.predict_names() if hasattr(dm, "predict_names") else None
        writer.write(self.trainer, self.class_names, names, top_k=min(5, self.hparams.num_classes))
        self._predictions = None
