"""Object-detection / instance-segmentation data: COCO 2017 folders and the generated instance set.

Samples are dicts of ``torchvision.tv_tensors`` (so ``transforms.v2`` moves boxes and masks with
the image)::

    {"image": Image uint8 (3, H, W), "boxes": BoundingBoxes XYXY (N, 4), "masks": Mask uint8 (N, H, W),
     "labels": int64 (N,) in 1..K, "iscrowd": int64 (N,), "area": float (N,), "image_id": int, "name": str}

Labels are contiguous (1..K, 0 is the detectors' background); ``category_ids[k-1]`` is the
dataset's own id of label k, used to write predictions back in the dataset's numbering. Crowd
regions stay in the samples (evaluation needs them); the task drops them from training targets.
A batch is the list of its samples (images differ in size; torchvision's detectors batch them).

Augmentation, seeded per (seed, epoch, index) for exact resume (see :mod:`agentlit.data.sampling`),
follows the paper's two COCO recipes; the resize itself happens in the detector's own
``GeneralizedRCNNTransform`` (a random short side per step when ``min_size`` is a list):

- ``flip`` (Agent-PVT): horizontal flip with probability ``flip_prob``.
- ``multiscale_crop`` (Agent-Swin): with probability ``crop_prob``, resize the short side to one of
  ``crop_resize`` and take a random ``crop_size`` crop (sides uniform in the range), then flip.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .base import ResumableDataModule
from .instances import INSTANCE_CLASSES, InstanceShapesDataset
from .io import PredictFolder, load_rgb, unique_names
from .sampling import EpochSeededDataset

__all__ = [
    "COCODetectionDataModule",
    "COCOInstances",
    "DetectionDataModule",
    "ImageFolderInstances",
    "InstanceShapesDataModule",
    "RandomSizeCrop",
    "build_detection_transform",
    "check_coco_annotations",
    "detection_collate",
]

_BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in real annotation files)


def detection_collate(batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch is the list of its samples (images of different sizes are not stacked)."""
    return list(batch)


def _labels_getter(sample: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    # Per-box tensors SanitizeBoundingBoxes must filter along with the boxes (masks it finds itself).
    return tuple(sample[k] for k in ("labels", "iscrowd", "area") if k in sample)


class RandomSizeCrop(v2.Transform):
    """A crop of random size (height and width each uniform in ``size_range``, clipped to the image)
    at a random position; boxes are cut to the crop (mmdet's ``RandomCrop`` with
    ``crop_type='absolute_range'``, as in Swin's detection pipeline).

    Args:
        size_range: (min, max) crop side in pixels.
    """

    def __init__(self, size_range: tuple[int, int] = (384, 600)) -> None:
        super().__init__()
        self.size_range = (int(size_range[0]), int(size_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        from torchvision.transforms.v2._utils import query_size

        H, W = query_size(flat_inputs)
        lo, hi = self.size_range
        h = int(torch.randint(min(lo, H), min(hi, H) + 1, ()))
        w = int(torch.randint(min(lo, W), min(hi, W) + 1, ()))
        top = int(torch.randint(0, H - h + 1, ()))
        left = int(torch.randint(0, W - w + 1, ()))
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.crop, inpt, **params)


def build_detection_transform(
    augment: Literal["flip", "multiscale_crop", "none"] = "flip",
    flip_prob: float = 0.5,
    crop_prob: float = 0.5,
    crop_resize: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    max_size: int = 1333,
) -> v2.Transform:
    """The training pipeline of one recipe (ends with box clamping and sanitising: boxes cut to
    nothing by a crop are dropped with their labels, masks, crowd flags and areas).

    Args:
        augment: ``flip`` (Agent-PVT recipe), ``multiscale_crop`` (Agent-Swin recipe) or ``none``.
        flip_prob: horizontal-flip probability.
        crop_prob: probability of the resize + crop branch (``multiscale_crop``).
        crop_resize: short sides the crop branch first resizes to.
        crop_size: (min, max) crop side of the crop branch.
        max_size: long-side limit of the crop branch's resize.
    """
    if augment not in ("flip", "multiscale_crop", "none"):
        raise ValueError(f"augment={augment!r} is not one of 'flip' (Agent-PVT recipe), 'multiscale_crop' (Agent-Swin recipe), 'none'")
    steps: list[v2.Transform] = []
    if augment == "multiscale_crop":
        crop = v2.Compose([v2.RandomShortestSize(list(crop_resize), max_size=max_size), RandomSizeCrop(tuple(crop_size))])
        steps.append(v2.RandomApply([crop], p=crop_prob))
    if augment != "none" and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_getter)]
    return v2.Compose(steps)


# ----------------------------------------------------------------------------- COCO files
def _fail(ann_file: Path, what: str) -> ValueError:
    return ValueError(f"{ann_file}: {what}")


def check_coco_annotations(data: dict[str, Any], ann_file: Path, image_dir: Path, check_files: bool = True) -> None:
    """Checks a parsed COCO instances file; the first problem raises a one-line ValueError naming the
    file, the annotation / image and what would be valid.

    Args:
        data: the parsed JSON.
        ann_file: its path (for the messages).
        image_dir: the folder the images' ``file_name`` are relative to.
        check_files: also check that every listed image file exists.
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _fail(ann_file, f"no '{key}' list; a COCO instances file has 'images', 'annotations' and 'categories'")
    if not data["categories"]:
        raise _fail(ann_file, "'categories' is empty; list the object classes as {\"id\": int, \"name\": str}")
    images = {}
    for img in data["images"]:
        if not all(k in img for k in ("id", "file_name", "height", "width")):
            raise _fail(ann_file, f"image entry {img} lacks one of id, file_name, height, width")
        images[img["id"]] = img
        if check_files and not (image_dir / img["file_name"]).is_file():
            raise _fail(ann_file, f"image {img['file_name']!r} (id {img['id']}) does not exist in {image_dir}; "
                                  "add the file or remove the image and its annotations")
    cat_ids = {c["id"] for c in data["categories"]}
    degenerate: list[Any] = []
    for ann in data["annotations"]:
        aid = ann.get("id", "?")
        if ann.get("image_id") not in images:
            raise _fail(ann_file, f"annotation {aid} refers to image_id {ann.get('image_id')!r}, which is not in 'images'; "
                                  "add the image entry or remove the annotation")
        if ann.get("category_id") not in cat_ids:
            raise _fail(ann_file, f"annotation {aid} has unknown category_id {ann.get('category_id')!r}; "
                                  f"valid ids (from 'categories'): {sorted(cat_ids)}")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4):
            raise _fail(ann_file, f"annotation {aid} has bbox {box!r}; expected [x, y, width, height]")
        x, y, w, h = (float(v) for v in box)
        img = images[ann["image_id"]]
        H, W, t = img["height"], img["width"], _BOX_TOLERANCE
        if not (w > 0 and h > 0):
            raise _fail(ann_file, f"annotation {aid} (image {img['file_name']}) has bbox {box} with non-positive size; "
                                  "width and height must be > 0 (remove the annotation or fix the box)")
        if x < -t or y < -t or x + w > W + t or y + h > H + t:
            raise _fail(ann_file, f"annotation {aid} (image {img['file_name']}, {W}x{H}) has bbox {box} outside the image; "
                                  f"boxes [x, y, w, h] must lie within 0..{W} x 0..{H}")
        seg = ann.get("segmentation")
        if isinstance(seg, list):  # polygons (RLE dicts are pycocotools' own and checked by it)
            if not all(isinstance(poly, list) and len(poly) % 2 == 0
                       and all(isinstance(v, (int, float)) for v in poly) for poly in seg):
                raise _fail(ann_file, f"annotation {aid} (image {img['file_name']}) has a segmentation that is not a "
                                      "list of polygons [x1, y1, x2, y2, ...] with an even number of coordinates")
            kept = [poly for poly in seg if len(poly) >= 6]
            if len(kept) < len(seg):  # fewer than 3 points: no area (pycocotools would fail on it)
                degenerate.append(aid)
                ann["segmentation"] = kept or None
        if not ann.get("segmentation"):
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]  # box-only annotation: the box as mask
    if degenerate:
        warnings.warn(f"{ann_file}: dropped polygons with fewer than 3 points from {len(degenerate)} annotation(s) "
                      f"(e.g. annotation {degenerate[0]}); an annotation left without a polygon uses its box as mask",
                      stacklevel=2)


def read_coco(ann_file: str | Path, image_dir: str | Path) -> dict[str, Any]:
    """Parse and check a COCO instances file; missing file / malformed JSON / bad entries raise
    one-line errors.

    Args:
        ann_file: ``annotations/instances_<split>.json``.
        image_dir: the split's image folder.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"annotation file {ann_file} does not exist; the COCO 2017 layout is root/annotations/instances_<split>.json "
            "with the images in root/<split>/ (set train_split / val_split for other names)"
        )
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist (images of {ann_file.name} go in root/<split>/)")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{ann_file} is not valid JSON ({err}); expected a COCO instances file") from err
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: top level is a {type(data).__name__}, expected a COCO object with 'images', 'annotations', 'categories'")
    check_coco_annotations(data, ann_file, image_dir)
    return data


class _CocoImages(CocoDetection):
    """torchvision's CocoDetection reading its images through :func:`~agentlit.data.io.load_rgb`: a
    truncated, corrupt or oversized file is a one-line error naming it."""

    def _load_image(self, id: int) -> Any:  # noqa: A002  (torchvision's signature)
        return load_rgb(Path(self.root) / self.coco.loadImgs(id)[0]["file_name"], skippable=False)


class COCOInstances(Dataset):
    """One COCO split through torchvision's ``CocoDetection`` wrapped for ``transforms.v2``.

    Args:
        image_dir: the split's image folder.
        data: the checked annotation dict (:func:`read_coco`).
        category_ids: dataset category id of each contiguous label 1..K.
        transform: applied to the sample dict (None: none).
    """

    def __init__(self, image_dir: str | Path, data: dict[str, Any], category_ids: Sequence[int], transform: Any = None) -> None:
        from pycocotools.coco import COCO
        from torchvision.datasets import wrap_dataset_for_transforms_v2

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
        # CocoDetection would parse the JSON a second time: hand it the already checked index instead.
        base = _CocoImages.__new__(_CocoImages)
        base.root, base.coco, base.ids = str(image_dir), coco, sorted(coco.imgs.keys())
        base.transform = base.target_transform = base.transforms = None
        self.base = base
        self.dataset = wrap_dataset_for_transforms_v2(
            base, target_keys={"image_id", "boxes", "masks", "labels", "iscrowd", "area"}
        )
        self.label_of = {int(c): k + 1 for k, c in enumerate(category_ids)}
        self.transform = transform
        self.ids = base.ids
        files = [coco.imgs[i]["file_name"] for i in self.ids]
        self.names = unique_names(files, ".")  # a.jpg and a.png in one split: distinct prediction files

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, target = self.dataset[i]
        image = TF.to_image(image)  # PIL RGB (grayscale files converted by CocoDetection) → uint8 (3, H, W)
        H, W = image.shape[-2:]
        info = self.base.coco.imgs[self.ids[i]]
        sample: dict[str, Any] = {"image": image, "image_id": int(self.ids[i]), "name": self.names[i]}
        if "boxes" in target:
            sample["boxes"] = target["boxes"]
            sample["masks"] = tv_tensors.Mask(target["masks"].to(torch.uint8))
            sample["labels"] = torch.tensor([self.label_of[int(c)] for c in target["labels"]], dtype=torch.int64)
            sample["iscrowd"] = torch.as_tensor(target["iscrowd"], dtype=torch.int64)
            sample["area"] = torch.as_tensor(target["area"], dtype=torch.float32)
        else:  # an image without annotations
            sample["boxes"] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(H, W))
            sample["masks"] = tv_tensors.Mask(torch.zeros(0, H, W, dtype=torch.uint8))
            sample["labels"] = torch.zeros(0, dtype=torch.int64)
            sample["iscrowd"] = torch.zeros(0, dtype=torch.int64)
            sample["area"] = torch.zeros(0)
        sample["boxes"] = TF.clamp_bounding_boxes(sample["boxes"])  # boxes within the tolerance of the border
        return self.transform(sample) if self.transform is not None else sample


class ImageFolderInstances(PredictFolder):
    """The images under a folder (searched recursively, no annotations), for ``predict``: items
    ``{"image": uint8 (3, H, W), "image_id": i, "name", "file"}`` (:class:`~agentlit.data.io.PredictFolder`).

    Args:
        folder: the image folder.
        skip_bad: skip unreadable images (named in a warning, marked ``unreadable``) instead of stopping.
    """

    def __init__(self, folder: str | Path, skip_bad: bool = False) -> None:
        super().__init__(folder, lambda image: {"image": TF.to_image(image)}, skip_bad)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**super().__getitem__(i), "image_id": i}


# ----------------------------------------------------------------------------- data modules
class DetectionDataModule(ResumableDataModule):
    """Shared loaders, augmentation and class bookkeeping; subclasses build the datasets.

    Args:
        batch_size: training images per device (the paper's recipes: 2 per GPU × 8 GPUs).
        val_batch_size: evaluation images per batch.
        num_workers: loader worker processes.
        augment: training recipe: ``flip`` (Agent-PVT), ``multiscale_crop`` (Agent-Swin) or ``none``.
        flip_prob: horizontal-flip probability.
        crop_prob: probability of the resize + random-crop branch of ``multiscale_crop``.
        crop_resize: short sides that branch resizes to before cropping.
        crop_size: (min, max) side of that branch's crop.
        predict_root: folder of images for ``predict``, searched recursively (None: the validation set).
        skip_bad_images: ``predict`` skips unreadable images (named in a warning and counted) instead of stopping.
        seed: augmentation seed (None: the run's ``seed_everything`` value).
    """

    class_names: tuple[str, ...] = ()
    category_ids: tuple[int, ...] = ()

    def __init__(
        self,
        batch_size: int = 2,
        val_batch_size: int = 2,
        num_workers: int = 2,
        augment: Literal["flip", "multiscale_crop", "none"] = "flip",
        flip_prob: float = 0.5,
        crop_prob: float = 0.5,
        crop_resize: tuple[int, ...] = (400, 500, 600),
        crop_size: tuple[int, int] = (384, 600),
        predict_root: str | None = None,
        skip_bad_images: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.seed, self.predict_root, self.skip_bad_images = seed, predict_root, skip_bad_images
        self.train_transform = build_detection_transform(augment, flip_prob, crop_prob, crop_resize, crop_size)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Object classes (background not counted)."""
        return len(self.class_names)

    def build_datasets(self, with_train: bool = True) -> tuple[Dataset | None, Dataset]:
        """(training set without augmentation, or None when ``with_train`` is False; validation set).

        Args:
            with_train: also build the training set (only ``fit`` needs it).
        """
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_root is not None:
            return  # a plain folder of images: the dataset need not be there
        with_train = stage in (None, "fit")  # evaluation never reads (or checks) the training split
        if self.val_set is None or (with_train and self.train_set is None):
            train, self.val_set = self.build_datasets(with_train)
            if train is not None:
                self.train_set = EpochSeededDataset(train, self.train_transform, self.seed)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, collate_fn=detection_collate)

    def _eval(self, dataset: Dataset) -> DataLoader:
        return self.eval_loader(dataset, batch_size=self.val_batch_size, collate_fn=detection_collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_root is None:
            return self._eval(self.val_set)
        return self._eval(ImageFolderInstances(self.predict_root, self.skip_bad_images))


class COCODetectionDataModule(DetectionDataModule):
    """A COCO 2017 folder: ``root/annotations/instances_<split>.json`` and the images in
    ``root/<split>/``. Labels 1..K follow the training file's category ids in ascending order
    (``category_ids``); predictions are written with the dataset's ids. Images without any
    annotation are left out of training (``filter_empty_train``, as mmdet) but evaluated.

    Args:
        root: the dataset folder.
        train_split: training split name.
        val_split: validation / test split name.
        filter_empty_train: drop training images that have no annotation at all.
        **kwargs: :class:`DetectionDataModule` arguments (batch_size, augment, …).
    """

    def __init__(self, root: str, train_split: str = "train2017", val_split: str = "val2017",
                 filter_empty_train: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.root = Path(root)
        self._data: dict[str, dict[str, Any]] = {}
        self._categories: tuple[tuple[int, ...], tuple[str, ...]] | None = None  # read on first use, so that
        # commands that never touch the data (``agentlit profile``) work without the dataset

    @property
    def category_ids(self) -> tuple[int, ...]:  # type: ignore[override]
        """Dataset id of each label 1..K (ascending ids of the training file)."""
        return self._load_categories()[0]

    @property
    def class_names(self) -> tuple[str, ...]:  # type: ignore[override]
        """Category names in label order."""
        return self._load_categories()[1]

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self._data:
            self._data[split] = read_coco(self.root / "annotations" / f"instances_{split}.json", self.root / split)
        return self._data[split]

    def _load_categories(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        if self._categories is None:
            hp = self.hparams
            if not self.root.is_dir():
                raise FileNotFoundError(
                    f"COCO root {self.root} does not exist; expected {self.root}/annotations/instances_{hp.train_split}.json "
                    f"and the images in {self.root}/{hp.train_split}/ (and likewise for {hp.val_split})"
                )
            first = hp.train_split if (self.root / "annotations" / f"instances_{hp.train_split}.json").exists() else hp.val_split
            cats = sorted(self._split(first)["categories"], key=lambda c: c["id"])
            self._categories = (tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats))
        return self._categories

    def build_datasets(self, with_train: bool = True) -> tuple[Dataset | None, Dataset]:
        hp = self.hparams
        val = self._split(hp.val_split)
        unknown = sorted({c["id"] for c in val["categories"]} - set(self.category_ids))
        if unknown:
            raise ValueError(f"{self.root}/annotations/instances_{hp.val_split}.json has category ids {unknown} that "
                             f"instances_{hp.train_split}.json lacks; both splits must share one category list")
        val_set = COCOInstances(self.root / hp.val_split, val, self.category_ids)
        if not with_train:
            return None, val_set
        train = dict(self._split(hp.train_split))
        if hp.filter_empty_train:
            used = {a["image_id"] for a in train["annotations"]}
            train["images"] = [img for img in train["images"] if img["id"] in used]
        return COCOInstances(self.root / hp.train_split, train, self.category_ids), val_set


class InstanceShapesDataModule(DetectionDataModule):
    """The generated instance set (:mod:`agentlit.data.instances`), deterministic by ``seed``:
    training samples are stream indices 0..num_train−1, validation starts at 1,000,000.

    Args:
        num_train: training images.
        num_val: validation (and test) images.
        img_size: image side.
        seed: the set's seed (also the augmentation seed).
        classes: shape classes used (label k = classes[k-1]).
        num_shapes: inclusive range of shapes per image.
        radius: shape radius range as a fraction of ``img_size``.
        noise: std of the pixel noise.
        shape_contrast: texture contrast inside shapes.
        background_contrast: texture contrast of the background.
        hue_jitter: hue band half-width of each class (0.5: colour says nothing about the class).
        min_visible: an occluded shape stays an instance if at least this fraction of it is visible.
        **kwargs: :class:`DetectionDataModule` arguments (batch_size, augment, …).
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 200,
        img_size: int = 128,
        seed: int = 0,
        classes: tuple[str, ...] = INSTANCE_CLASSES,
        num_shapes: tuple[int, int] = (1, 4),
        radius: tuple[float, float] = (0.1, 0.25),
        noise: float = 0.03,
        shape_contrast: float = 1.0,
        background_contrast: float = 1.0,
        hue_jitter: float = 0.5,
        min_visible: float = 0.5,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("num_workers", 0)
        super().__init__(**kwargs)
        self.save_hyperparameters()
        unknown = [c for c in classes if c not in INSTANCE_CLASSES]
        if unknown or not classes:
            raise ValueError(f"classes={list(classes)}: unknown {unknown}; choose a non-empty subset of {list(INSTANCE_CLASSES)}")
        self.class_names = tuple(classes)
        self.category_ids = tuple(range(1, len(classes) + 1))

    def render_kwargs(self) -> dict[str, Any]:
        hp = self.hparams
        return dict(classes=tuple(hp.classes), num_shapes=tuple(hp.num_shapes), radius=tuple(hp.radius), noise=hp.noise,
                    shape_contrast=hp.shape_contrast, background_contrast=hp.background_contrast,
                    hue_jitter=hp.hue_jitter, min_visible=hp.min_visible)

    def build_datasets(self, with_train: bool = True) -> tuple[Dataset | None, Dataset]:
        hp = self.hparams
        train = None if not with_train else InstanceShapesDataset(hp.num_train, hp.img_size, hp.seed, 0, "train", **self.render_kwargs())
        val = InstanceShapesDataset(hp.num_val, hp.img_size, hp.seed, 1_000_000, "val", **self.render_kwargs())
        return train, val
