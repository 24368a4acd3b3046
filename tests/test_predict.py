"""Predictions people can use: ``predict_root`` folders, ``predictions.csv`` with class names taken
from the checkpoint, and segmentation overlays."""
from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from agentlit.data import DigitsDataModule, ImageFolderDataModule
from agentlit.data.classification import PredictImages, find_images
from agentlit.predict_writers import ClassificationPredictions, overlay_image
from agentlit.tasks import ClassificationModule
from cli_helpers import QUICKSTART, TINY, run_agentlit

TINY_KW = {"patch_size": 4, "depth": 1, "agent_num": 4, "embed_dim": 32, "num_heads": 2}


def _tiny(num_classes: int = 10) -> ClassificationModule:
    return ClassificationModule("agent_deit_tiny", num_classes=num_classes, img_size=16, drop_path_rate=0.0,
                                model_kwargs=TINY_KW, warmup_epochs=0)


def _trainer(root: Path, **kw) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, enable_progress_bar=False,
                     enable_model_summary=False, logger=CSVLogger(root, name="", version=0),
                     default_root_dir=root, **kw)


def _digit_images(folder: Path, n: int = 12) -> list[str]:
    """Held-out-style digit images in every awkward form: nested folders, spaces, sizes, modes, formats."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = []
    for i in range(n):
        grey = (digits.images[i] / 16.0 * 255).astype(np.uint8)  # light digit on a dark ground
        size = (8 + 7 * i, 8 + 5 * i)  # non-square, 8 px to ~90 px
        img = Image.fromarray(grey, "L").resize(size, Image.BILINEAR)
        sub = folder / ("a b" if i % 2 else "c/d e")
        sub.mkdir(parents=True, exist_ok=True)
        kind = i % 4
        if kind == 0:
            path = sub / f"digit {i}.png"
            img.save(path)  # 8-bit grayscale
        elif kind == 1:
            path = sub / f"digit {i}.PNG"
            img.convert("RGBA").save(path)
        elif kind == 2:
            path = sub / f"digit {i}.png"
            Image.fromarray(np.asarray(img, dtype=np.uint16) * 257).save(path)  # 16-bit
        else:
            path = sub / f"digit {i}.jpg"
            img.convert("RGB").save(path, quality=95)
        written.append(path.relative_to(folder).as_posix())
    (folder / "notes.txt").write_text("not an image")
    return sorted(written)


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ----------------------------------------------------------------------------- data
def test_find_images_recursive_any_case_skips_hidden(tmp_path):
    for rel in ("x/1.png", "x/y z/2.JPG", "3.webp", ".hidden/4.png", "x/.5.png", "x/readme.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel, format="PNG") if rel.endswith(("png", "JPG", "webp")) \
            else (tmp_path / rel).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["3.webp", "x/1.png", "x/y z/2.JPG"]


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_predict_root_errors_name_the_folder(tmp_path, make):
    root = tmp_path / "imgs"
    if make == "empty":
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="predict_root .*imgs"):
        DigitsDataModule(img_size=16, predict_root=str(root)).predict_dataloader()


def test_digits_predict_root_batches_match_the_eval_transform(tmp_path):
    names = _digit_images(tmp_path / "my digits", n=8)
    dm = DigitsDataModule(img_size=16, batch_size=8, predict_root=str(tmp_path / "my digits"))
    assert dm.predict_names() == names
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16) and batch["index"].tolist() == list(range(8))
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    # channels equal (grey), and a 16-bit image reads like its 8-bit twin, not saturated
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])
    assert batch["image"].mean() < 0  # mostly dark ground, as in the bundled digits


def test_imagefolder_predict_root_needs_no_training_data(tmp_path):
    _digit_images(tmp_path / "pics", n=4)
    dm = ImageFolderDataModule(str(tmp_path / "nowhere"), img_size=16, batch_size=4, num_workers=0,
                               pin_memory=False, predict_root=str(tmp_path / "pics"))
    dm.setup("predict")
    assert dm.class_names is None
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16)


def test_skip_bad_images_leaves_unreadable_files_out(tmp_path):
    _digit_images(tmp_path / "p", n=3)
    (tmp_path / "p" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=8, num_workers=0, pin_memory=False,
                               predict_root=str(tmp_path / "p"))
    with pytest.raises(ValueError, match="broken.png"):
        next(iter(dm.predict_dataloader()))
    dm.skip_bad_images = True
    with pytest.warns(UserWarning, match="broken.png"):
        batch = next(iter(dm.predict_dataloader()))
    bad = dm.predict_names().index("broken.png")
    assert sorted(batch["index"].tolist()) == sorted([-1] + [i for i in range(4) if i != bad])


# ----------------------------------------------------------------------------- writer
def test_writer_columns_topk_and_names(tmp_path):
    class _T:
        is_global_zero, log_dir, default_root_dir = True, str(tmp_path), str(tmp_path)

    w = ClassificationPredictions()
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    w.add(probs[1:], torch.tensor([1]), torch.tensor([0]))
    w.add(probs[:1], torch.tensor([0]), torch.tensor([2]))
    path = w.write(_T(), ["cat", "dog", "emu"], ["a.png", "b/c.png"], top_k=2)
    header, rows = _rows(path)
    assert header == ["file", "label", "score", "top1_label", "top1_score", "top2_label", "top2_score", "target"]
    assert [r["file"] for r in rows] == ["a.png", "b/c.png"]
    assert [(r["label"], r["top2_label"], r["target"]) for r in rows] == [("dog", "emu", "emu"), ("cat", "emu", "cat")]
    assert float(rows[0]["score"]) == pytest.approx(0.7, abs=1e-4)


# ----------------------------------------------------------------------------- end to end
def test_class_names_from_checkpoint_and_predict_root(tmp_path, capsys):
    """Train two steps, then predict a nested folder with a fresh module and a datamodule that knows
    no class names: names come from the checkpoint."""
    dm = DigitsDataModule(img_size=16, batch_size=16)
    trainer = _trainer(tmp_path / "run")
    trainer.fit(_tiny(), dm)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["class_names"] == [str(d) for d in range(10)]

    names = _digit_images(tmp_path / "new digits", n=12)

    class NoNames(DigitsDataModule):
        class_names = None

    predictor = _trainer(tmp_path / "pred")
    probs = predictor.predict(_tiny(), NoNames(img_size=16, batch_size=5, predict_root=str(tmp_path / "new digits")),
                              ckpt_path=str(ckpt))
    assert torch.cat(probs).shape == (12, 10)
    csv_path = tmp_path / "pred" / "version_0" / "predictions.csv"
    header, rows = _rows(csv_path)
    assert header[:3] == ["file", "label", "score"] and header[-2:] == ["top5_label", "top5_score"]
    assert [r["file"] for r in rows] == names
    assert all(r["label"] in [str(d) for d in range(10)] and r["label"] == r["top1_label"] for r in rows)
    out = capsys.readouterr().out
    assert str(csv_path) in out and names[0] in out


def test_imagefolder_names_stored_and_used(tmp_path):
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((20, 20, 3), 60 + 120 * c, np.uint8)).save(folder / f"{i}.png")
    kw = dict(img_size=16, batch_size=4, num_workers=0, pin_memory=False, auto_augment=None, re_prob=0.0)
    trainer = _trainer(tmp_path / "run")
    trainer.fit(_tiny(2), ImageFolderDataModule(str(tmp_path / "data"), **kw))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    _digit_images(tmp_path / "unlabelled", n=3)
    predictor = _trainer(tmp_path / "pred")
    predictor.predict(_tiny(2), ImageFolderDataModule(str(tmp_path / "gone"), predict_root=str(tmp_path / "unlabelled"), **kw),
                      ckpt_path=str(tmp_path / "m.ckpt"))
    header, rows = _rows(tmp_path / "pred" / "version_0" / "predictions.csv")
    assert len(rows) == 3 and {r["label"] for r in rows} <= {"cat", "dog"}
    assert {r["top1_label"] for r in rows} | {r["top2_label"] for r in rows} == {"cat", "dog"}
    assert "target" not in header
    # the val split, whose labels are known, gets a target column
    predictor = _trainer(tmp_path / "pred2")
    predictor.predict(_tiny(2), ImageFolderDataModule(str(tmp_path / "data"), **kw), ckpt_path=str(tmp_path / "m.ckpt"))
    header, rows = _rows(tmp_path / "pred2" / "version_0" / "predictions.csv")
    assert header[-1] == "target" and [r["target"] for r in rows] == ["cat"] * 4 + ["dog"] * 4
    assert rows[0]["file"] == "cat/0.png"


@pytest.mark.slow
def test_cli_predict_folder_prints_csv_path(tmp_path):
    run_agentlit("fit", "--config", QUICKSTART, *TINY, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                 "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    names = _digit_images(tmp_path / "my digits" / "batch 1", n=6)
    proc = run_agentlit("predict", "--config", QUICKSTART, *TINY, "--ckpt_path", str(ckpt),
                        "--data.predict_root", str(tmp_path / "my digits"),
                        "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)
    csv_path = tmp_path / "runs" / "version_0" / "predict" / "predictions.csv"  # under the evaluated run
    assert "runs/version_0/predict/predictions.csv" in proc.stdout  # printed as short as the working folder allows
    _, rows = _rows(csv_path)
    assert [r["file"] for r in rows] == [f"batch 1/{n}" for n in names]
    assert all(r["label"] in [str(d) for d in range(10)] for r in rows)


# ----------------------------------------------------------------------------- segmentation
def test_overlay_has_input_prediction_and_legend():
    from agentlit.models.segmentation import palette

    image = np.full((20, 30, 3), 200, np.uint8)
    pred = np.zeros((20, 30), np.int64)
    pred[:, 15:] = 2
    pal = palette(4)
    out = np.asarray(overlay_image(image, pred, pal, ["sky", "tree", "road", "car"], alpha=1.0, min_size=0))
    assert out.shape[0] >= 20 and out.shape[1] > 60  # the legend may be taller than a small image
    assert (out[:20, :30] == 200).all()  # the input, untouched
    assert (out[5, 30 + 20] == pal[2]).all() and (out[5, 30 + 5] == pal[0]).all()  # the prediction
    legend = out[:, 60:].reshape(-1, 3)
    assert any((legend == pal[2]).all(1)) and not any((legend == pal[3]).all(1))  # classes present only
    big = np.asarray(overlay_image(image, pred, pal, min_size=192))
    assert big.shape[0] == 120 and (big[:120, :180] == 200).all()  # enlarged 6x to be readable
