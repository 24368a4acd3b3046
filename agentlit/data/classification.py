"""Classification DataModules. Every one yields batches ``(images (B, 3, H, W) float, labels (B,) long)``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .base import ResumableDataModule
from .io import IMG_EXTENSIONS, BadImageError, PredictFolder, image_files, load_rgb, predict_files, warn_unreadable
from .sampling import EpochSeededDataset

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "IMG_EXTENSIONS", "LabeledImages", "PredictImages", "find_images"]


class DigitsDataModule(ResumableDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), no download.

    Images are upsampled to ``img_size`` (bilinear), replicated to 3 channels and normalised to
    [-1, 1]. A fixed, seeded, class-stratified split holds out ``val_fraction`` of the images;
    the digits set has no separate test split, so ``test`` and ``predict`` use the held-out part.
    Training adds a small random affine jitter (``augment``). ``channels: 1`` keeps one grey
    channel (what a digits generator models) instead of replicating it to RGB.

    ``predict_root``: predict a folder of your own digit images instead (searched recursively, any
    format, size or colour mode): each is read as grayscale, resized (shorter side) and centre-cropped
    to ``img_size`` and normalised like the training images, so draw light digits on a dark ground
    as the bundled set does. Predict batches are dicts ``{"image", "index"}`` (plus ``"target"`` for
    the held-out part), so ``predictions.csv`` can name every item.

    Args:
        img_size: side of the square images the 8×8 digits are upsampled to.
        batch_size: images per batch and device.
        val_fraction: share of the images held out for validation / test / predict, in (0, 1).
        split_seed: seed of the stratified train/held-out split (fixed across runs and resumes).
        augment: random affine jitter (rotation, shift, scale) on training images.
        num_workers: DataLoader worker processes.
        seed: augmentation and shuffling seed (None: the run's ``seed_everything`` value).
        predict_root: folder of your own digit images to predict (None: the held-out part).
        channels: 3 (grey replicated to RGB, for classifiers) or 1 (one grey channel).
        skip_bad_images: ``predict`` skips unreadable files of ``predict_root`` (named in a warning and
            counted) instead of stopping.
    """

    num_classes = 10
    class_names = [str(d) for d in range(10)]
    # the data config `agentlit export` records: (x - 0.5) / 0.5 per channel, bilinear resize
    mean, std, interpolation, crop_pct = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0

    def __init__(
        self,
        img_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
        seed: int | None = None,
        predict_root: str | None = None,
        channels: int = 3,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        self.seed = seed
        self.predict_root, self.skip_bad_images = predict_root, skip_bad_images
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 (grey, e.g. for generation) or 3 (grey replicated to RGB)")
        self.channels = channels
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.val_fraction, self.split_seed, self.augment = val_fraction, split_seed, augment
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from torchvision.transforms import v2

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
        images = torch.nn.functional.interpolate(images[:, None], size=self.img_size, mode="bilinear", align_corners=False)
        images = ((images - 0.5) / 0.5).expand(-1, self.channels, -1, -1).contiguous()  # (1797, C, S, S) in [-1, 1]
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=self.val_fraction, random_state=self.split_seed, stratify=labels.numpy()
        )
        jitter = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=-1.0) if self.augment else None
        self.train_set = EpochSeededDataset(TensorDataset(images[train_idx], labels[train_idx]), jitter, self.seed)
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set)

    test_dataloader = val_dataloader

    def predict_dataloader(self) -> DataLoader:
        if self.predict_root is not None:
            return self.eval_loader(self._predict_images())
        self.setup("predict")
        return self.eval_loader(_Indexed(self.val_set))

    def _predict_images(self) -> "PredictImages":
        size, channels = self.img_size, getattr(self, "channels", 3)

        def transform(img: Any) -> torch.Tensor:
            # the eval path of the bundled images: [0, 1] grey → img_size → [-1, 1], C channels
            from torchvision.transforms import v2

            x = v2.functional.pil_to_tensor(img.convert("L")).float() / 255.0  # (1, H, W)
            x = v2.functional.resize(x, size, antialias=True)  # shorter side → size
            x = v2.functional.center_crop(x, [size, size])
            return ((x - 0.5) / 0.5).expand(channels, -1, -1).contiguous()

        return PredictImages(self.predict_root, transform, skip_bad=getattr(self, "skip_bad_images", False))

    def predict_names(self) -> list[str]:
        """One name per predict item: paths relative to ``predict_root``, else ``val/<index>``."""
        if self.predict_root is not None:
            return self._predict_images().relative
        self.setup("predict")
        return [f"val/{i:04d}" for i in range(len(self.val_set))]


def _class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """Class name (sub-folder name) → its images (walked recursively, :func:`~agentlit.data.io.image_files`)
    for one split, checked for the ImageFolder layout."""
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"{split_dir} is not a folder; ImageFolderDataModule expects root/train/<class>/<image> and "
            "root/val/<class>/<image> (the ImageNet layout)"
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{split_dir} has no class sub-folders; expected {split_dir}/<class>/<image>")
    files = {c: image_files(split_dir / c) for c in classes}
    empty = [c for c in classes if not files[c]]
    if empty:
        raise FileNotFoundError(
            f"class folder(s) {empty} in {split_dir} hold no images with extensions {IMG_EXTENSIONS}"
        )
    return files


class LabeledImages(Dataset):
    """``(RGB image, class index)`` items of an ImageFolder-layout split (what torchvision's
    ``ImageFolder`` gives, from agentlit's one folder walker).

    Args:
        root: the split folder.
        samples: (image path, class index) pairs.
    """

    def __init__(self, root: Path, samples: list[tuple[Path, int]]) -> None:
        self.root, self.samples = root, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return load_rgb(path), label


class ImageFolderDataModule(ResumableDataModule):
    """Images in the ImageNet folder layout: ``root/{train,val}/<class>/<image>``.

    Training uses timm's transform (random resized crop, flip, RandAugment via ``auto_augment``
    such as ``"rand-m9-mstd0.5-inc1"``, colour jitter, random erasing ``re_prob``); evaluation
    resizes to ``img_size / crop_pct`` and centre-crops. ``test`` uses ``test_split`` (default
    ``val``); ``predict`` uses ``predict_split``, or ``predict_root``: any folder of images
    (searched recursively, any layout, format or size), read with the evaluation transform. Predicting
    ``predict_root`` needs no training data: the class names come from the checkpoint.

    Args:
        root: dataset folder holding one sub-folder per split.
        img_size: training crop and evaluation size.
        batch_size: images per batch and device.
        num_workers: DataLoader worker processes per device.
        train_split: training sub-folder of ``root``.
        val_split: validation sub-folder of ``root``.
        test_split: sub-folder ``test`` evaluates (None: ``val_split``).
        predict_split: sub-folder ``predict`` reads (None: ``val_split``).
        auto_augment: timm auto-augment policy, e.g. ``"rand-m9-mstd0.5-inc1"`` (None: off).
        re_prob: random-erasing probability.
        color_jitter: colour-jitter strength.
        interpolation: resize interpolation (``bicubic``, ``bilinear``, …).
        crop_pct: evaluation centre-crop fraction (resize to ``img_size / crop_pct`` first).
        mean: per-channel normalisation mean (RGB).
        std: per-channel normalisation standard deviation (RGB).
        pin_memory: pinned host memory for faster copies to the GPU.
        skip_bad_images: skip unreadable images with a warning instead of stopping with an error.
        seed: augmentation and shuffling seed (None: the run's ``seed_everything`` value).
        predict_root: any folder of images to predict instead of ``predict_split`` (searched recursively).
    """

    def __init__(
        self,
        root: str,
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        predict_split: str | None = None,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        color_jitter: float = 0.4,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        pin_memory: bool = True,
        skip_bad_images: bool = False,
        seed: int | None = None,
        predict_root: str | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.predict_root = predict_root
        self.skip_bad_images, self.seed = skip_bad_images, seed
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split,
                       "predict": predict_split or val_split}
        self.auto_augment, self.re_prob, self.color_jitter = auto_augment, re_prob, color_jitter
        self.interpolation, self.crop_pct, self.mean, self.std = interpolation, crop_pct, tuple(mean), tuple(std)
        self.pin_memory = pin_memory
        self.classes: list[str] | None = None
        self._walked: dict[str, dict[str, list[Path]]] = {}

    @property
    def num_classes(self) -> int:
        return len(self._check_layout())

    @property
    def class_names(self) -> list[str] | None:
        """The class folder names (None when the dataset root is not there, e.g. predicting a folder)."""
        try:
            return list(self._check_layout())
        except (FileNotFoundError, ValueError):
            return None

    def _check_layout(self) -> list[str]:
        if self.classes is None:
            if not self.root.is_dir():
                raise FileNotFoundError(
                    f"dataset root {self.root} does not exist; expected {self.root}/train/<class>/<image> and "
                    f"{self.root}/val/<class>/<image>"
                )
            train = list(self._walk(self.splits["train"]))
            val = list(self._walk(self.splits["val"]))
            if train != val:
                only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
                raise ValueError(
                    f"class folders differ between {self.root / self.splits['train']} and "
                    f"{self.root / self.splits['val']}: only in train {only_train}, only in val {only_val}; "
                    "both splits must hold the same class folders so labels agree"
                )
            self.classes = train
        return self.classes

    def _walk(self, split: str) -> dict[str, list[Path]]:
        """Class name → images of ``split`` (the folder is walked once per data module)."""
        if split not in self._walked:
            self._walked[split] = _class_folders(self.root / split)
        return self._walked[split]

    def _files(self, split: str) -> LabeledImages:
        """The (image, class index) items of ``split``; its class folders must be the training ones."""
        classes = self._check_layout()
        split_dir = self.root / split
        files = self._walk(split)
        if list(files) != classes:
            raise ValueError(f"{split_dir} classes {list(files)} differ from the training classes {classes}")
        return LabeledImages(split_dir, [(p, k) for k, c in enumerate(classes) for p in files[c]])

    def _dataset(self, split: str, train: bool) -> Dataset:
        from timm.data import create_transform

        transform = create_transform(
            self.img_size, is_training=train, auto_augment=self.auto_augment if train else None,
            re_prob=self.re_prob if train else 0.0, color_jitter=self.color_jitter, interpolation=self.interpolation,
            crop_pct=self.crop_pct, mean=self.mean, std=self.std,
        )
        files = _CheckedFiles(self._files(split), skip_bad=self.skip_bad_images)
        return EpochSeededDataset(files, transform, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict_root is not None:
            return  # a plain folder of images; the training layout need not exist
        self._check_layout()

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self._dataset(self.splits["train"], True))

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self._dataset(self.splits["val"], False))

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self._dataset(self.splits["test"], False))

    def predict_dataloader(self) -> DataLoader:
        if self.predict_root is not None:
            return self.eval_loader(self._predict_images())
        folder = self._dataset(self.splits["predict"], False)
        return self.eval_loader(_Indexed(folder))

    def _predict_images(self) -> "PredictImages":
        from timm.data import create_transform

        transform = create_transform(
            self.img_size, is_training=False, interpolation=self.interpolation, crop_pct=self.crop_pct,
            mean=self.mean, std=self.std,
        )
        return PredictImages(self.predict_root, transform, skip_bad=self.skip_bad_images)

    def predict_names(self) -> list[str]:
        """One name per predict item: paths relative to ``predict_root`` (or to the predict split)."""
        if self.predict_root is not None:
            return self._predict_images().relative
        folder = self._files(self.splits["predict"])
        return [str(p.relative_to(folder.root)) for p, _ in folder.samples]


def find_images(root: str | Path) -> list[Path]:
    """Every image under ``root`` (recursively, any layout, extensions in :data:`IMG_EXTENSIONS`,
    any case), sorted by path; hidden files and folders are skipped, links followed once
    (:func:`~agentlit.data.io.predict_files`).

    Args:
        root: the folder to search.
    """
    return predict_files(root)[0]


class PredictImages(PredictFolder):
    """The images under a folder for ``predict``: items ``{"image": transform(RGB image), "index": i,
    "file": path below the folder, "name": output name}`` (:class:`~agentlit.data.io.PredictFolder`).

    An unreadable file is an error naming it; with ``skip_bad`` it is reported once and its item
    gets ``index = -1`` (a blank image), so the writer leaves it out and counts it.

    Args:
        root: folder searched recursively (see :func:`find_images`).
        transform: PIL RGB image → (3, H, W) tensor (the evaluation transform).
        skip_bad: skip unreadable files with a warning instead of stopping.
    """

    def __init__(self, root: str | Path, transform: Any, skip_bad: bool = False) -> None:
        super().__init__(root, lambda image: {"image": transform(image)}, skip_bad)


class _Indexed(Dataset):
    """``(image, label)`` items as ``{"image", "index", "target"}`` for ``predict``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, target = self.dataset[index]
        return {"image": image, "index": index, "target": int(target)}


class _CheckedFiles(Dataset):
    """:class:`LabeledImages` whose unreadable files raise an error naming the file, or — when the user
    opted in with ``skip_bad_images`` — are logged once and replaced by the next readable one."""

    def __init__(self, folder: Any, skip_bad: bool) -> None:
        self.folder, self.skip_bad = folder, skip_bad

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.folder)):
            i = (index + offset) % len(self.folder)
            try:
                return self.folder[i]
            except BadImageError as err:
                if not self.skip_bad:
                    raise
                warn_unreadable(str(err))
        raise BadImageError(f"no readable image left in {self.folder.root}")
