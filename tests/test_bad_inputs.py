"""Every bad input a user is likely to hit gets one clear message naming the file/key/value.

The README's "Bad input" table lists these cases with their messages; the ones exercised in other
files are named there (unknown YAML key, model name, empty/mismatched class folders, bad sizes).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from agentlit.data import ImageFolderDataModule, PromptDataModule
from agentlit.data.io import BadImageError, load_rgb
from agentlit.tasks import ClassificationModule
from agentlit.utils.paths import ensure_writable_dir, fresh_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_name="agent_deit_tiny", num_classes=2, img_size=16,
            model_kwargs=dict(patch_size=8, depth=1, agent_num=4, embed_dim=32, num_heads=2))


def _folder(root: Path, n: int = 2) -> None:
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (i * 50, 90, 10)).save(root / split / c / f"{i}.png")


def _all_batches(loader) -> int:
    return sum(len(y) for _, y in loader)


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_unreadable_image_names_the_file(tmp_path, damage):
    _folder(tmp_path)
    bad = tmp_path / "val" / "dog" / "1.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_text("this is not a png")
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=2, num_workers=0, pin_memory=False)
    with pytest.raises(BadImageError, match=rf"cannot read image .*{bad.name}.*skip_bad_images"):
        _all_batches(dm.val_dataloader())


def test_unreadable_image_skipped_when_opted_in(tmp_path):
    _folder(tmp_path)
    (tmp_path / "val" / "dog" / "1.png").write_text("broken")
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=2, num_workers=0, pin_memory=False,
                               skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert _all_batches(dm.val_dataloader()) == 4  # the bad file is replaced by a readable one


@pytest.mark.parametrize(
    "mode,value,expected",
    [("L", 128, (128, 128, 128)), ("RGBA", (200, 100, 50, 255), (200, 100, 50)), ("RGBA", (200, 100, 50, 0), (0, 0, 0)),
     ("I;16", 65535, (255, 255, 255)), ("I;16", 32896, (128, 128, 128)), ("P", 3, None), ("CMYK", (0, 0, 0, 0), (255, 255, 255))],
)
def test_any_image_mode_becomes_8bit_rgb(tmp_path, mode, value, expected):
    path = tmp_path / ("x.tiff" if mode in ("CMYK",) else "x.png")
    img = Image.new(mode, (4, 3), value)
    img.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (4, 3)
    if expected is not None:
        assert rgb.getpixel((0, 0)) == expected


def test_wide_and_odd_images_train_through_the_folder_module(tmp_path):
    _folder(tmp_path)
    Image.new("I;16", (30, 20), 40000).save(tmp_path / "train" / "cat" / "wide.png")
    Image.new("LA", (12, 40), (90, 128)).save(tmp_path / "train" / "dog" / "gray_alpha.png")
    dm = ImageFolderDataModule(str(tmp_path), img_size=16, batch_size=2, num_workers=0, pin_memory=False)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    import timm

    other = tmp_path / "resnet.pth"
    torch.save({"model": timm.create_model("resnet18", num_classes=2).state_dict()}, other)
    with pytest.raises(ValueError, match=r"does not fit .*missing from the checkpoint \(\d+\): cls_token.*not in the model \(\d+\): conv1.weight"):
        ClassificationModule(**TINY, checkpoint_path=str(other))
    wider = tmp_path / "wider.ckpt"
    torch.save({"state_dict": ClassificationModule(**{**TINY, "model_kwargs": {**TINY["model_kwargs"], "embed_dim": 64}}).state_dict()}, wider)
    with pytest.raises(ValueError, match=r"shape mismatches \(\d+\): cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 32\)"):
        ClassificationModule(**TINY, checkpoint_path=str(wider))


def test_export_of_a_mismatched_checkpoint_is_refused(tmp_path):
    from agentlit.export import export_weights

    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": ClassificationModule(**{**TINY, "num_classes": 3}).state_dict()}, ckpt)
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(3, 32\) vs model \(2, 32\)"):
        export_weights(ClassificationModule(**TINY), str(ckpt), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_empty_prompt_file(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=rf"{empty}: no prompts found"):
        PromptDataModule(prompt_file=str(empty)).prompts


def test_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=r"--trainer.default_root_dir=.*a_file/runs is not a writable folder"):
        ensure_writable_dir(blocker / "runs", "--trainer.default_root_dir")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "agentlit", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
         "--trainer.default_root_dir", str(blocker / "runs")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "is not a writable folder" in proc.stderr and "Traceback" not in proc.stderr


def test_earlier_outputs_are_never_overwritten(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "00000.png").write_bytes(b"earlier image")
    assert fresh_dir(out) == tmp_path / "gen-1"  # claimed: created, and taken for this run
    assert fresh_dir(out) == tmp_path / "gen-2"  # another run a moment later gets its own
    assert fresh_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert fresh_dir(tmp_path / "empty") == tmp_path / "empty"  # an empty folder the user made is used
    assert (out / "00000.png").read_bytes() == b"earlier image"


class _NaNData(L.LightningDataModule):
    def train_dataloader(self):
        x = torch.full((4, 3, 16, 16), float("nan"))
        return DataLoader(TensorDataset(x, torch.tensor([0, 1, 0, 1])), batch_size=2)


def test_non_finite_loss_stops_with_step_and_last_checkpoint(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at global step 0, epoch 0; "
                                                 r"the last good checkpoint is none written yet"):
        trainer.fit(ClassificationModule(**TINY), datamodule=_NaNData())


# ------------------------------------------------------------------------------------------------
# The command line: each case exits with status 2 and at most three lines on stderr, no traceback.
# They fail before any training, so they run in this process (agentlit.cli.main) to stay fast.
# ------------------------------------------------------------------------------------------------
from cli_helpers import QUICKSTART, assert_one_line_error, run_main  # noqa: E402
from cli_helpers import TINY as TINY_ARGS  # noqa: E402


def _fit(*extra: str) -> list[str]:
    return ["fit", "--config", QUICKSTART, *TINY_ARGS, "--trainer.default_root_dir", "runs", "--trainer.max_steps", "1", *extra]


def _test(*extra: str) -> list[str]:
    return ["test", "--config", QUICKSTART, *TINY_ARGS, "--trainer.default_root_dir", "runs", *extra]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A real checkpoint of the TINY quickstart model, and broken/foreign variants of it."""
    import fractions

    root = tmp_path_factory.mktemp("ckpts")
    code, out, err = run_main(*_fit("--trainer.limit_val_batches", "0"), cwd=root)
    assert code == 0, err[-3000:]
    good = root / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    torch.save({**ckpt, "hyper_parameters": {"_class_path": "agentlit.tasks.SegmentationModule", "num_classes": 6}},
               root / "other_task.ckpt")
    wider = ClassificationModule(**{**TINY, "num_classes": 10, "model_kwargs": {**TINY["model_kwargs"], "embed_dim": 64}})
    torch.save({k: v for k, v in ckpt.items() if k != "hyper_parameters"} | {"state_dict": wider.state_dict()},
               root / "other_arch.ckpt")
    torch.save(wider.state_dict(), root / "plain.pth")
    torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "bogus_arg": 1}}, root / "settings.ckpt")
    torch.save({"state_dict": {}, "config": fractions.Fraction(1, 3)}, root / "object.ckpt")
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "notes.ckpt").write_text("not a checkpoint")
    (root / "badkey.yaml").write_text("trainer:\n  max_epoch: 3\n")
    (root / "broken.yaml").write_text("trainer: [unclosed\n")
    return root


CLI_CASES = {
    "unknown model name": (_fit("--model.model_name", "agent_deit_tiyn"),
                           r"unknown model name 'agent_deit_tiyn'; closest registered names: \['agent_deit_tiny'"),
    "unknown model argument": (_fit("--model.learning_rate", "1"),
                               r"--model.learning_rate: agentlit.tasks.ClassificationModule has no argument 'learning_rate'; valid: .*\blr\b"),
    "misspelt model argument": (_fit("--model.drop_path", "0.1"), r"did you mean --model.drop_path_rate\?"),
    "misspelt data argument": (_fit("--data.batchsize", "8"), r"did you mean --data.batch_size\?"),
    "misspelt trainer option": (_fit("--trainer.max_epocs", "1"), r"unknown option --trainer.max_epocs; did you mean --trainer.max_epochs\?"),
    "unknown key in a YAML file": (_fit("--config", "{files}/badkey.yaml"),
                                   r"unknown key 'trainer.max_epoch' in the config; did you mean 'trainer.max_epochs'\?"),
    "YAML syntax error": (_fit("--config", "{files}/broken.yaml"), r"--config .*broken.yaml is not valid YAML: .*line 1"),
    "missing config file": (["fit", "--config", "{files}/nope.yaml"], r"--config .*nope.yaml does not exist"),
    "value of the wrong type": (_fit("--trainer.max_epochs", "many"), r"trainer.max_epochs.*expected int \(got many\)"),
    "unknown class path": (_fit("--data", "agentlit.data.DigitModule"),
                           r"agentlit.data has no class 'DigitModule'; did you mean agentlit.data.DigitsDataModule\?"),
    "unknown sub-command": (["fitt", "--config", QUICKSTART], r"unknown sub-command 'fitt'; did you mean `agentlit fit`\?"),
    "no sub-command": ([], r"choose a sub-command: fit, validate, test, predict"),
    "zero batch size": (_fit("--data.batch_size", "0"), r"batch_size should be a positive integer"),
    "test without trained weights": (_test(), r"`agentlit test` needs trained weights: pass --ckpt_path .*--ckpt_path none"),
    "predict without trained weights": (["predict", *_test()[1:]], r"`agentlit predict` needs trained weights"),
    "checkpoint file missing": (_test("--ckpt_path", "{files}/nope.ckpt"), r"--ckpt_path .*nope.ckpt does not exist"),
    "checkpoint path is a folder": (_test("--ckpt_path", "{files}/runs"), r"is a folder; pass a checkpoint file such as .*last.ckpt"),
    "checkpoint is not a checkpoint": (_test("--ckpt_path", "{files}/notes.ckpt"), r"notes.ckpt is not a readable PyTorch checkpoint"),
    "truncated checkpoint": (_test("--ckpt_path", "{files}/truncated.ckpt"), r"truncated.ckpt is not a readable PyTorch checkpoint \(truncated"),
    "checkpoint holding code objects": (_test("--ckpt_path", "{files}/object.ckpt"), r"object.ckpt needs Python objects .*fractions.Fraction"),
    "checkpoint of another task": (_test("--ckpt_path", "{files}/other_task.ckpt"),
                                   r"was written by agentlit.tasks.SegmentationModule, but the config builds agentlit.tasks.ClassificationModule"),
    "checkpoint of another architecture": (_test("--ckpt_path", "{files}/other_arch.ckpt"),
                                           r"other_arch.ckpt does not fit the configured ClassificationModule: shape mismatches \(\d+\): model.cls_token"),
    "checkpoint with a setting the model does not take": (_test("--ckpt_path", "{files}/settings.ckpt"),
                                                          r"settings.ckpt stores the setting 'bogus_arg', which ClassificationModule does not take"),
    "plain state dict as --ckpt_path": (_test("--ckpt_path", "{files}/plain.pth"), r"plain.pth is a plain state dict; .*--model.checkpoint_path"),
    "--ckpt_path last without a run": (_test("--ckpt_path", "last"), r"--ckpt_path last: no run under runs has a checkpoint \(runs/version_N/checkpoints/\*.ckpt\)"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_mistake_is_one_line(case, files, tmp_path):
    args, expected = CLI_CASES[case]
    code, out, err = run_main(*[a.replace("{files}", str(files)) for a in args], cwd=tmp_path)
    assert_one_line_error(code, err, expected)
    assert not list(tmp_path.glob("runs/version_*")), "a failed command left a run folder behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the recipe runs on a machine with a GPU")
def test_gpu_recipe_without_gpu_names_the_cpu_overrides(tmp_path):
    code, out, err = run_main("fit", "--config", str(ROOT / "configs" / "classification" / "agent_deit_tiny_imagenet.yaml"),
                              "--data.root", str(tmp_path), "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert_one_line_error(code, err, r"asks for a GPU but none is available; to run it on the CPU add --trainer.accelerator cpu "
                                     r"--trainer.devices 1 --trainer.strategy auto --trainer.precision 32-true")


def test_missing_package_is_named(tmp_path):
    pytest.importorskip("lightning")
    if __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    code, out, err = run_main(*_fit("--trainer.strategy", "deepspeed"), cwd=tmp_path)
    assert_one_line_error(code, err, r"DeepSpeed installed.*pip install")


def test_failed_run_leaves_no_empty_run_folder(tmp_path):
    _folder(tmp_path / "data", n=4)
    (tmp_path / "data" / "train" / "cat" / "0.png").write_text("broken")
    code, out, err = run_main("fit", "--config", QUICKSTART, *TINY_ARGS, "--data", "agentlit.data.ImageFolderDataModule",
                              "--data.root", str(tmp_path / "data"), "--data.img_size", "16", "--data.batch_size", "8",
                              "--data.num_workers", "0", "--model.num_classes", "2", "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert_one_line_error(code, err, r"cannot read image .*0.png")
    assert (tmp_path / "runs").is_dir() and not list((tmp_path / "runs").glob("version_*"))


def test_untrained_evaluation_is_an_explicit_choice(tmp_path):
    code, out, err = run_main(*_test("--ckpt_path", "none", "--trainer.limit_test_batches", "1"), cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "test/acc1" in out
