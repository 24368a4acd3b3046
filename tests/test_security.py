"""Settings are data: a checkpoint's stored settings (and a config file's mapping-typed setting) name
no code to run, no weights to fetch and no place to write, and never beat what the user gave.

Every sub-command that takes ``--ckpt_path`` is tried with the file by path and through
``--ckpt_path last``; the commands run in this process (``agentlit.cli.main``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from agentlit.stored_settings import SettingsError, check_stored, merge_stored, plain_data_problem
from agentlit.tasks import ClassificationModule
from cli_helpers import QUICKSTART, SEG_CONFIG, SEG_TINY, TINY, assert_one_line_error, run_main

SUBCOMMANDS = ["fit", "validate", "test", "predict", "export"]


def _command(sub: str, config: str, args: list[str], ckpt: str, root: Path, out: Path) -> list[str]:
    extra = {"fit": ["--trainer.max_steps", "3"], "export": ["--output", str(out / "model.safetensors")]}.get(sub, [])
    limits = [] if sub in ("fit", "export") else [f"--trainer.limit_{'val' if sub == 'validate' else sub}_batches", "1"]
    return [sub, "--config", config, *args, "--trainer.default_root_dir", str(root), "--ckpt_path", ckpt, *extra, *limits]


def _place(ckpt: Path, tmp_path: Path, how: str) -> tuple[str, Path]:
    """(the --ckpt_path argument, the runs folder) for ``ckpt`` given by path or found by ``last``."""
    root = tmp_path / "runs"
    if how == "path":
        return str(ckpt), root
    target = root / "version_0" / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copy(ckpt, target)
    return "last", root




def _with_settings(src: Path, dest: Path, **changes) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], **changes}}, dest)
    return dest


def _evil(kind: str, tiny_checkpoint: Path, folder: Path, marker: Path) -> Path:
    hp = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    popen = {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}}
    changes = {
        # a dict-typed setting holding a class spec: plain LightningCLI builds it (the command runs)
        "callable": {"model_kwargs": {**hp["model_kwargs"], "evil": popen}},
        # another class switched in as the task, built from the stored settings
        "task class": {"_class_path": "subprocess.Popen", "args": f"touch {marker}", "shell": True},
        # a hub model name: timm would try to download it
        "network name": {"model_name": "hf-hub:someone/evil-model", "pretrained": True},
    }[kind]
    return _with_settings(tiny_checkpoint, folder / "evil.ckpt", **changes)


REFUSED = {
    "callable": r"(evil|last).ckpt stores the setting model_kwargs.evil with a class_path key naming 'subprocess.Popen'; "
                r"stored settings are plain values",
    "task class": r"names 'subprocess.Popen' as its task; a checkpoint may only name a task agentlit ships "
                  r"\(agentlit.tasks.ClassificationModule, .*\): it was not used, nothing was run",
    "network name": r"stores model_name='hf-hub:someone/evil-model', a place to fetch weights from; .*nothing was fetched",
}


@pytest.mark.parametrize("how", ["path", "last"])
@pytest.mark.parametrize("sub", SUBCOMMANDS)
@pytest.mark.parametrize("kind", list(REFUSED))
def test_checkpoint_naming_code_or_a_download_is_refused_by_every_subcommand(kind, sub, how, tiny_checkpoint, tmp_path):
    marker = tmp_path / "PWNED"
    arg, root = _place(_evil(kind, tiny_checkpoint, tmp_path, marker), tmp_path, how)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run_main(*_command(sub, QUICKSTART, TINY, arg, root, tmp_path), cwd=tmp_path)
    assert_one_line_error(code, err, REFUSED[kind])
    assert not marker.exists(), "the stored class was built: the command ran"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "something was written"




@pytest.mark.parametrize("how", ["path", "last"])
@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_stored_output_location_is_never_used(sub, how, seg_checkpoint, tmp_path):
    outside = tmp_path / "outside"
    arg, root = _place(_with_settings(seg_checkpoint, tmp_path / "out.ckpt", output_dir=str(outside)), tmp_path, how)
    code, out, err = run_main(*_command(sub, SEG_CONFIG, SEG_TINY, arg, root, tmp_path), cwd=tmp_path)
    assert not outside.exists(), "a stored output_dir chose where to write"
    if sub == "export":  # export writes classifiers only: refused for other reasons, nothing written
        assert_one_line_error(code, err, r"export writes a timm classifier")
        return
    assert code == 0, err[-3000:]
    assert f"ignored its stored output_dir='{outside}'" in err
    if sub == "predict":
        runs = sorted(root.glob("version_*/**/predictions/*_overlay.png"))  # version_0/predict/… for its own run
        assert len(runs) == 4, sorted(root.rglob("*"))


# ------------------------------------------------------------------- stored settings vs the user's
@pytest.mark.parametrize("option,value,stored", [("num_classes", "5", "10"), ("model_name", "agent_pvt_tiny", "'agent_deit_tiny'"),
                                                 ("img_size", "32", "16")])
def test_user_value_conflicting_with_a_stored_network_setting_is_an_error(option, value, stored, tiny_checkpoint, tmp_path):
    code, out, err = run_main("test", "--config", QUICKSTART, *TINY, f"--model.{option}", value, "--ckpt_path", str(tiny_checkpoint),
                              "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert_one_line_error(code, err, rf"--model.{option} '?{value}'? conflicts with checkpoint .*last.ckpt, which was trained "
                                     rf"with {option}={stored}; leave --model.{option} out")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_stored_settings_fill_in_only_what_the_user_left_unset(tiny_checkpoint, tmp_path):
    bare = tmp_path / "bare.yaml"  # the task with no settings: everything the network needs comes from the checkpoint
    bare.write_text("model:\n  class_path: agentlit.tasks.ClassificationModule\n"
                    "data:\n  class_path: agentlit.data.DigitsDataModule\n  init_args: {img_size: 16, batch_size: 32}\n")
    code, out, err = run_main("test", "--config", str(bare), "--ckpt_path", str(tiny_checkpoint), "--model.lr", "0.5",
                              "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                              "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert code == 0, err[-3000:]
    import yaml

    saved = yaml.safe_load((tmp_path / "runs" / "version_0" / "config.yaml").read_text())["model"]["init_args"]
    assert saved["num_classes"] == 10 and saved["img_size"] == 16 and saved["model_kwargs"]["embed_dim"] == 32
    assert saved["lr"] == 0.5  # a training setting the user gave wins without a word


# --------------------------------------------------------------------------- config-file mappings
@pytest.mark.parametrize("where", ["command line", "config file"])
def test_class_spec_inside_a_mapping_setting_is_never_built(where, tmp_path):
    marker = tmp_path / "PWNED"
    spec = f"{{class_path: subprocess.Popen, init_args: {{args: 'touch {marker}', shell: true}}}}"
    if where == "command line":
        extra = ["--model.model_kwargs", "{patch_size: 8, depth: 1, agent_num: 4, embed_dim: 32, num_heads: 2, evil: " + spec + "}"]
        expected = r"--model.model_kwargs.evil holds a class_path key naming 'subprocess.Popen'; this setting takes plain values"
    else:
        (tmp_path / "evil.yaml").write_text("model:\n  init_args:\n    compile:\n      options: " + spec + "\n")
        extra = ["--config", str(tmp_path / "evil.yaml")]
        expected = r"--model.compile.options holds a class_path key naming 'subprocess.Popen'"
    code, out, err = run_main("fit", "--config", QUICKSTART, *TINY, *extra, "--trainer.max_steps", "1",
                              "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert_one_line_error(code, err, expected)
    assert not marker.exists() and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------- the checks
def test_stored_checks_refuse_code_objects_and_weight_locations():
    hp = dict(_class_path="agentlit.tasks.ClassificationModule", model_name="agent_deit_tiny", num_classes=3)
    cls, clean = check_stored(hp, "x.ckpt", "agentlit.tasks.ClassificationModule")
    assert cls is ClassificationModule and clean == {"model_name": "agent_deit_tiny", "num_classes": 3}
    assert check_stored(hp, "x.ckpt", "agentlit.tasks.classification.ClassificationModule")[0] is ClassificationModule
    for bad, expected in [
        ({"_instantiator": "os.system"}, r"_instantiator='os.system', which names code"),
        ({"_class_path": "agentlit.tasks.optim.create_optimizer"}, r"names 'agentlit.tasks.optim.create_optimizer' as its task"),
        ({"_class_path": "agentlit.tasks.base.TaskModule"}, r"as its task"),
        ({"model_kwargs": {"a": [1, {"init_args": {}}]}}, r"setting model_kwargs.a\[1\] with an init_args key;"),
        ({"model_kwargs": {"w": torch.zeros(2)}}, r"model_kwargs.w with a torch.Tensor object"),
    ]:
        with pytest.raises(SettingsError, match=expected):
            check_stored({**hp, **bad}, "x.ckpt", None)
    with pytest.raises(SettingsError, match=r"was written by agentlit.tasks.ClassificationModule, but the config builds"):
        check_stored(hp, "x.ckpt", "agentlit.tasks.SegmentationModule")
    overlay = {"model_kwargs": {"pretrained_cfg_overlay": {"hf_hub_id": "someone/evil"}}}
    with pytest.raises(SettingsError, match=r"stores model_kwargs.pretrained_cfg_overlay=.*a place to fetch weights from"):
        merge_stored(overlay, ClassificationModule, {}, "x.ckpt")
    # initial weights never come from a checkpoint (its own weights replace them); the user's value is kept
    assert merge_stored({"pretrained": True, "checkpoint_path": "/elsewhere/w.pth", "num_classes": 3},
                        ClassificationModule, {}, "x.ckpt") == {"num_classes": 3}
    assert plain_data_problem({"a": (1, "x", None, 2.5, {"b": [True]})}, "k") is None
