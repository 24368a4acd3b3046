"""Weights files are data, never code: every entry point that reads one refuses a malicious pickle
in one line without running it; the reference release's training-save layout (with its pickled
``yacs.config.CfgNode``) loads without yacs; exports reload in one line.
"""
from __future__ import annotations

import json
import os
import pickle
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from cli_helpers import QUICKSTART, TINY as CLI_TINY, run_agentlit

import agentlit
from agentlit.checkpoint import CheckpointError, ConfigNode, check_checkpoint_file, load_checkpoint, load_state_dict_file
from agentlit.export import export_weights, load_exported, read_export_metadata
from agentlit.tasks import ClassificationModule

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_name="agent_deit_tiny", num_classes=3, img_size=16,
            model_kwargs=dict(patch_size=8, depth=1, agent_num=4, embed_dim=32, num_heads=2))
DEIT_KW = dict(img_size=16, patch_size=8, depth=1, agent_num=4, embed_dim=32, num_heads=2)
REFUSAL = r"needs Python objects a weights file should not contain \(.*system.*\); it was not loaded"


class _Payload:
    """Pickles as a call to os.system that writes a marker file: must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > \"{self.marker}\"",)


def _malicious(path: Path, marker: Path, layout: str = "lightning") -> Path:
    inner = {"head.weight": torch.zeros(3, 32)}
    obj = {"state_dict": inner, "x": _Payload(marker)} if layout == "lightning" else {"model": inner, "x": _Payload(marker)}
    torch.save(obj, path)
    return path


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    yield _malicious(tmp_path / "evil.ckpt", marker), marker
    assert not marker.exists(), "the pickle payload ran"


# ------------------------------------------------------------------------------------ the loader
def test_loader_refuses_malicious_pickle_in_one_line(evil):
    path, _ = evil
    for load in (load_checkpoint, load_state_dict_file, check_checkpoint_file):
        with pytest.raises(CheckpointError, match=REFUSAL) as info:
            load(path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and "weights_only=False" not in msg
        assert ".safetensors" in msg  # says how to convert


def test_legacy_format_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "legacy.pth"
    torch.save({"model": {}, "x": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=REFUSAL):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["missing", "folder", "truncated", "garbage", "empty", "safetensors"])
def test_unreadable_files_get_one_sentence(tmp_path, case):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(64, 64)}}, good)
    path = {"missing": tmp_path / "nope.pth", "folder": tmp_path}.get(case, tmp_path / f"bad.{case}")
    if case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "garbage":
        path.write_bytes(b"hello, not a checkpoint at all")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "safetensors":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"\xff" * 64)
    expected = FileNotFoundError if case == "missing" else CheckpointError
    for load in (load_checkpoint, check_checkpoint_file):
        with pytest.raises(expected) as info:
            load(path)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and len(msg) < 300, msg


def test_no_weights_only_false_in_the_package():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "agentlit").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line.replace(" ", "")]
    assert hits == []


def test_safe_globals_are_registered_at_import():
    import subprocess

    # a fresh interpreter: `import agentlit` (registering when timm is imported) is all it takes
    code = ("import agentlit, timm, torch, json; "
            "print(json.dumps(sorted(torch.serialization._weights_only_unpickler._get_user_allowed_globals())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    names = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert {"yacs.config.CfgNode", "argparse.Namespace", "numpy.dtype", "numpy._core.multiarray.scalar",
            "numpy.core.multiarray.scalar", "numpy._core.multiarray._reconstruct"} <= names
    runs_code = {"builtins.eval", "builtins.exec", "builtins.compile", "builtins.getattr", "builtins.__import__",
                 "builtins.open", "builtins.setattr", "functools.partial"}
    assert not names & runs_code
    assert not any(n.split(".")[0] in ("os", "posix", "nt", "subprocess", "importlib", "pickle", "runpy") for n in names)


def test_plain_data_objects_load(tmp_path):
    import argparse

    obj = {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1, sizes=[1, 2]),
           "acc": np.float64(81.5), "steps": np.int64(7), "hist": np.arange(4, dtype=np.float32)}
    torch.save(obj, tmp_path / "a.pth")
    out = load_checkpoint(tmp_path / "a.pth")
    assert out["args"].lr == 0.1 and out["acc"] == 81.5 and out["steps"] == 7
    np.testing.assert_array_equal(out["hist"], np.arange(4, dtype=np.float32))


# --------------------------------------------------------------- entry points inside the package
def test_model_checkpoint_path_refuses(evil):
    with pytest.raises(CheckpointError, match=REFUSAL):
        ClassificationModule(**TINY, checkpoint_path=str(evil[0]))


def test_segmentation_backbone_checkpoint_refuses(evil):
    from agentlit.tasks.segmentation import SegmentationModule

    kw = dict(img_size=32, embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
              mlp_ratios=[1, 1, 1, 1], agent_num=[4, 4, 4, 1])
    with pytest.raises(CheckpointError, match="backbone checkpoint .*" + REFUSAL):
        SegmentationModule("agent_pvt_tiny", num_classes=2, backbone_kwargs=kw, backbone_checkpoint=str(evil[0]))


def test_detection_backbone_checkpoint_refuses(evil):
    from agentlit.tasks.detection import DetectionModule

    kw = dict(img_size=32, embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
              mlp_ratios=[1, 1, 1, 1], agent_num=[4, 4, 4, 1])
    with pytest.raises(CheckpointError, match=REFUSAL):
        DetectionModule("agent_pvt_tiny", num_classes=2, backbone_kwargs=kw, fpn_channels=8,
                        backbone_checkpoint=str(evil[0]))


def test_export_refuses(evil, tmp_path):
    with pytest.raises(CheckpointError, match=REFUSAL):
        export_weights(ClassificationModule(**TINY), str(evil[0]), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_timm_pretrained_file_after_import_agentlit_never_runs_the_payload(tmp_path):
    marker = tmp_path / "PWNED"
    path = _malicious(tmp_path / "evil.pth", marker, layout="release")
    with pytest.raises((pickle.UnpicklingError, RuntimeError), match="system"):  # timm's weights-only refusal
        timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **DEIT_KW)
    assert not marker.exists()


def test_trainer_refuses_weights_only_false_and_malicious_ckpt_path(evil):
    import lightning as L

    from agentlit.trainer import AgentTrainer

    trainer = AgentTrainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)
    module = ClassificationModule(**TINY)
    with pytest.raises(CheckpointError, match=REFUSAL):
        trainer.validate(module, dataloaders=[], ckpt_path=str(evil[0]))
    with pytest.raises(ValueError, match=r"weights_only must stay True"):
        trainer.validate(module, dataloaders=[], ckpt_path=str(evil[0]), weights_only=False)
    assert isinstance(trainer, L.Trainer)


# ------------------------------------------------------------------ entry points through the CLI
@pytest.mark.slow  # six short subprocess runs
@pytest.mark.parametrize("cmd", ["fit", "validate", "test", "predict", "export", "model.checkpoint_path"])
def test_cli_refuses_malicious_checkpoint_in_one_line(tmp_path, evil, cmd):
    path, marker = evil
    args = ["--config", QUICKSTART, *CLI_TINY, "--trainer.default_root_dir", str(tmp_path / "runs")]
    if cmd == "model.checkpoint_path":
        args = ["fit", *args, "--model.checkpoint_path", str(path), "--trainer.max_steps", "1"]
    else:
        args = [cmd, *args, "--ckpt_path", str(path)] + (["--output", str(tmp_path / "m.safetensors")] if cmd == "export" else [])
    proc = run_agentlit(*args, cwd=tmp_path, check=False)
    err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) <= 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "evil.ckpt" in err[-1] and "system" in err[-1] and "weights_only=False" not in proc.stderr
    assert not marker.exists()


# --------------------------------------------------------------------- the release's save layout
def _release_checkpoint(path: Path, model: torch.nn.Module) -> None:
    """The reference release's training save: {'model', 'optimizer', 'lr_scheduler', 'max_accuracy',
    'epoch', 'config'} with ``config`` a pickled ``yacs.config.CfgNode``; yacs is faked in
    sys.modules only while saving, so the file names the real class and nothing can import it."""

    class CfgNode(dict):  # what yacs' CfgNode pickles like: dict items + two flags in __dict__
        IMMUTABLE, NEW_ALLOWED = "__immutable__", "__new_allowed__"

        def __init__(self, init_dict=None, new_allowed=False):
            super().__init__(init_dict or {})
            self.__dict__[CfgNode.IMMUTABLE] = False
            self.__dict__[CfgNode.NEW_ALLOWED] = new_allowed

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    yacs_config.CfgNode = CfgNode
    saved = {k: sys.modules.get(k) for k in ("yacs", "yacs.config")}
    sys.modules.update({"yacs": yacs, "yacs.config": yacs_config})
    try:
        config = CfgNode({"MODEL": CfgNode({"TYPE": "agent_deit", "NAME": "agent_deit_tiny", "DROP_PATH_RATE": 0.1}),
                          "DATA": CfgNode({"IMG_SIZE": 16, "BATCH_SIZE": 128}), "TRAIN": CfgNode({"EPOCHS": 300})})
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        opt.step()
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                    "max_accuracy": np.float64(72.5), "epoch": 299, "config": config}, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert sys.modules.get("yacs.config") is not yacs_config  # the fake is gone: loading cannot use it
    assert b"yacs.config" in _pickle_bytes(path)


def _pickle_bytes(path: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def test_release_training_layout_loads_without_yacs(tmp_path):
    ref = timm.create_model("agent_deit_tiny", num_classes=10, **DEIT_KW).eval()
    path = tmp_path / "agent_deit_t.pth"
    _release_checkpoint(path, ref)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt["config"], ConfigNode) and ckpt["config"].MODEL.NAME == "agent_deit_tiny"
    assert ckpt["config"]["DATA"]["IMG_SIZE"] == 16 and float(ckpt["max_accuracy"]) == 72.5 and ckpt["epoch"] == 299
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = ref(x)
        # the README path: plain timm, strict (the overlay's class count matches: nothing is dropped)
        via_timm = timm.create_model("agent_deit_tiny", pretrained=True, num_classes=10, **DEIT_KW,
                                     pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
        # --model.checkpoint_path (load_weights: any key that does not fit is an error)
        module = ClassificationModule(**{**TINY, "num_classes": 10}, checkpoint_path=str(path)).eval()
        torch.testing.assert_close(via_timm(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(module.model(x), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- export
def _exported(tmp_path: Path, umask: int) -> tuple[ClassificationModule, Path]:
    from agentlit.data import DigitsDataModule

    module = ClassificationModule(**{**TINY, "num_classes": 10}).eval()
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": module.state_dict(), "class_names": [f"digit {i}" for i in range(10)]}, ckpt)
    old = os.umask(umask)
    try:
        out = export_weights(ClassificationModule(**{**TINY, "num_classes": 10}), str(ckpt), tmp_path / "m.safetensors",
                             datamodule=DigitsDataModule(img_size=16))
    finally:
        os.umask(old)
    return module, out


def test_export_reloads_in_one_line_with_its_data_config(tmp_path):
    module, path = _exported(tmp_path, 0o022)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = module.model(x)
        model = load_exported(path)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        meta = read_export_metadata(path)
        plain = timm.create_model(meta["architecture"], pretrained=True, **meta["model_kwargs"],
                                  pretrained_cfg_overlay=dict(file=str(path), **meta["pretrained_cfg"])).eval()
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
    assert agentlit.load_exported is load_exported
    cfg = meta["pretrained_cfg"]
    assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["std"] == [0.5, 0.5, 0.5] and cfg["input_size"] == [3, 16, 16]
    assert cfg["num_classes"] == 10 and cfg["label_names"][3] == "digit 3"
    assert meta["model_kwargs"]["num_classes"] == 10 and meta["model_kwargs"]["img_size"] == 16
    data = timm.data.resolve_data_config(model=model)
    assert tuple(data["mean"]) == (0.5, 0.5, 0.5) and tuple(data["input_size"]) == (3, 16, 16)
    assert json.loads(json.dumps(meta["model_kwargs"])) == meta["model_kwargs"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_export_file_mode_follows_umask(tmp_path, umask):
    _, path = _exported(tmp_path, umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# -------------------------------------------------------------- our own checkpoints are plain data
def test_fit_checkpoint_is_plain_data_and_resumes_with_weights_only(tmp_path):
    from agentlit.data import DigitsDataModule
    from agentlit.trainer import AgentTrainer

    def trainer(steps: int) -> AgentTrainer:
        return AgentTrainer(max_steps=steps, limit_val_batches=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)

    dm = DigitsDataModule(img_size=16, batch_size=8)
    first = trainer(1)
    first.fit(ClassificationModule(**{**TINY, "num_classes": 10}), datamodule=dm)
    ckpt = tmp_path / "step1.ckpt"
    first.save_checkpoint(ckpt)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt)) == []
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert raw["hyper_parameters"]["model_kwargs"]["embed_dim"] == 32
    resumed = trainer(2)
    resumed.fit(ClassificationModule(**{**TINY, "num_classes": 10}), datamodule=dm, ckpt_path=str(ckpt))
    assert resumed.global_step == 2


def test_segmentation_hparams_are_plain_data(tmp_path):
    from agentlit.tasks.segmentation import SegmentationModule

    kw = dict(img_size=32, embed_dims=[8, 8, 8, 8], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
              mlp_ratios=[1, 1, 1, 1], agent_num=[4, 4, 4, 1])
    m = SegmentationModule("agent_pvt_tiny", num_classes=2, backbone_kwargs=kw, out_indices=(0, 1, 2, 3),
                           crop_size=(32, 32), head_channels=8, neck_channels=8)
    torch.save({"hyper_parameters": dict(m.hparams), "state_dict": m.state_dict()}, tmp_path / "seg.ckpt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "seg.ckpt")) == []


def test_ckpt_path_is_read_once_by_a_resumed_fit_test_and_export(tiny_checkpoint, tmp_path, monkeypatch):
    """agentlit.checkpoint.resolve reads --ckpt_path once; Lightning's restore and export take that
    data (no second torch.load, no separate safety scan)."""
    import shutil

    from cli_helpers import QUICKSTART, TINY, run_main

    folder = tmp_path / "runs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, folder / "last.ckpt")
    reads: list[str] = []
    load, scan = torch.load, torch.serialization.get_unsafe_globals_in_checkpoint
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or load(f, *a, **k))
    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", lambda f: reads.append(f"scan {f}") or scan(f))
    for sub, extra in [("fit", ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"]),
                       ("test", ["--trainer.limit_test_batches", "1"]),
                       ("export", ["--output", "model.safetensors"])]:
        reads.clear()
        code, out, err = run_main(sub, "--config", QUICKSTART, *TINY, *extra, "--ckpt_path", "last",
                                  "--trainer.default_root_dir", "runs", cwd=tmp_path)
        assert code == 0, err[-3000:]
        assert reads == [str(Path("runs") / "version_0" / "checkpoints" / "last.ckpt")], (sub, reads)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3  # the resume really ran
    assert (tmp_path / "model.safetensors").is_file()  # the export really ran
