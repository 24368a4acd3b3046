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
    # the evaluation belongs to its run: metrics in version_0/test/, no new empty version_N
    assert (run / "test" / "metrics.csv").is_file() and "metrics written to runs/version_0/test/metrics.csv" in out.stdout
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["version_0"]
    # evaluation takes any batch size (only a resumed fit must keep the global batch); a second test does not overwrite
    again = agentlit("test", "--config", QUICKSTART, *TINY, "--trainer.default_root_dir", str(tmp_path / "runs"),
                     "--ckpt_path", "last", "--data.batch_size", "7", cwd=tmp_path)
    assert float(re.search(r"test/acc1\s*[│|]\s*([0-9.]+)", again.stdout).group(1)) == pytest.approx(acc, abs=1e-6)
    assert (run / "test-1" / "metrics.csv").is_file() and (run / "test" / "metrics.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["version_0"]

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


def test_evaluation_takes_any_batch_size_and_a_resumed_fit_keeps_the_global_batch():
    from types import SimpleNamespace

    from agentlit.data.base import ResumableDataModule, ResumeError

    state = {"epoch": 1, "batches_done": 4, "batch_size": 8, "world_size": 1, "accumulate_grad_batches": 1}
    dm = ResumableDataModule()
    dm.batch_size = 7
    for stage in ("validate", "test", "predict"):
        dm.trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1, state=SimpleNamespace(fn=stage))
        dm.load_state_dict(state)
        assert dm._resume is None  # evaluation does not resume a training epoch
    dm.trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1, state=SimpleNamespace(fn="fit"))
    with pytest.raises(ResumeError, match="keep it with --data.batch_size 8"):
        dm.load_state_dict(state)


# ------------------------------------------------------------------------ answered before torch loads
HEAVY = "{'torch', 'lightning', 'timm', 'diffusers', 'transformers', 'torchvision'}"


def _light_main(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``agentlit.cli.main(args)`` in a fresh interpreter; its last stdout line lists the heavy libraries it imported."""
    code = (f"import sys\nfrom agentlit.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n"
            f"    sys.stdout.flush(); print('exit', e.code)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY}))")
    from cli_helpers import agentlit_env

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=agentlit_env(cwd or Path.cwd()))


@pytest.mark.parametrize("args,expected", [
    (["fitt", "--config", QUICKSTART], r"^agentlit: error: unknown sub-command 'fitt'; did you mean `agentlit fit`\? \(choose from fit, validate, test"),
    (["tset"], r"unknown sub-command 'tset'; did you mean `agentlit test`\?"),
    (["fit", "--config", QUICKSTART.replace("quickstart.yaml", "quickstrat.yaml")],
     r"--config \S*configs/quickstrat.yaml does not exist; did you mean \S*configs/quickstart.yaml\?"),
    (["test", "-c", "nowhere/x.yaml"], r"--config nowhere/x.yaml does not exist \(no folder nowhere\)"),
    (["fit", "--config", str(Path(QUICKSTART).parent)], r"--config \S*configs is a folder; give a YAML file"),
    (["--foo"], r"choose a sub-command: fit, validate, test, predict, profile, export"),
])
def test_typos_and_missing_config_files_are_answered_before_torch_loads(args, expected, tmp_path):
    proc = _light_main(args, cwd=tmp_path)
    *_, status, heavy = proc.stdout.strip().splitlines()
    assert status == "exit 2" and heavy == "[]", proc.stdout + proc.stderr
    assert re.search(expected, proc.stderr, re.M) and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


def test_version_names_the_libraries_without_importing_them():
    from agentlit.environment import installed

    proc = _light_main(["--version"])
    version, heavy = proc.stdout.strip().splitlines()
    assert heavy == "[]", proc.stdout
    assert version.startswith("agentlit 0.1.0 (torch ") and f"torchvision {installed('torchvision')}" in version
    assert f"timm {installed('timm')}" in version and "Python 3." in version


def test_thread_default_is_set_before_torch_unless_the_user_chose(monkeypatch, capsys):
    import os

    import agentlit.cli as cli_module
    import agentlit.environment as environment
    from agentlit.environment import apply_thread_default, thread_default

    monkeypatch.setattr(environment.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(environment, "_physical_share", lambda: 1.0)  # torch would start 2 threads
    seen = {}
    monkeypatch.setattr(cli_module, "cli", lambda argv: seen.update(
        {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}))
    for name in environment.THREAD_VARIABLES:  # unset now, and again after the test (main sets some)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # idle machine: torch's own default (the fastest there)
    monkeypatch.setattr(environment, "busy_cores", lambda interval=0.2: 0.3)
    cli_module.main(["fit", "--config", QUICKSTART])
    assert seen == {"OMP_WAIT_POLICY": None, "OMP_NUM_THREADS": None} and "CPU thread" not in capsys.readouterr().err
    # one core kept busy by another process: the same threads, waiting passively, and a line that says so
    # (never fewer threads: float sums depend on their number, and results must not depend on the load)
    monkeypatch.setattr(environment, "busy_cores", lambda interval=0.2: 0.9)
    cli_module.main(["fit", "--config", QUICKSTART])
    assert seen == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": None}
    assert "agentlit: other work keeps CPU cores busy: torch's threads wait passively" in capsys.readouterr().err
    monkeypatch.setattr(environment, "busy_cores", lambda interval=0.2: None)  # no /proc/stat: torch's default
    assert thread_default() == {}
    # a thread variable the user set wins: nothing is added
    for chosen in ({"OMP_NUM_THREADS": "2"}, {"MKL_NUM_THREADS": "1"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        env = dict(chosen)
        assert apply_thread_default(env) == {} and env == chosen


def test_busy_cores_sees_a_spinning_process():
    import subprocess

    from agentlit.environment import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_cores(0.5) >= 0.5  # at least most of a core, whatever else runs
    finally:
        spinner.kill()
        spinner.wait()


# ------------------------------------------------------------------------ a broken install in one line
def _fake_package(site: Path, name: str, version: str, body: str) -> None:
    """An installed-looking ``name`` (a dist-info with ``version``) whose import runs ``body``."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(body)
    (site / f"{name}-{version}.dist-info").mkdir()
    (site / f"{name}-{version}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_mismatched_torchvision_is_one_environment_line(tmp_path):
    """torch and a torchvision built for another torch: the first `fit` ends in one line naming both versions
    and the torchvision that fits, not torchvision's 50-line traceback."""
    from agentlit.environment import TESTED, installed

    site = tmp_path / "site-packages"
    _fake_package(site, "torchvision", "0.17.0", 'raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**__import__("cli_helpers").agentlit_env(tmp_path)}
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-m", "agentlit", "fit", "--config", QUICKSTART], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    torch_minor = int(installed("torch").split(".")[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"agentlit: error: torchvision 0.17.0 does not work with the installed torch {installed('torch')} (operator "
        f"torchvision::nms does not exist); install the torchvision built for it: pip install \"torchvision==0.{torch_minor + 15}.*\" "
        f"(CPU build: add --index-url https://download.pytorch.org/whl/cpu); tested pair: torch {TESTED['torch']} + "
        f"torchvision {TESTED['torchvision']}"]


def test_a_library_failing_inside_a_task_is_named_with_its_versions(tmp_path):
    """diffusers is imported only when a generation task is built (inside jsonargparse): its import failure
    still becomes one line naming diffusers, the versions found and a set that works."""
    import importlib.util

    from agentlit.cli import describe_error

    site = tmp_path / "site-packages"
    _fake_package(site, "diffusers", "0.20.0", "from huggingface_hub import cached_download_gone\n")
    spec = importlib.util.spec_from_file_location("diffusers_fake", site / "diffusers" / "__init__.py")
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except ImportError as inner:
        try:
            raise ValueError("Problem with given class_path 'agentlit.tasks.GenerationModule'") from inner
        except ValueError as outer:
            line = describe_error(outer)
    assert line.startswith("diffusers ") and "fails to import (cannot import name 'cached_download_gone' from 'huggingface_hub'" in line
    assert "huggingface_hub " in line and "a set that works: torch " in line and 'pip install "diffusers==' in line
    # an unrelated error raised in a module body of ours is not mistaken for a broken install
    assert describe_error(RuntimeError("boom")) is None


def test_an_evaluation_that_wrote_its_outputs_elsewhere_leaves_no_run_folder(tmp_path):
    """predict of a pipeline that writes into model.output_dir: the run folder the loggers claimed holds only
    the config, and is removed at the end — never an empty new version_N."""
    from cli_helpers import ROOT, run_main

    code, out, err = run_main("predict", "--config", str(ROOT / "configs" / "generation" / "quickstart.yaml"),
                              "--trainer.logger", "true", "--trainer.default_root_dir", "runs", "--model.output_dir", "gen",
                              "--model.num_inference_steps", "1", "--model.height", "32", "--model.width", "32", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "agentlit: predict read 6 prompt/seed pairs; wrote 6 images and generation.json to gen" in out
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
