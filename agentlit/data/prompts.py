"""Prompts for text-to-image generation: a list, a YAML/text file, or ImageNet-class prompts.

The paper's evaluation (docs/reference.md §4) generates from ImageNet-class prompts, "a photo of a
{class}": ``imagenet_prompts=2000`` cycles through the 1000 class names twice.
Each item is one image to make: ``{"prompt": str, "seed": int, "index": int}``; seeds are
``seed + index`` so any image can be regenerated on its own, whatever the batching.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch.utils.data import DataLoader, Dataset

from .base import ResumableDataModule

__all__ = ["PromptDataModule", "imagenet_class_names", "load_prompts"]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1K class names (first synonym), as shipped with torchvision."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a YAML file (a list, or a mapping with a ``prompts`` list) or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            if "prompts" not in data:
                raise ValueError(f"{path}: a YAML mapping must hold a `prompts` list, found keys {sorted(data)}")
            data = data["prompts"]
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{path}: expected a YAML list of prompt strings")
        prompts = [p.strip() for p in data]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


class _PromptSet(Dataset):
    def __init__(self, prompts: list[str], images_per_prompt: int, seed: int) -> None:
        self.items = [
            {"prompt": p, "seed": seed + i * images_per_prompt + j, "index": i * images_per_prompt + j}
            for i, p in enumerate(prompts)
            for j in range(images_per_prompt)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _collate(items: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [item[key] for item in items] for key in items[0]}


class PromptDataModule(ResumableDataModule):
    """Prompt batches for ``predict`` (and ``test``, where the module scores the images).

    Exactly one source: ``prompts`` (a list), ``prompt_file`` (.yaml/.yml list or a text file, one
    prompt per line) or ``imagenet_prompts`` (that many "a photo of a {class}" prompts).

    Batches are dicts of lists: ``prompt``, ``seed``, ``index`` (length ``batch_size``).

    Args:
        prompts: the prompts themselves.
        prompt_file: a .yaml/.yml list of prompts or a text file with one prompt per line.
        imagenet_prompts: that many ImageNet-class prompts, cycling through the 1000 classes.
        template: the ImageNet prompt, ``{}`` standing for the class name.
        images_per_prompt: images generated from each prompt (consecutive seeds).
        batch_size: prompts per batch and device.
        seed: seed of the first image; image i uses ``seed + i``.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompt_file: str | None = None,
        imagenet_prompts: int | None = None,
        template: str = "a photo of a {}",
        images_per_prompt: int = 1,
        batch_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        sources = [name for name, v in (("prompts", prompts), ("prompt_file", prompt_file),
                                        ("imagenet_prompts", imagenet_prompts)) if v is not None]
        if len(sources) != 1:
            raise ValueError(
                "PromptDataModule needs exactly one of `prompts`, `prompt_file`, `imagenet_prompts`; "
                f"got {sources or 'none'}"
            )
        if images_per_prompt < 1 or batch_size < 1:
            raise ValueError(f"images_per_prompt and batch_size must be >= 1, got {images_per_prompt}, {batch_size}")
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the class name, got {template!r}")
        self.save_hyperparameters()
        self.batch_size, self.num_workers = batch_size, num_workers
        self._prompts: list[str] | None = None

    @property
    def prompts(self) -> list[str]:
        """The prompt list (one entry per prompt, before ``images_per_prompt``)."""
        if self._prompts is None:
            hp = self.hparams
            if hp.prompts is not None:
                prompts = [str(p) for p in hp.prompts]
                if not prompts:
                    raise ValueError("`prompts` is empty")
            elif hp.prompt_file is not None:
                prompts = load_prompts(hp.prompt_file)
            else:
                if hp.imagenet_prompts < 1:
                    raise ValueError(f"imagenet_prompts must be >= 1, got {hp.imagenet_prompts}")
                names = imagenet_class_names()
                prompts = [hp.template.format(names[i % len(names)]) for i in range(hp.imagenet_prompts)]
            self._prompts = prompts
        return self._prompts

    def _loader(self) -> DataLoader:
        ds = _PromptSet(self.prompts, self.hparams.images_per_prompt, self.hparams.seed)
        return self.eval_loader(ds, collate_fn=_collate)  # under DDP: each prompt on exactly one rank

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
