"""Semantic-segmentation data: ADE20K's official layout, any image/mask folder pair, and a
generated shapes set (the default, nothing to download).

Samples are dicts ``{"image": float (3, H, W) normalised, "mask": int64 (H, W), "name": str,
"orig_size": (H, W)}``; masks carry ``ignore_index`` (255) on unlabeled pixels. Evaluation keeps
masks at their original size (the model's prediction is resized back), so an evaluation batch of
differently sized images is a list (see :func:`seg_collate`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .base import ResumableDataModule
from .io import IMG_EXTENSIONS, PredictFolder, image_files, load_rgb, open_image, unique_names
from .sampling import EpochSeededDataset
from .seg_transforms import build_eval_transform, build_train_transform
from .shapes import SHAPE_CLASSES, render_shapes

__all__ = [
    "ADE20K_CLASSES",
    "ADE20KDataModule",
    "FolderSegmentationDataModule",
    "SegFolderDataset",
    "SegmentationDataModule",
    "ShapesDataModule",
    "ShapesDataset",
    "check_mask_labels",
    "seg_collate",
]

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


# ----------------------------------------------------------------------------- reading and checks
def read_image(path: str | Path) -> Tensor:
    """Any common image mode (see :func:`~agentlit.data.io.load_rgb`) → float (3, H, W) in [0, 255];
    an unreadable file raises an error naming it."""
    arr = np.asarray(load_rgb(path, skippable=False), dtype=np.float32)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_mask(path: str | Path) -> np.ndarray:
    """Label PNG (mode L, P or I) → int64 (H, W) of raw label values (a palette PNG gives its indices);
    an unreadable file raises an error naming it."""
    im = open_image(path, "mask")
    if im.mode not in ("L", "P", "I", "I;16", "1"):
        raise ValueError(
            f"mask {path} has mode {im.mode!r}; expected a single-channel label image (mode L, P or I) "
            "whose pixel values are class indices"
        )
    return np.asarray(im, dtype=np.int64)


def check_mask_labels(
    raw: np.ndarray, path: str | Path, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False
) -> Tensor:
    """Map raw labels (reduce-zero-label: 0 → ignore, k → k−1) and check them: every label must be
    in [0, num_classes) or the ignore index, else a ValueError naming the file and the bad labels."""
    mask = raw.copy()
    if reduce_zero_label:
        mask = mask - 1
        mask[raw == 0] = ignore_index
        mask[raw == ignore_index] = ignore_index  # mmseg keeps 255 as ignore
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        raw_bad = np.unique(raw[np.isin(mask, bad)])
        shift = " (after reduce_zero_label: raw 0 → ignore, raw k → k-1)" if reduce_zero_label else ""
        raise ValueError(
            f"mask {path} has labels {raw_bad.tolist()[:20]} outside [0, {num_classes}) and not the ignore index "
            f"{ignore_index}{shift}; valid raw labels are "
            + (f"0..{num_classes} (0 = unlabeled)" if reduce_zero_label else f"0..{num_classes - 1} and {ignore_index}")
            + ". Check num_classes / reduce_zero_label / ignore_index."
        )
    return torch.from_numpy(mask)


def list_images(folder: str | Path) -> list[Path]:
    """The images directly in ``folder`` (:func:`~agentlit.data.io.image_files`, not recursive: images
    pair with masks by file stem), or an error naming the folder when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = image_files(folder, recursive=False)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {folder}")
    return files


def seg_collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images/masks when every sample has the same size, else keep lists (evaluation at
    original sizes); other keys become lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


# ----------------------------------------------------------------------------- datasets
class SegFolderDataset(Dataset):
    """Images in ``image_dir`` paired by file stem with label PNGs in ``mask_dir`` (``mask_dir=None``:
    images only, for prediction). Samples are named by their stem; images whose stems collide
    (``a.png`` / ``a.jpg``) are named by their file name instead, so predictions never overwrite
    each other (with masks such a pair is an error: both would pair with the same mask)."""

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path | None,
        num_classes: int,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        mask_suffix: str = ".png",
    ) -> None:
        self.images = list_images(image_dir)
        self.names = unique_names(self.images, image_dir)
        self.masks: list[Path] | None = None
        if mask_dir is not None:
            stems: dict[str, Path] = {}
            for p in self.images:
                if p.stem in stems:
                    raise ValueError(
                        f"images {stems[p.stem].name} and {p.name} in {image_dir} share the stem '{p.stem}', so both "
                        f"would pair with the mask {p.stem}{mask_suffix}; rename or remove one of them"
                    )
                stems[p.stem] = p
            mask_dir = Path(mask_dir)
            if not mask_dir.is_dir():
                raise FileNotFoundError(f"mask folder {mask_dir} does not exist (images are in {image_dir})")
            self.masks = [mask_dir / (p.stem + mask_suffix) for p in self.images]
            missing = [str(m) for m in self.masks if not m.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(self.images)} images in {image_dir} have no mask in {mask_dir} "
                    f"(expected <image stem>{mask_suffix}), e.g. {missing[:3]}"
                )
        self.num_classes, self.transform = num_classes, transform
        self.ignore_index, self.reduce_zero_label = ignore_index, reduce_zero_label

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = read_image(self.images[i])
        sample: dict[str, Any] = {"image": image, "name": self.names[i], "orig_size": tuple(image.shape[-2:])}
        if self.masks is not None:
            raw = read_mask(self.masks[i])
            if raw.shape != tuple(image.shape[-2:]):
                raise ValueError(
                    f"image {self.images[i]} is {tuple(image.shape[-2:])} (H, W) but its mask {self.masks[i]} is "
                    f"{raw.shape}; image and mask must have the same size"
                )
            sample["mask"] = check_mask_labels(
                raw, self.masks[i], self.num_classes, self.ignore_index, self.reduce_zero_label
            )
        return self.transform(sample) if self.transform else sample


class ShapesDataset(Dataset):
    """``length`` generated samples (see :func:`agentlit.data.shapes.render_shapes`), indices
    ``offset .. offset+length-1`` of the stream ``seed``; rendered once and cached."""

    def __init__(
        self,
        length: int,
        img_size: int = 64,
        seed: int = 0,
        offset: int = 0,
        num_shapes: tuple[int, int] = (1, 4),
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        split: str = "train",
        **render_kwargs: Any,
    ) -> None:
        self.length, self.img_size, self.seed, self.offset = length, img_size, seed, offset
        self.num_shapes, self.transform, self.split = tuple(num_shapes), transform, split
        self.render_kwargs = render_kwargs  # radius, noise, shape_contrast, background_contrast
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i not in self._cache:
            self._cache[i] = render_shapes(self.offset + i, self.img_size, self.seed, self.num_shapes, **self.render_kwargs)
        img, mask = self._cache[i]
        sample = {
            "image": torch.from_numpy(img).permute(2, 0, 1).float(),
            "mask": torch.from_numpy(mask.astype(np.int64)),
            "name": f"shapes_{self.split}_{i:05d}",
            "orig_size": (self.img_size, self.img_size),
        }
        return self.transform(sample) if self.transform else sample


# ----------------------------------------------------------------------------- data modules
class SegmentationDataModule(ResumableDataModule):
    """Shared loaders and the mmseg train/eval pipelines; subclasses build the datasets (training
    sets without a transform: augmentation is applied, seeded per (epoch, index), here).

    Args:
        batch_size: training images per device (the paper's recipes: 2 per GPU × 8 GPUs).
        val_batch_size: evaluation batch (1 when images differ in size).
        num_workers: DataLoader worker processes per device.
        crop_size: side of the square training crop.
        scale: keep-ratio (long, short) resize target before the random scale (None: relative to the image).
        ratio_range: random scale range applied to ``scale`` (or to the image size).
        cat_max_ratio: crop retry threshold: re-draw crops where one class covers more than this share.
        flip_prob: probability of a horizontal flip.
        photometric: photometric distortion (brightness, contrast, saturation, hue) on/off.
        ignore_index: label of unlabeled pixels (padding included).
        predict_root: folder of images for ``predict``, searched recursively (None: the validation images).
        skip_bad_images: ``predict`` skips unreadable images (named in a warning and counted) instead of stopping.
        seed: augmentation seed (None: the run's ``seed_everything`` value).
    """

    class_names: tuple[str, ...] = ()

    def __init__(
        self,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 4,
        crop_size: int = 512,
        scale: tuple[int, int] | None = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
        predict_root: str | None = None,
        skip_bad_images: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.seed = seed
        self.crop_size, self.scale, self.ignore_index = crop_size, scale, ignore_index
        self.predict_root, self.skip_bad_images = predict_root, skip_bad_images
        self.train_transform = build_train_transform(
            crop_size, scale, ratio_range, cat_max_ratio, flip_prob, photometric, ignore_index
        )
        self.eval_transform = build_eval_transform(scale)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_root is not None:
            return  # a plain folder of images: the dataset need not be there
        if self.val_set is None:
            train, self.val_set = self.build_datasets()
            self.train_set = EpochSeededDataset(train, self.train_transform, self.seed)

    def train_dataloader(self) -> DataLoader:
        # Resumable, rank-split shuffling; drop_last: BatchNorm in the heads needs > 1 sample per batch.
        return self.train_loader(self.train_set, collate_fn=seg_collate)

    def _eval(self, dataset: Dataset) -> DataLoader:
        return self.eval_loader(dataset, batch_size=self.val_batch_size, collate_fn=seg_collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_root is None:
            return self._eval(self.val_set)

        def sample(image: Any) -> dict[str, Any]:  # RGB image → the evaluation sample, as for a validation image
            x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W) in [0, 255]
            return self.eval_transform({"image": x, "orig_size": tuple(x.shape[-2:])})

        return self._eval(PredictFolder(self.predict_root, sample, self.skip_bad_images))


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K (SceneParsing / ADEChallengeData2016): ``root/images/{training,validation}/*.jpg``,
    ``root/annotations/{training,validation}/*.png``; 150 classes, raw label 0 ("other") → ignore and
    k → k−1 (reduce-zero-label). Defaults are the paper's pipeline: resize into (2048, 512) × U(0.5, 2),
    512² crops with cat_max_ratio 0.75, flip, photometric distortion; evaluation at short side 512.

    Args:
        root: the ADE20K folder (``ADEChallengeData2016`` or its parent).
        **kwargs: the loader and pipeline settings of :class:`SegmentationDataModule`.
    """

    class_names = ADE20K_CLASSES

    def __init__(self, root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.save_hyperparameters()

    def _resolve_root(self) -> Path:
        for cand in (self.root, self.root / "ADEChallengeData2016"):
            if (cand / "images" / "training").is_dir() and (cand / "annotations" / "training").is_dir():
                return cand
        raise FileNotFoundError(
            f"ADE20K root {self.root} lacks the official layout: expected images/{{training,validation}}/*.jpg and "
            "annotations/{training,validation}/*.png (ADEChallengeData2016)"
        )

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        root = self._resolve_root()

        def split(name: str, transform: Callable) -> SegFolderDataset:
            return SegFolderDataset(
                root / "images" / name, root / "annotations" / name, 150, transform, self.ignore_index, reduce_zero_label=True
            )

        return split("training", None), split("validation", self.eval_transform)


class FolderSegmentationDataModule(SegmentationDataModule):
    """Any dataset as image folders + label-PNG folders (paired by file stem) + a class-names file
    (one name per line; line k = label k).

    Args:
        train_images: folder of training images.
        train_masks: folder of training label PNGs (same stems as the images).
        val_images: folder of validation images.
        val_masks: folder of validation label PNGs.
        class_names: a file with one class name per line (line k = label k), or the list of names.
        reduce_zero_label: label 0 means unlabeled (→ ignore) and k → k−1, as in ADE20K.
        mask_suffix: file ending of the masks (``<image stem><mask_suffix>``).
        **kwargs: the loader and pipeline settings of :class:`SegmentationDataModule`.
    """

    def __init__(
        self,
        train_images: str,
        train_masks: str,
        val_images: str,
        val_masks: str,
        class_names: str | list[str],
        reduce_zero_label: bool = False,
        mask_suffix: str = ".png",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if isinstance(class_names, str):
            path = Path(class_names)
            if not path.is_file():
                raise FileNotFoundError(f"class-names file {path} does not exist (one class name per line)")
            class_names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if not class_names:
            raise ValueError("class_names is empty: give a file with one class name per line, or a list")
        self.class_names = tuple(class_names)
        self.reduce_zero_label, self.mask_suffix = reduce_zero_label, mask_suffix

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        hp = self.hparams

        def split(images: str, masks: str, transform: Callable) -> SegFolderDataset:
            return SegFolderDataset(
                images, masks, self.num_classes, transform, self.ignore_index, self.reduce_zero_label, self.mask_suffix
            )

        return split(hp.train_images, hp.train_masks, None), split(hp.val_images, hp.val_masks, self.eval_transform)


class ShapesDataModule(SegmentationDataModule):
    """The generated shapes set (6 classes: background + 5 shapes), deterministic by ``seed``.

    Training samples are indices 0..num_train−1 of the stream, validation samples start at
    1,000,000 (so changing ``num_train`` never changes the validation set). Training uses the
    joint pipeline with scale relative to the image (× U(ratio_range)), cropped back to ``img_size``.
    The rendering arguments set the difficulty (see :func:`agentlit.data.shapes.render_shapes`).

    Args:
        num_train: training samples.
        num_val: validation samples.
        img_size: side of the square images (and of the training crop).
        seed: the stream of generated samples (same seed, same images).
        num_shapes: inclusive (min, max) shapes per image (later ones occlude earlier ones).
        radius: (min, max) shape radius as a fraction of the image side.
        noise: standard deviation of the additive Gaussian pixel noise.
        shape_contrast: texture contrast inside the shapes.
        background_contrast: texture contrast of the background.
        hue_jitter: class k's hue is (k−1)/5 ± hue_jitter (0.5: colour carries no class information).
        batch_size: training images per batch and device.
        val_batch_size: evaluation images per batch.
        num_workers: DataLoader worker processes per device.
        ratio_range: random scale range of the training pipeline (relative to the image).
        cat_max_ratio: crop retry threshold (1.0: off).
        flip_prob: probability of a horizontal flip.
        photometric: photometric distortion on/off.
        predict_root: folder of images for ``predict``, searched recursively (None: the validation images).
        skip_bad_images: ``predict`` skips unreadable images (named in a warning and counted) instead of stopping.
    """

    class_names = SHAPE_CLASSES

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 200,
        img_size: int = 64,
        seed: int = 0,
        num_shapes: tuple[int, int] = (1, 4),
        radius: tuple[float, float] = (0.12, 0.3),
        noise: float = 0.04,
        shape_contrast: float = 1.0,
        background_contrast: float = 1.0,
        hue_jitter: float = 0.5,
        batch_size: int = 16,
        val_batch_size: int = 50,
        num_workers: int = 0,
        ratio_range: tuple[float, float] = (0.75, 1.5),
        cat_max_ratio: float = 1.0,
        flip_prob: float = 0.5,
        photometric: bool = True,
        predict_root: str | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            crop_size=img_size,
            scale=None,
            ratio_range=ratio_range,
            cat_max_ratio=cat_max_ratio,
            flip_prob=flip_prob,
            photometric=photometric,
            predict_root=predict_root,
            skip_bad_images=skip_bad_images,
        )
        self.save_hyperparameters()

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        hp = self.hparams
        render = dict(radius=tuple(hp.radius), noise=hp.noise, shape_contrast=hp.shape_contrast,
                      background_contrast=hp.background_contrast, hue_jitter=hp.hue_jitter)
        train = ShapesDataset(hp.num_train, hp.img_size, hp.seed, 0, hp.num_shapes, None, "train", **render)
        val = ShapesDataset(hp.num_val, hp.img_size, hp.seed, 1_000_000, hp.num_shapes, self.eval_transform, "val", **render)
        return train, val
