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
    big = np.asarray(overlay_image(image, pred, pal))
    assert big.shape[0] == 360 and (big[:360, :540] == 200).all()  # enlarged 18x: the longer side reaches 512 px


# ----------------------------------------------------------------------------- one predict contract
def test_report_line_says_what_was_read_skipped_and_written(tmp_path, capsys):
    class _T:
        is_global_zero, log_dir, default_root_dir, world_size = True, str(tmp_path), str(tmp_path), 1
        datamodule = type("DM", (), {"predict_root": "my digits"})()

    w = ClassificationPredictions()
    w.add(torch.tensor([[0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 1]))
    w.skipped = ["sub/broken.png"]
    path = w.write(_T(), ["cat", "dog"], ["a.png", "sub/b.png"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"agentlit: predict read 3 images from my digits (1 unreadable, skipped: sub/broken.png); "
        f"wrote predictions for 2 images to {path}")


def test_output_folders_are_claimed_atomically(tmp_path):
    """Runs that start at the same moment never share an output folder; an earlier run's is never reused."""
    from concurrent.futures import ThreadPoolExecutor

    from agentlit.utils.paths import fresh_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.png").write_bytes(b"an earlier run's image")
    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: fresh_dir(tmp_path / "out"), range(8)))
    assert sorted(p.name for p in claimed) == sorted(f"out-{k}" for k in range(1, 9))
    assert (tmp_path / "out" / "00000.png").read_bytes() == b"an earlier run's image"


def _pictures(folder: Path) -> None:
    """Three readable images (two sharing the stem ``a``, one in a sub-folder) and one unreadable file."""
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "a.jpg")
    Image.new("RGB", (40, 64), (10, 10, 200)).save(folder / "sub" / "c.png")
    (folder / "sub" / "bad.png").write_bytes(b"not an image")


def test_segmentation_predict_root_recursive_counted_and_kept_in_its_run(seg_checkpoint, tmp_path):
    """The classification contract for segmentation: --data.predict_root (recursive), unreadable files named and
    counted (skip_bad_images), no stem collisions, one closing line; a run's checkpoint predicts into that run,
    and a second predict never overwrites the first."""
    import shutil

    from cli_helpers import SEG_CONFIG, SEG_TINY, run_main

    run = tmp_path / "runs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(seg_checkpoint, run / "checkpoints" / "last.ckpt")
    _pictures(tmp_path / "pics")
    args = ("predict", "--config", SEG_CONFIG, *SEG_TINY, "--ckpt_path", "last", "--data.predict_root", "pics",
            "--data.val_batch_size", "2", "--trainer.default_root_dir", "runs")
    code, out, err = run_main(*args, "--data.skip_bad_images", "true", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "skipping unreadable image (skip_bad_images=true): cannot read image pics/sub/bad.png" in err
    assert ("agentlit: predict read 4 images from pics (1 unreadable, skipped: sub/bad.png); wrote 3 masks and 3 "
            "overlays to runs/version_0/predict/predictions") in out
    first = run / "predict" / "predictions"
    written = sorted(p.name for p in first.iterdir() if p.name[0] != ".")
    assert written == ["a.jpg.png", "a.jpg_overlay.png", "a.png.png", "a.png_overlay.png", "c.png", "c_overlay.png"]
    assert Image.open(first / "c_overlay.png").size[1] == 512  # enlarged to be read
    before = {p: p.stat().st_mtime_ns for p in first.iterdir()}
    code, out, err = run_main(*args, "--data.skip_bad_images", "true", cwd=tmp_path)
    assert code == 0 and "to runs/version_0/predict-1/predictions" in out, err[-3000:]
    assert {p: p.stat().st_mtime_ns for p in first.iterdir()} == before  # the first predict is untouched
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["version_0"]  # no empty new run folders
    # without skip_bad_images the unreadable file stops predict with one line naming it
    code, out, err = run_main(*args, cwd=tmp_path)
    assert code == 2 and "cannot read image pics/sub/bad.png" in err and "skip_bad_images: true" in err


# ----------------------------------------------------------------------------- pictures people can read
def test_labels_are_placed_where_they_cover_no_other_label():
    from agentlit.predict_writers import place_labels

    boxes = [(10, 40, 100, 100), (12, 42, 98, 96), (14, 44, 90, 90)]  # three nearly identical boxes
    corners = place_labels(boxes, [(60, 14)] * 3, 200, 200)
    rects = [(x, y, x + 60, y + 14) for x, y in corners]
    for i in range(3):
        for j in range(i):
            a, b = rects[i], rects[j]
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (a, b)
    assert corners[0] == (10, 26)  # the most confident one keeps the usual spot above its box
    # no room: still inside the picture
    x, y = place_labels([(0, 0, 10, 10)], [(60, 14)], 50, 12)[0]
    assert x == 0 and y == 0


def test_detection_drawing_is_enlarged_and_labelled_in_class_colours():
    from agentlit.models.segmentation import palette
    from agentlit.predict_writers import detection_image

    image = np.full((64, 48, 3), 128, np.uint8)
    masks = np.zeros((2, 64, 48), bool)
    masks[0, 10:30, 10:30] = True
    pal = palette(4)
    pic = np.asarray(detection_image(image, np.array([[10, 10, 30, 30], [5, 40, 40, 60]], float),
                                     ["circle 0.93", "square 0.51"], [1, 2], pal, masks))
    assert pic.shape == (512, 384, 3)  # 8x: the longer side reaches 512 px
    assert (pic[200, 200] != 128).any()  # the mask is blended in (enlarged with the image)
    label = (pic == pal[1]).all(-1)  # the label background of class 1 sits above its box (y 80 at 8x)
    rows = np.nonzero(label[:80].any(1))[0]
    assert len(rows) >= 14 and label[:80].any(0).sum() >= 60  # a label at least 14 px high and 60 px wide


def test_metrics_png_has_panels_only_for_metrics_logged_more_than_once(tmp_path):
    from agentlit.utils.plots import metric_panels, plot_metrics

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train/loss,val/bbox_mAP,val/bbox_mAP_s,lr-AdamW,test/acc1\n"
                        "0,9,1.5,,,0.1,\n0,19,1.2,0.3,-1,0.1,\n1,29,0.9,0.4,-1,0.05,\n1,30,,,,,0.8\n")
    assert metric_panels(__import__("agentlit.utils.plots", fromlist=["read_metrics"]).read_metrics(csv_path)) == {
        "bbox_mAP": ["val/bbox_mAP"], "learning rate": ["lr-AdamW"], "loss": ["train/loss"]}
    assert plot_metrics(csv_path, tmp_path / "m.png").stat().st_size > 1000
    csv_path.write_text("epoch,step,test/acc1\n0,30,0.8\n")
    assert plot_metrics(csv_path, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_sample_grids_are_at_least_512_px():
    from agentlit.predict_writers import enlarge_grid

    grid = torch.rand(3, 171, 86)  # ten 16 px digits a row, as the digits diffusion predict draws them
    big = enlarge_grid(grid)
    assert big.shape == (3, 171 * 3, 86 * 3) and torch.equal(big[:, ::3, ::3], grid)
    assert enlarge_grid(torch.rand(1, 600, 40)).shape == (1, 600, 40)


def test_every_data_module_that_predicts_a_folder_can_skip_bad_images(tmp_path):
    """The predict contract is the same everywhere: a data module taking ``predict_root`` takes
    ``skip_bad_images`` too (the error for an unreadable file recommends it), and it works."""
    import importlib
    import inspect
    import pkgutil

    import lightning as L

    import agentlit.data as data

    modules = {c for info in pkgutil.iter_modules(data.__path__) for c in vars(importlib.import_module(f"agentlit.data.{info.name}")).values()
               if inspect.isclass(c) and issubclass(c, L.LightningDataModule) and "predict_root" in inspect.signature(c).parameters}
    assert {"DigitsDataModule", "ImageFolderDataModule", "DetectionDataModule", "SegmentationDataModule"} <= {c.__name__ for c in modules}, modules
    for cls in modules:
        assert "skip_bad_images" in inspect.signature(cls).parameters, f"{cls.__name__} lacks skip_bad_images"
    _pictures(tmp_path / "pics")
    dm = data.DigitsDataModule(img_size=16, predict_root=str(tmp_path / "pics"), skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        names = dm.predict_names()
        batches = list(dm.predict_dataloader())
    assert sum(len(b["image"]) for b in batches) == len(names) == 4
