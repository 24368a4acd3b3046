"""Classification task and DataModules: steps, mixup/EMA, folder layout checks."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from agentlit.data import DigitsDataModule, ImageFolderDataModule
from agentlit.tasks import ClassificationModule
from agentlit.tasks._schedule import warmup_cosine, warmup_poly

TINY = dict(model_name="agent_deit_tiny", num_classes=10, img_size=16, drop_path_rate=0.1,
            model_kwargs=dict(patch_size=4, depth=2, agent_num=4, embed_dim=32, num_heads=2))


def test_digits_datamodule_split_is_fixed_and_stratified():
    a, b = DigitsDataModule(img_size=16, batch_size=8), DigitsDataModule(img_size=16, batch_size=8)
    a.setup("fit"), b.setup("fit")
    assert len(a.train_set) + len(a.val_set) == 1797
    torch.testing.assert_close(a.val_set.tensors[1], b.val_set.tensors[1])
    counts = torch.bincount(a.val_set.tensors[1], minlength=10)
    assert counts.min() >= 30  # every digit is represented in the held-out split
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and y.dtype == torch.long and -1.0 <= x.min() and x.max() <= 1.0


def test_training_step_with_mixup_and_ema_updates_average():
    module = ClassificationModule(**TINY, mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.5)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(module.model.parameters(), lr=0.1)
    x2, soft = module.mixup(x, y)
    assert soft.shape == (4, 10) and torch.allclose(soft.sum(-1), torch.ones(4))
    before = [p.detach().clone() for p in module.ema.parameters()]
    logits = module(x2)
    (-(soft * logits.log_softmax(-1)).sum(-1).mean()).backward()
    opt.step()
    module.update_ema()
    moved = [not torch.equal(b, e) for b, e in zip(before, module.ema.parameters())]
    assert any(moved)
    for e, p, b in zip(module.ema.parameters(), module.model.parameters(), before):
        d = min(0.5, 1 / 10)  # decay warm-up at global step 0: (1 + 0) / (10 + 0)
        torch.testing.assert_close(e, b * d + p.detach() * (1 - d))
    assert not any(p.requires_grad for p in module.ema.parameters())


def test_predict_returns_probabilities():
    module = ClassificationModule(**TINY).eval()
    probs = module.predict_step((torch.randn(3, 3, 16, 16), torch.zeros(3)), 0)
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(-1), torch.ones(3))


def test_schedules():
    f = warmup_cosine(total_steps=100, warmup_steps=10, warmup_factor=0.01, min_factor=0.1)
    assert f(0) == pytest.approx(0.01) and f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    p = warmup_poly(total_steps=100, warmup_steps=0, power=1.0)
    assert p(50) == pytest.approx(0.5) and p(100) == pytest.approx(0.0)


def _write_folder(root, classes, n=3, size=20, split_classes=None):
    for split in ("train", "val"):
        for c in (split_classes or {}).get(split, classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size, size), (i * 40, 10, 200)).save(d / f"{i}.png")


def test_image_folder_datamodule(tmp_path):
    _write_folder(tmp_path, ["cat", "dog"])
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=2, num_workers=0, pin_memory=False)
    dm.setup("fit")
    assert dm.num_classes == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and y.dtype == torch.long
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 16, 16)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderDataModule(str(tmp_path / "nope")).setup("fit")
    (tmp_path / "a" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderDataModule(str(tmp_path / "a")).setup("fit")
    _write_folder(tmp_path / "b", [], split_classes={"train": ["cat", "dog"], "val": ["cat", "cow"]})
    with pytest.raises(ValueError, match=r"only in train \['dog'\], only in val \['cow'\]"):
        ImageFolderDataModule(str(tmp_path / "b")).setup("fit")
    _write_folder(tmp_path / "c", ["cat", "dog"])
    (tmp_path / "c" / "train" / "emu").mkdir()
    (tmp_path / "c" / "val" / "emu").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\['emu'\].*hold no images"):
        ImageFolderDataModule(str(tmp_path / "c")).setup("fit")
