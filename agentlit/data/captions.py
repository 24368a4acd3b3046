"""Image–caption folders for text-to-image training: ``root/<name>.<image ext>`` next to ``root/<name>.txt``.

Batches are dicts ``{"image": (B, 3, H, W) in [-1, 1], "prompt": [str] * B}`` (what
:class:`~agentlit.tasks.diffusion.DiffusionModule` takes for text-conditioned training).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .base import ResumableDataModule
from .io import IMG_EXTENSIONS, image_files
from .sampling import EpochSeededDataset

__all__ = ["CaptionFolderDataModule", "find_caption_pairs"]


def find_caption_pairs(root: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs of a folder (recursive): every image with a same-named ``.txt`` caption."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image-caption folder {root} does not exist; expected {root}/<name>.png + <name>.txt")
    pairs = []
    for img in image_files(root):
        txt = img.with_suffix(".txt")
        if txt.is_file() and txt.read_text(encoding="utf-8").strip():
            pairs.append((img, txt.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise ValueError(
            f"image-caption folder {root} holds no image with a non-empty caption; put <name>.txt next to each "
            f"<name>.png/.jpg ({', '.join(IMG_EXTENSIONS)})"
        )
    return pairs


class _CaptionSet(Dataset):
    def __init__(self, pairs: list[tuple[Path, str]], size: int) -> None:
        self.pairs, self.size = pairs, size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from torchvision.transforms import v2

        from .io import load_rgb

        path, caption = self.pairs[i]
        x = v2.functional.pil_to_tensor(load_rgb(str(path))).float() / 255.0  # (3, H, W)
        x = v2.functional.resize(x, self.size, antialias=True)  # shorter side -> size
        x = v2.functional.center_crop(x, [self.size, self.size])
        return {"image": x * 2 - 1, "prompt": caption}


def _collate(items: list[Any]) -> dict[str, Any]:
    items = [it[0] if isinstance(it, tuple) else it for it in items]
    return {"image": torch.stack([it["image"] for it in items]), "prompt": [it["prompt"] for it in items]}


class CaptionFolderDataModule(ResumableDataModule):
    """Images with captions from one folder, split into train/val by a fixed seeded shuffle.

    Args:
        root: folder of ``<name>.<image>`` + ``<name>.txt`` pairs (searched recursively).
        img_size: images are resized (shorter side) and centre-cropped to this side.
        batch_size: batch size per device.
        val_fraction: share of the pairs held out for validation (at least one pair).
        split_seed: seed of the split.
        num_workers: DataLoader workers.
        seed: seed of the training order (None: from seed_everything).
    """

    def __init__(
        self,
        root: str,
        img_size: int = 32,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.root, self.img_size, self.batch_size, self.num_workers = root, img_size, batch_size, num_workers
        self.val_fraction, self.split_seed, self.seed = val_fraction, split_seed, seed
        self.train_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pairs = find_caption_pairs(self.root)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val = max(1, round(len(pairs) * self.val_fraction)) if len(pairs) > 1 else 0
        val = [pairs[i] for i in order[:n_val]]
        train = [pairs[i] for i in order[n_val:]]
        self.train_set = EpochSeededDataset(_CaptionSet(train, self.img_size), None, self.seed)
        self.val_set = _CaptionSet(val or train, self.img_size)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, collate_fn=_collate)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set, collate_fn=_collate)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
