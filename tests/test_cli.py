"""The ``agentlit`` command end to end: fit → checkpoint → test, DDP on the CPU, clear errors."""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import QUICKSTART, TINY
from cli_helpers import run_agentlit as agentlit


def last_val_acc(run: Path) -> float:
    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val/acc1")]
    return float(rows[-1]["val/acc1"])


@pytest.mark.slow
def test_fit_writes_run_folder_and_test_reproduces_accuracy(tmp_path):
    fit = agentlit("fit", "--config", QUICKSTART, *TINY, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
                   "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)
    run = tmp_path / "runs" / "version_0"
    # the end of fit names the best score, both checkpoints, the run folder and the curves it drew
    assert re.search(r"best val/acc1: [0-9.]+ +\(.*checkpoints/epoch.*\.ckpt\)", fit.stdout), fit.stdout[-2000:]
    assert f"last checkpoint: {Path('runs') / 'version_0' / 'checkpoints' / 'last.ckpt'}" in fit.stdout.replace(str(tmp_path) + "/", "")
    assert (run / "metrics.png").stat().st_size > 1000 and "tensorboard --logdir" in fit.stdout
    assert "FLOPs" not in fit.stdout and "litlogger" not in fit.stdout + fit.stderr  # no "Total FLOPs: 0", no advert
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert (run / "checkpoints" / "last.ckpt") in ckpts and len(ckpts) >= 2  # best-by-val/acc1 + last
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard events missing from the run folder"
    acc = last_val_acc(run)
    out = agentlit("test", "--config", QUICKSTART, *TINY, "--trainer.default_root_dir", str(tmp_path / "runs"),
                   "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path)
    match = re.search(r"test/acc1\s*[│|]\s*([0-9.]+)", out.stdout)
    assert match, out.stdout[-2000:]
    assert float(match.group(1)) == pytest.approx(acc, abs=1e-6)
    assert (tmp_path / "runs" / "version_1").is_dir()  # a new run folder, nothing overwritten

    # export → plain timm loads it (only `import agentlit` registers the model) and agrees with the module
    agentlit("export", "--config", QUICKSTART, *TINY, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
             "--output", str(tmp_path / "model.safetensors"), cwd=tmp_path)
    import timm

    import agentlit as _  # noqa: F401
    from agentlit.tasks import ClassificationModule

    net = timm.create_model("agent_deit_tiny", pretrained=True, num_classes=10, img_size=16, patch_size=8, depth=1,
                            agent_num=4, embed_dim=32, num_heads=2,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=10)).eval()
    module = ClassificationModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), module(x))


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_and_checkpoint_loads(tmp_path):
    from agentlit.tasks import ClassificationModule

    agentlit("fit", "--config", QUICKSTART, *TINY, "--trainer.strategy", "ddp", "--trainer.devices", "2",
             "--trainer.accelerator", "cpu", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2",
             "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["version_0"]  # both ranks agreed on one run folder
    ckpt = torch.load(runs[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    module = ClassificationModule.load_from_checkpoint(runs[0] / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model.model_name", "agent_deit_tiyn"], r"unknown model name 'agent_deit_tiyn'; closest registered names: \['agent_deit_tiny'"),
        (["--data", "agentlit.data.ImageFolderDataModule", "--data.root", "missing_dir"], r"dataset root missing_dir does not exist"),
        (["--model.img_size", "20", "--data.img_size", "20"], r"img_size=20 is not divisible by patch_size=8"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, args, expected):
    proc = agentlit("fit", "--config", QUICKSTART, *TINY, *args, "--trainer.max_steps", "1",
                    "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(expected, proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_unknown_yaml_key_lists_valid_ones(tmp_path):
    proc = agentlit("fit", "--config", QUICKSTART, "--model.learning_rate", "1", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "learning_rate" in proc.stderr and "lr" in proc.stderr


def test_help_lists_subcommands_without_loading_the_heavy_libraries():
    code = ("import sys; from agentlit.cli import main; main(['--help']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'timm', 'diffusers', 'transformers'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout  # `agentlit --help` answers at once
    for sub in ("fit", "validate", "test", "predict", "profile", "export"):
        assert f"  {sub} " in proc.stdout


def test_static_help_matches_the_cli():
    from agentlit.cli import SUBCOMMANDS, AgentLitCLI

    assert list(SUBCOMMANDS) == list(AgentLitCLI.subcommands())


def test_import_is_lazy_and_timm_still_finds_the_models():
    code = ("import sys, agentlit; heavy = {'torch', 'timm', 'diffusers'} & {m.split('.')[0] for m in sys.modules}; "
            "assert not heavy, heavy; import timm; m = timm.create_model('agent_deit_tiny', img_size=32, patch_size=8, agent_num=4); "
            "print(type(m).__name__, len(timm.list_models('agent_*')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, count = proc.stdout.split()
    assert name == "AgentVisionTransformer" and int(count) >= 13


def test_print_config_shows_the_loggers_and_callbacks_that_run(tmp_path):
    import yaml

    from cli_helpers import run_main

    code, out, err = run_main("fit", "--config", QUICKSTART, *TINY, "--trainer.default_root_dir", "runs", "--print_config",
                              cwd=tmp_path)
    assert code == 0, err
    trainer = yaml.safe_load(out)["trainer"]
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in trainer["logger"]] == ["CSVLogger", "TensorBoardLogger"]
    assert {lg["init_args"]["save_dir"] for lg in trainer["logger"]} == {"runs"}
    callbacks = {cb["class_path"].rsplit(".", 1)[1]: cb["init_args"] for cb in trainer["callbacks"]}
    assert {"ModelCheckpoint", "StepSeed", "SafeInterrupt", "LearningRateMonitor", "ModelSummary"} <= set(callbacks)
    monitors = [cb["init_args"].get("monitor") for cb in trainer["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    assert monitors == ["val/acc1", None]  # best by the task's metric + last.ckpt
    assert not (tmp_path / "runs").exists()  # printing the config runs nothing
