"""Faults end in a short clear message or the right files, never silent corruption: runs started at
once, interrupted or failed checkpoint writes, resumes, divergence, link loops in image folders,
bad images, colliding prediction names, degenerate COCO polygons."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from agentlit.checkpoint import atomic_save, resolve
from agentlit.data import ImageFolderDataModule
from agentlit.data.io import BadImageError, image_files, load_rgb, unique_names
from agentlit.runs import claim_version
from agentlit.tasks import ClassificationModule
from cli_helpers import QUICKSTART, SEG_CONFIG, SEG_TINY, TINY, agentlit_env, assert_one_line_error, run_agentlit, run_main

TINY_KW = dict(model_name="agent_deit_tiny", num_classes=2, img_size=16,
               model_kwargs=dict(patch_size=8, depth=1, agent_num=4, embed_dim=32, num_heads=2))


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def _finite(ckpt: Path) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# -------------------------------------------------------------------------------- run folders
def _claim(root: str, barrier, out) -> None:
    barrier.wait()  # every process claims at the same moment
    out.put(claim_version(Path(root)))


def test_runs_claiming_at_the_same_moment_get_distinct_folders(tmp_path):
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    (tmp_path / "version_0").mkdir()  # an earlier run
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    versions = sorted(out.get(timeout=10) for _ in procs)
    assert versions == list(range(1, 9))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"version_{v}" for v in range(9))


@pytest.mark.slow
def test_three_fits_started_together_never_share_a_run_folder(tmp_path):
    env = agentlit_env(tmp_path)
    cmd = [sys.executable, "-m", "agentlit", "fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps", "2",
           "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", "runs"]
    procs = [subprocess.Popen(cmd + ["--model.lr", str(1e-3 * (i + 1))], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1", "version_2"]
    import yaml

    lrs = sorted(yaml.safe_load((r / "config.yaml").read_text())["model"]["init_args"]["lr"] for r in runs)
    assert lrs == pytest.approx([1e-3, 2e-3, 3e-3])  # each run's own config, none overwritten
    for r in runs:
        assert _step(r / "checkpoints" / "last.ckpt") == 2 and len((r / "metrics.csv").read_text().splitlines()) > 1


# ------------------------------------------------------------------------------- checkpoint files
_WRITE_UNDER_LIMIT = textwrap.dedent("""
    import resource, sys, torch
    from agentlit.checkpoint import CheckpointError, atomic_save
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        atomic_save({"w": torch.ones(1_000_000)}, sys.argv[1])  # 4 MB: the write fails part-way (as on a full disk)
    except CheckpointError as err:
        print(err)
""")


def test_failed_checkpoint_write_leaves_the_previous_file_and_no_partial_one(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_save({"w": torch.zeros(3)}, target)
    proc = subprocess.run([sys.executable, "-c", _WRITE_UNDER_LIMIT, str(target)], capture_output=True, text=True, timeout=300,
                          env=agentlit_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"cannot write checkpoint {target}: File too large; the previous file is unchanged"
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG, as a full disk with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


@pytest.mark.slow
def test_resume_that_cannot_write_its_checkpoint_keeps_last_ckpt_intact(tmp_path):
    common = ["fit", "--config", QUICKSTART, *TINY, "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", "runs"]
    run_agentlit(*common, "--trainer.max_steps", "2", cwd=tmp_path)
    last = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    size = last.stat().st_size
    proc = subprocess.run([sys.executable, "-m", "agentlit", *common, "--trainer.max_steps", "4", "--ckpt_path", "last"],
                          cwd=tmp_path, env=agentlit_env(tmp_path), capture_output=True, text=True, timeout=600,
                          preexec_fn=_limit_file_size(size // 2))
    assert_one_line_error(proc.returncode, proc.stderr, rf"cannot write checkpoint .*last.ckpt: File too large; "
                                                        r"the previous file is unchanged")
    assert _step(last) == 2 and last.stat().st_size == size
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]




def test_ckpt_path_last_skips_a_truncated_checkpoint_and_says_which_it_took(tiny_checkpoint, tmp_path):
    folder = tmp_path / "runs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    intact = folder / "epoch000-step2.ckpt"
    intact.write_bytes(tiny_checkpoint.read_bytes())
    (folder / "last.ckpt").write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])  # newer, truncated
    os.utime(intact, (1, 1))
    with pytest.warns(UserWarning, match=r"skipped .*last.ckpt \(unreadable: .*truncated.*\); using .*epoch000-step2.ckpt"):
        assert resolve("last", tmp_path / "runs").path == intact
    code, out, err = run_main("test", "--config", QUICKSTART, *TINY, "--ckpt_path", "last", "--trainer.limit_test_batches",
                              "1", "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "using runs/version_0/checkpoints/epoch000-step2.ckpt, the newest readable checkpoint" in err
    assert "test/acc1" in out


def test_ckpt_path_last_with_nothing_readable_is_one_line(tiny_checkpoint, tmp_path):
    folder = tmp_path / "runs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(tiny_checkpoint.read_bytes()[:1000])
    code, out, err = run_main("test", "--config", QUICKSTART, *TINY, "--ckpt_path", "last", "--trainer.default_root_dir",
                              "runs", cwd=tmp_path)
    assert_one_line_error(code, err, r"--ckpt_path last: no checkpoint under runs is readable \(checkpoint .*last.ckpt is not a "
                                     r"readable PyTorch checkpoint")


KILLER = textwrap.dedent("""
    import os, signal
    from lightning.pytorch.callbacks import Callback

    class KillAtStep(Callback):
        def __init__(self, step: int):
            self.step = step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGTERM)
""")


@pytest.mark.slow
@pytest.mark.parametrize("callbacks", ["agentlit's", "own ModelCheckpoint(save_last)"])
def test_after_sigterm_and_resume_last_ckpt_is_the_latest_state(tmp_path, callbacks):
    (tmp_path / "killer.py").write_text(KILLER)
    own = ("  - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
           "    init_args: {save_last: true, every_n_train_steps: 100}\n") if callbacks != "agentlit's" else ""
    (tmp_path / "kill.yaml").write_text("trainer:\n  callbacks:\n" + own +
                                        "  - class_path: killer.KillAtStep\n    init_args: {step: 3}\n")
    (tmp_path / "plain.yaml").write_text("trainer:\n  callbacks:\n" + own)
    plain = ["--config", "plain.yaml"] if own else []
    common = ["fit", "--config", QUICKSTART, *TINY, "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", "runs"]
    killed = run_agentlit(*common, "--config", "kill.yaml", "--trainer.max_steps", "8", cwd=tmp_path, check=False)
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr[-3000:]
    folder = tmp_path / "runs" / "version_0" / "checkpoints"
    assert _step(folder / "last.ckpt") == 4
    run_agentlit(*common, *plain, "--trainer.max_steps", "6", "--ckpt_path", "last", cwd=tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no last-v1.ckpt beside a stale last.ckpt
    assert _step(folder / "last.ckpt") == 6


def test_fit_ending_before_its_first_validation_writes_last_ckpt(tmp_path):
    # the detection quickstart validates every 5 epochs; a 1-epoch run must still keep its weights
    code, out, err = run_main("fit", "--config", QUICKSTART, *TINY, "--trainer.check_val_every_n_epoch", "5",
                              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                              "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert code == 0, err[-3000:]
    folder = tmp_path / "runs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"] and _step(folder / "last.ckpt") == 3
    assert "last checkpoint: runs/version_0/checkpoints/last.ckpt" in out


# ---------------------------------------------------------------------------------- divergence
def _poisoned(batch):
    """``batch`` with NaN images (any task's batch layout: tensors, dicts with "image", lists of them)."""
    if isinstance(batch, dict):
        return {k: v.float() * float("nan") if k == "image" else v for k, v in batch.items()}
    if isinstance(batch, list):
        return [_poisoned(s) for s in batch]
    if isinstance(batch, tuple):
        return (batch[0] * float("nan"), *batch[1:])
    raise TypeError(type(batch))


def _tiny_task(name: str) -> L.LightningModule:
    from test_detection import tiny_module as detection
    from test_diffusion_training import tiny_module as diffusion
    from test_segmentation import PVT_KW

    from agentlit.tasks import SegmentationModule

    return {
        "classification": lambda: ClassificationModule(**TINY_KW),
        "segmentation": lambda: SegmentationModule("agent_pvt_tiny", num_classes=4, backbone_kwargs=PVT_KW, head_channels=16,
                                                   neck_channels=16, crop_size=32),
        "detection": detection,
        "diffusion": diffusion,
    }[name]()


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection", "diffusion"])
def test_every_task_stops_on_a_non_finite_loss_before_updating(task, tmp_path):
    module = _tiny_task(task)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at global step 0, epoch 0; "
                                                 r"the last good checkpoint is none written yet\. Lower the learning rate"):
        trainer.fit(module, train_dataloaders=DataLoader([_poisoned(module.example_batch(2))], batch_size=None))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")
               and "running_" not in k)  # no update from the NaN step
    assert not list(tmp_path.rglob("*.ckpt"))


def test_non_finite_weights_are_never_written_to_a_checkpoint(tmp_path):
    from agentlit.trainer import AgentTrainer

    module = ClassificationModule(**TINY_KW)
    trainer = AgentTrainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                           enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([module.example_batch(2)], batch_size=None))
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        module.model.head.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite weights \(model.head.weight\) at global step 1.*was not written"):
        trainer.save_checkpoint(tmp_path / "good.ckpt")
    assert _finite(tmp_path / "good.ckpt") and sorted(p.name for p in tmp_path.iterdir()) == ["good.ckpt"]


@pytest.mark.slow
def test_diverging_segmentation_run_stops_with_one_line_and_no_nan_checkpoint(tmp_path):
    code, out, err = run_main("fit", "--config", SEG_CONFIG, *SEG_TINY, "--model.lr", "1e9", "--trainer.max_epochs", "3",
                              "--trainer.check_val_every_n_epoch", "1", "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert_one_line_error(code, err, r"non-finite (training loss|weights) .* at global step \d+, epoch \d+")
    assert all(_finite(c) for c in tmp_path.rglob("*.ckpt"))


# --------------------------------------------------------------------------------- image folders
def _images(folder: Path, n: int, size: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (i * 30 % 255, 90, 10)).save(folder / f"{i}.png")


def test_directory_link_loops_and_duplicate_links_count_each_image_once(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            _images(tmp_path / split / c, 4)
    (tmp_path / "val" / "cat" / "loop").symlink_to(tmp_path / "val" / "cat", target_is_directory=True)
    (tmp_path / "val" / "dog" / "again").symlink_to(tmp_path / "val" / "dog", target_is_directory=True)
    (tmp_path / "val" / "dog" / "same.png").symlink_to(tmp_path / "val" / "dog" / "0.png")
    (tmp_path / "val" / "dog" / ".hidden.png").write_bytes((tmp_path / "val" / "dog" / "1.png").read_bytes())
    with pytest.warns(UserWarning, match=r"skipped 1 link\(s\) to folders or files already read .* e.g. loop"):
        assert [p.name for p in image_files(tmp_path / "val" / "cat")] == ["0.png", "1.png", "2.png", "3.png"]
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=4, num_workers=0, pin_memory=False)
    with pytest.warns(UserWarning, match="skipped"):
        assert sum(len(y) for _, y in dm.val_dataloader()) == 8  # not multiplied by the loop (was 16 -> 336)


def test_decompression_bomb_is_one_line_naming_the_file(tmp_path, monkeypatch):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            _images(tmp_path / "data" / split / c, 4)
    bomb = tmp_path / "data" / "val" / "cat" / "bomb.png"
    Image.new("L", (400, 300)).save(bomb)  # 120,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # PIL refuses over twice its limit
    with pytest.raises(BadImageError, match=r"cannot read image .*bomb.png: Image size \(120000 pixels\) exceeds limit .*"
                                            r"decompression bomb"):
        load_rgb(bomb)
    code, out, err = run_main("fit", "--config", QUICKSTART, *TINY, "--data", "agentlit.data.ImageFolderDataModule",
                              "--data.root", str(tmp_path / "data"), "--data.img_size", "16", "--data.batch_size", "4",
                              "--data.num_workers", "0", "--model.num_classes", "2", "--trainer.max_steps", "1",
                              "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert_one_line_error(code, err, r"cannot read image .*bomb.png: .*decompression bomb")


def test_bad_mask_is_one_line_naming_the_file(tmp_path):
    from agentlit.data.segmentation import SegFolderDataset

    _images(tmp_path / "img", 2)
    (tmp_path / "mask").mkdir()
    Image.new("L", (20, 20)).save(tmp_path / "mask" / "0.png")
    (tmp_path / "mask" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = SegFolderDataset(tmp_path / "img", tmp_path / "mask", num_classes=2)
    with pytest.raises(BadImageError, match=r"cannot read mask .*mask/1.png: .*Replace or delete the file$"):
        ds[1]


def test_segmentation_images_sharing_a_stem_next_to_masks_are_an_error(tmp_path):
    from agentlit.data.segmentation import SegFolderDataset

    _images(tmp_path / "img", 1)
    Image.new("RGB", (20, 20)).save(tmp_path / "img" / "0.jpg")
    (tmp_path / "mask").mkdir()
    Image.new("L", (20, 20)).save(tmp_path / "mask" / "0.png")
    with pytest.raises(ValueError, match=r"images 0.jpg and 0.png in .*img share the stem '0', so both would pair with the "
                                         r"mask 0.png; rename or remove one of them"):
        SegFolderDataset(tmp_path / "img", tmp_path / "mask", num_classes=2)
    assert SegFolderDataset(tmp_path / "img", None, num_classes=2).names == ["0.jpg", "0.png"]  # predict: both kept


# ------------------------------------------------------------------------------------ predictions
def test_colliding_stems_get_distinct_output_names(tmp_path):
    files = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "sub" / "b.png", tmp_path / "c.png"]
    assert unique_names(files, tmp_path) == ["a.png", "a.jpg", "b.png", "sub_b.png", "c"]
    assert unique_names(["x/a.png", "y/a.png", "x_a.png.png"], ".") == ["x_a.png", "y_a.png", "x_a.png-1"]




def test_segmentation_predict_keeps_both_colliding_stems(seg_checkpoint, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "a.jpg")
    code, out, err = run_main("predict", "--config", SEG_CONFIG, *SEG_TINY, "--ckpt_path", str(seg_checkpoint),
                              "--data.predict_root", str(folder), "--data.val_batch_size", "1",
                              "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert code == 0, err[-3000:]
    written = sorted(p.name for p in (tmp_path / "runs" / "version_0" / "predictions").iterdir() if p.name[0] != ".")
    assert written == ["a.jpg.png", "a.jpg_overlay.png", "a.png.png", "a.png_overlay.png"]


def test_failed_predict_keeps_what_it_already_wrote(seg_checkpoint, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / f"{name}.png")
    (folder / "c.png").write_bytes(b"not an image")  # the third batch fails
    code, out, err = run_main("predict", "--config", SEG_CONFIG, *SEG_TINY, "--ckpt_path", str(seg_checkpoint),
                              "--data.predict_root", str(folder), "--data.val_batch_size", "1",
                              "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert_one_line_error(code, err, r"cannot read image .*c.png")
    written = sorted(p.name for p in (tmp_path / "runs" / "version_0" / "predictions").iterdir() if p.name[0] != ".")
    assert written == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]


# ---------------------------------------------------------------------------------------- data
def test_coco_polygons_with_fewer_than_three_points_are_dropped_not_a_traceback(tmp_path):
    from agentlit.data.coco import COCOInstances, read_coco

    (tmp_path / "val").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "val" / "a.jpg")
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0,
                 "segmentation": [[2, 2, 12, 2]]},  # two points: no area
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [14, 14, 10, 10], "area": 50, "iscrowd": 0,
                 "segmentation": [[14, 14, 24, 14, 24, 24], [20, 20]]},  # a good polygon and a one-point one
            ]}
    ann = tmp_path / "instances_val.json"
    ann.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"dropped polygons with fewer than 3 points from 2 annotation\(s\) \(e.g. annotation 1\)"):
        checked = read_coco(ann, tmp_path / "val")
    sample = COCOInstances(tmp_path / "val", checked, [1])[0]
    masks = sample["masks"].as_subclass(torch.Tensor)
    assert masks.shape == (2, 32, 32)
    assert masks[0, 2:12, 2:12].all() and masks[0].sum() >= 100  # the box stands in for the dropped polygon
    assert masks[1, 14:24, 14:24].sum() > 0 and masks[1, :10].sum() == 0
    data["annotations"][0]["segmentation"] = [[2, 2, 12]]  # an odd number of coordinates is malformed, not degenerate
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotation 1 \(image a.jpg\) has a segmentation that is not a list of polygons"):
        read_coco(ann, tmp_path / "val")


def _seg_folders(root: Path) -> None:
    for split in ("train", "val"):
        _images(root / split / "img", 4, size=64)
        (root / split / "mask").mkdir(parents=True)
        for i in range(4):
            Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 3).astype(np.uint8), "L").save(root / split / "mask" / f"{i}.png")
    (root / "classes.txt").write_text("background\nround\nsquare\n")


@pytest.mark.parametrize("names", ["file", "list"])
def test_folder_segmentation_class_names_given_only_to_the_data(names, tmp_path):
    _seg_folders(tmp_path / "d")
    value = str(tmp_path / "d" / "classes.txt") if names == "file" else "[background, round, square]"
    code, out, err = run_main("fit", "--config", SEG_CONFIG, "--data", "agentlit.data.FolderSegmentationDataModule",
                              *[a for k in ("train", "val") for a in (f"--data.{k}_images", str(tmp_path / "d" / k / "img"),
                                                                     f"--data.{k}_masks", str(tmp_path / "d" / k / "mask"))],
                              "--data.class_names", value, "--data.crop_size", "64", "--data.num_workers", "0",
                              "--data.batch_size", "2", "--data.val_batch_size", "4", "--model.num_classes", "3",
                              "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
                              "--trainer.enable_progress_bar", "false",
                              "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "round" in out and "square" in out  # the per-class table names the data's classes
