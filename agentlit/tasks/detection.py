"""Object detection and instance segmentation: torchvision's Mask R-CNN, Faster R-CNN or RetinaNet
over any timm ``features_only`` backbone (the agent PVT / Swin / CSwin families and their
baselines), trained with the paper's mmdet COCO recipes (AdamW, 500-iteration linear warm-up,
step decay by epoch) and evaluated with COCO mAP (torchmetrics ``MeanAveragePrecision``).

Batches are lists of sample dicts (:mod:`agentlit.data.coco`); images are uint8 and become
[0, 1] floats here; the detector's ``GeneralizedRCNNTransform`` resizes (short side ``min_size``,
long side at most ``max_size``), normalises with the backbone's ``pretrained_cfg`` mean/std and
pads to ``size_divisible``. Predictions come back at each image's own size.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.sampling import default_seed, mix_seed
from ..models.detection import seeded_samplers
from .base import TaskModule
from .networks import DetectionNet

__all__ = ["DetectionModule", "coco_results", "warmup_step_decay"]


_METRIC_KEYS = {"map": "mAP", "map_50": "mAP50", "map_75": "mAP75", "map_small": "mAP_s", "map_medium": "mAP_m",
                "map_large": "mAP_l"}


def warmup_step_decay(
    steps_per_epoch: int, warmup_steps: int = 500, warmup_factor: float = 1e-3,
    milestones: Sequence[int] = (8, 11), gamma: float = 0.1,
) -> Callable[[int], float]:
    """mmdet's detection schedule as an lr multiplier of the optimizer step: linear warm-up from
    ``warmup_factor`` over ``warmup_steps``, times ``gamma`` at the start of each epoch in ``milestones``.

    Args:
        steps_per_epoch: optimizer steps per epoch.
        warmup_steps: warm-up length in steps.
        warmup_factor: multiplier at step 0.
        milestones: epochs (0-based starts) at which the lr is multiplied by ``gamma``.
        gamma: decay factor.
    """

    def factor(step: int) -> float:
        warm = warmup_factor + (1 - warmup_factor) * step / warmup_steps if step < warmup_steps else 1.0
        epoch = step // max(1, steps_per_epoch)
        return warm * gamma ** sum(epoch >= m for m in milestones)

    return factor


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_results(output: dict[str, Tensor], image_id: int, category_ids: Sequence[int],
                 mask_threshold: float = 0.5) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's detections as COCO result entries ``(bbox entries, segm entries)``: boxes
    ``[x, y, w, h]``, masks as RLE, labels 1..K mapped to the dataset's ``category_ids``.

    Args:
        output: a torchvision detection output (boxes, labels, scores, optional masks (N, 1, H, W)).
        image_id: the image's id.
        category_ids: dataset id of each label 1..K.
        mask_threshold: probability above which a mask pixel is set.
    """
    boxes, labels, scores = output["boxes"].cpu(), output["labels"].cpu(), output["scores"].cpu()
    bbox, segm = [], []
    masks = output.get("masks")
    for j in range(len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in boxes[j])
        entry = {"image_id": int(image_id), "category_id": int(category_ids[int(labels[j]) - 1]),
                 "score": round(float(scores[j]), 5)}
        bbox.append({**entry, "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]})
        if masks is not None:
            segm.append({**entry, "segmentation": _rle((masks[j, 0] > mask_threshold).cpu().numpy())})
    return bbox, segm


class DetectionModule(TaskModule):
    """COCO-style detection / instance segmentation with a torchvision detector over a timm backbone.

    The network is ``net`` when given (a torchvision-style detector: ``(images, targets)`` → loss dict in
    training, ``images`` → detections in eval; e.g. ``class_path: agentlit.tasks.networks.DetectionNet``);
    otherwise the flat settings ``backbone`` and ``**network`` build it with
    :class:`~agentlit.tasks.networks.DetectionNet`.

    Args:
        backbone: the default network's timm backbone with ``features_only`` support, e.g. ``agent_pvt_small``,
            ``agent_swin_tiny``, ``pvt_v1_small``.
        num_classes: object classes (background is added inside; COCO: 80).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        decay_all: decay every parameter (Agent-PVT recipe); False: no decay on norms, biases, position tables and
            agent biases (Agent-Swin recipe).
        warmup_iters: linear warm-up steps.
        warmup_ratio: lr multiplier at step 0 of the warm-up.
        milestones: epochs at which the lr is multiplied by ``gamma`` (1x: 8, 11; 3x: 27, 33).
        gamma: step decay factor.
        mask_threshold: mask probability threshold for evaluation and prediction.
        score_threshold: detections drawn by ``predict`` (the results JSON keeps all).
        class_names: names for drawing (None: the datamodule's, else label numbers).
        output_dir: where ``predict`` writes drawings and results JSON (None: ``predictions/`` in the evaluation folder,
            e.g. ``version_N/predict/predictions``); a folder an earlier predict wrote into gets a ``-1``, ``-2`` … twin.
        compile: ``torch.compile`` the network (``compiled_modules()``): false, true or {mode: ..., fullgraph: ...}.
        net: the network (None: built from ``backbone`` and ``**network``).
        **network: the default network's other settings, :class:`~agentlit.tasks.networks.DetectionNet`'s arguments:
            ``detector`` (``mask_rcnn``, ``faster_rcnn``, ``retinanet``), ``backbone_kwargs``, ``out_indices``,
            ``pretrained``, ``backbone_checkpoint``, ``out_norm``, ``fpn_channels``, ``min_size`` / ``max_size``
            (the resize), ``size_divisible``, ``anchor_sizes``, ``representation_size``, ``mask_head_channels``,
            ``roi_sampling_ratio``, ``detector_kwargs``, ``grad_checkpointing`` (recompute the backbone's activations
            in backward: less memory, same results).
    """

    task_name = "detection"
    monitor = "val/bbox_mAP"
    monitor_mode = "max"
    network_settings = ("backbone", "num_classes", "detector", "backbone_kwargs", "out_indices", "out_norm", "fpn_channels",
                        "anchor_sizes", "representation_size", "mask_head_channels", "detector_kwargs", "net")
    network_class = DetectionNet

    def __init__(
        self,
        backbone: str = "agent_pvt_tiny",
        num_classes: int = 80,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        decay_all: bool = True,
        warmup_iters: int = 500,
        warmup_ratio: float = 1e-3,
        milestones: tuple[int, ...] = (8, 11),
        gamma: float = 0.1,
        mask_threshold: float = 0.5,
        score_threshold: float = 0.5,
        class_names: list[str] | None = None,
        output_dir: str | None = None,
        compile: bool | dict[str, Any] = False,
        net: nn.Module | None = None,
        **network: Any,
    ) -> None:
        super().__init__()
        self.save_settings()
        self.checked_class_names(class_names, num_classes)
        given = self.take_network(net, dict(network, backbone=backbone))
        self.model = given if given is not None else DetectionNet(backbone=backbone, num_classes=num_classes, **network)
        heads = getattr(self.model, "roi_heads", None)
        self.with_masks = bool(heads is not None and heads.has_mask())
        self.val_metric = self._metric()
        self.test_metric = self._metric()
        self._results: dict[str, list[dict[str, Any]]] = {"bbox": [], "segm": []}

    def _metric(self) -> nn.Module:
        from torchmetrics.detection import MeanAveragePrecision

        try:
            import faster_coco_eval  # noqa: F401

            backend = "faster_coco_eval"
        except ImportError:  # pycocotools: the reference implementation, slower
            backend = "pycocotools"
        iou = ("bbox", "segm") if self.with_masks else ("bbox",)
        return MeanAveragePrecision(iou_type=iou, backend=backend)

    # -- inputs -------------------------------------------------------------------------------
    @staticmethod
    def _images(batch: list[dict[str, Any]]) -> list[Tensor]:
        return [s["image"].float() / 255 if s["image"].dtype == torch.uint8 else s["image"].float() for s in batch]

    def _train_targets(self, batch: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Targets without crowd regions (kept for evaluation only, as COCO training does)."""
        targets = []
        for s in batch:
            keep = s["iscrowd"] == 0 if "iscrowd" in s else torch.ones(len(s["labels"]), dtype=torch.bool)
            t = {"boxes": s["boxes"].as_subclass(Tensor).float()[keep], "labels": s["labels"][keep]}
            if self.with_masks:
                t["masks"] = s["masks"].as_subclass(Tensor)[keep].to(torch.uint8)
            targets.append(t)
        return targets

    # -- protocol -----------------------------------------------------------------------------
    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Training mode: ``images`` + ``targets`` → loss dict; eval mode: ``images`` → a list of
        ``{"boxes" (N, 4) xyxy, "labels", "scores", "masks" (N, 1, H, W)}`` at each image's size.

        Args:
            images: [0, 1] float images (3, H_i, W_i).
            targets: training targets (boxes, labels, masks), None in eval mode.
        """
        return self.model(images, targets)

    def example_batch(self, batch_size: int, img_size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """Random images with two random boxes (and box-shaped masks) each, as the datamodules yield.

        Args:
            batch_size: images in the batch.
            img_size: (H, W) (None: :meth:`input_size`).
        """
        from torchvision import tv_tensors

        H, W = img_size or self.input_size()
        batch = []
        for _ in range(batch_size):
            x1 = torch.randint(0, W // 2, (2,)).float()
            y1 = torch.randint(0, H // 2, (2,)).float()
            boxes = torch.stack([x1, y1, x1 + W // 4 + 1, y1 + H // 4 + 1], 1)
            masks = torch.zeros(2, H, W, dtype=torch.uint8)
            for k, (a, b, c, d) in enumerate(boxes.long().tolist()):
                masks[k, b:d, a:c] = 1
            batch.append({
                "image": tv_tensors.Image(torch.randint(0, 256, (3, H, W), dtype=torch.uint8, device=self.device)),
                "boxes": tv_tensors.BoundingBoxes(boxes.to(self.device), format="XYXY", canvas_size=(H, W)),
                "masks": tv_tensors.Mask(masks.to(self.device)),
                "labels": torch.randint(1, self.hparams.num_classes + 1, (2,), device=self.device),
                "iscrowd": torch.zeros(2, dtype=torch.int64, device=self.device),
                "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                "image_id": 0,
                "name": "example",
            })
        return batch

    def example_input(self, batch: list[dict[str, Any]]) -> tuple[Any, ...]:
        """``(images,)``: the list of [0, 1] images one eval-mode forward takes.

        Args:
            batch: a batch from :meth:`example_batch`.
        """
        return (self._images(batch),)

    def inference_step(self, batch: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Detections for the batch (caller sets eval mode and no-grad).

        Args:
            batch: a list of samples.
        """
        return self.model(self._images(batch))

    def training_loss(self, batch: list[dict[str, Any]]) -> Tensor:
        """Sum of the detector's losses (RPN + box + mask, or focal + box for RetinaNet).

        Args:
            batch: a list of samples.
        """
        return sum(self.model(self._images(batch), self._train_targets(batch)).values())

    def input_size(self) -> tuple[int, int]:
        """(short side, long-side cap): the size a landscape image is resized to (800×1333 in the recipes)."""
        transform = getattr(self.model, "transform", None)  # torchvision's resize, however the network was given
        flat = self.flat_settings()
        short = transform.min_size if transform is not None else flat["min_size"]
        short = max(short) if isinstance(short, (list, tuple)) else int(short)
        long = transform.max_size if transform is not None else flat["max_size"]
        return short, max(short, int(long))

    def at_input_size(self, size: tuple[int, int]) -> "DetectionModule":
        """This task with the detector's resize set to ``size`` (short, long); weights are not copied.

        Args:
            size: the new (H, W).
        """
        if tuple(size) == self.input_size():
            return self
        return self.with_hparams(min_size=min(size), max_size=max(size))

    # -- training -----------------------------------------------------------------------------
    def seed_samplers(self, n: int, step: int, micro: int = 0, shard: tuple[int, int] = (0, 1)) -> None:
        """Seed the RPN / RoI positive-negative sampling of the next training forward per image:
        image k of this process's ``n`` draws from (seed, step, micro-batch, sampler, its position
        ``rank + world·k`` in the global batch, the rows the training sampler dealt this rank), so
        every image draws the same on any number of processes and after a resume.

        Args:
            n: images in this process's batch.
            step: the global step.
            micro: the micro-batch within the step (gradient accumulation).
            shard: ``(rank, world size)``.
        """
        rank, world = shard
        for which, sampler in enumerate(seeded_samplers(self.model)):
            sampler.seeds = [mix_seed(default_seed(), step, micro, which, rank + world * k) for k in range(n)]

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> Tensor:
        trainer = self.trainer
        self.seed_samplers(len(batch), self.global_step, batch_idx % max(1, trainer.accumulate_grad_batches),
                           (trainer.global_rank, trainer.world_size))
        try:
            losses = self.model(self._images(batch), self._train_targets(batch))
        finally:
            for sampler in seeded_samplers(self.model):
                sampler.seeds = None  # only this forward's images
        loss = sum(losses.values())
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    def _eval_step(self, batch: list[dict[str, Any]], metric: nn.Module) -> list[dict[str, Tensor]]:
        outputs = self.model(self._images(batch))
        preds, targets = [], []
        for out, s in zip(outputs, batch):
            p = {"boxes": out["boxes"], "scores": out["scores"], "labels": out["labels"]}
            t = {"boxes": s["boxes"].as_subclass(Tensor).float(), "labels": s["labels"],
                 "iscrowd": s["iscrowd"], "area": s["area"]}
            if self.with_masks:
                p["masks"] = out["masks"][:, 0] > self.hparams.mask_threshold
                t["masks"] = s["masks"].as_subclass(Tensor).bool()
            preds.append(p)
            targets.append(t)
        metric.update(preds, targets)
        return outputs

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metric)

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metric)

    def _end_epoch(self, metric: nn.Module, prefix: str) -> None:
        res = metric.compute()
        metric.reset()
        kinds = ("bbox", "segm") if self.with_masks else ("bbox",)
        for kind in kinds:
            for key, name in _METRIC_KEYS.items():
                value = res.get(f"{kind}_{key}", res.get(key) if len(kinds) == 1 else None)
                if value is not None:
                    self.log(f"{prefix}/{kind}_{name}", value.float(), prog_bar=key == "map" and kind == "bbox")

    def on_validation_epoch_end(self) -> None:
        self._end_epoch(self.val_metric, "val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch(self.test_metric, "test")

    def setup(self, stage: str) -> None:
        self.check_data_classes(exact=False)  # before the optimizer is built or any batch is seen

    def on_predict_start(self) -> None:
        from ..predict_writers import predictions_folder

        self._results = {"bbox": [], "segm": []}
        self._predict_dir = predictions_folder(self.trainer, self.hparams.output_dir)  # never an earlier predict's
        self._predict_read, self._predict_skipped = 0, []

    # -- prediction ---------------------------------------------------------------------------
    def _category_ids(self) -> list[int]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        ids = list(getattr(dm, "category_ids", ()) or ())
        return ids if len(ids) >= self.hparams.num_classes else list(range(1, self.hparams.num_classes + 1))

    def _names(self) -> list[str]:
        if self.hparams.class_names:
            return list(self.hparams.class_names)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "class_names", ()) or ())
        return names if len(names) >= self.hparams.num_classes else [str(k) for k in range(1, self.hparams.num_classes + 1)]

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[str]:
        """Draws each image's detections above ``score_threshold`` (boxes, class names, scores, masks;
        :func:`~agentlit.predict_writers.detection_image`) into ``<predictions folder>/<name>.png`` and
        collects COCO results for every detection; returns the paths. Inputs marked ``unreadable``
        (``skip_bad_images``) are counted, not predicted."""
        from ..models.segmentation import palette
        from ..predict_writers import detection_image

        self._predict_read += len(batch)
        self._predict_skipped += [s.get("file", s["name"]) for s in batch if s.get("unreadable")]
        batch = [s for s in batch if not s.get("unreadable")]
        if not batch:
            return []
        outputs = self.model(self._images(batch))
        names, ids, colours = self._names(), self._category_ids(), palette(self.hparams.num_classes + 1)
        written = []
        for out, s in zip(outputs, batch):
            bbox, segm = coco_results(out, s["image_id"], ids, self.hparams.mask_threshold)
            self._results["bbox"] += bbox
            self._results["segm"] += segm
            keep = out["scores"] >= self.hparams.score_threshold  # torchvision returns them most confident first
            image = s["image"].as_subclass(Tensor).cpu()
            image = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).to(torch.uint8)
            classes = [int(c) for c in out["labels"][keep]]
            labels = [f"{names[c - 1]} {float(p):.2f}" for c, p in zip(classes, out["scores"][keep])]
            masks = (out["masks"][keep, 0] > self.hparams.mask_threshold).cpu().numpy() if "masks" in out else None
            picture = detection_image(image.permute(1, 2, 0).numpy(), out["boxes"][keep].cpu().numpy(), labels, classes,
                                      colours, masks)
            path = self._predict_dir / f"{s['name']}.png"
            picture.save(path)
            written.append(str(path))
        return written

    def on_predict_epoch_end(self) -> None:
        from ..predict_writers import predict_source, report_predictions

        out_dir = self._predict_dir
        rank = f".rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        kinds = ("bbox", "segm") if self.with_masks else ("bbox",)
        files = []
        for kind in kinds:
            (out_dir / f"results{rank}.{kind}.json").write_text(json.dumps(self._results[kind]))
            files.append(f"results{rank}.{kind}.json")
        drawn = self._predict_read - len(self._predict_skipped)
        report_predictions(self.trainer, self._predict_read, predict_source(self.trainer),
                           f"{drawn} drawings and {' + '.join(files)}", out_dir, self._predict_skipped)

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        from .optim import create_optimizer

        hp = self.hparams
        optimizer = create_optimizer(self.model, hp.lr, hp.weight_decay, tuple(hp.betas), decay_all=hp.decay_all)
        total = self.trainer.estimated_stepping_batches  # also sets up the training loader
        epochs = self.trainer.max_epochs
        if epochs is not None and epochs > 0 and math.isfinite(total):
            steps_per_epoch = max(1, int(total) // epochs)
        else:  # a step budget (max_steps): the epoch length comes from the training loader
            if not math.isfinite(self.trainer.num_training_batches):
                self.trainer.fit_loop.setup_data()
            batches = self.trainer.num_training_batches
            steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches)) if math.isfinite(batches) else 2**62
        schedule = warmup_step_decay(steps_per_epoch, hp.warmup_iters, hp.warmup_ratio, tuple(hp.milestones), hp.gamma)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
