"""Reliability: exact resume after SIGKILL, DDP ≡ one process, each sample evaluated once."""
from __future__ import annotations

import csv
import signal
import textwrap
from pathlib import Path

import pytest
import torch

from agentlit.data.sampling import EvalDistributedSampler, ResumableDistributedSampler

from cli_helpers import QUICKSTART, ROOT, TINY, run_agentlit

KILLER = textwrap.dedent(
    """
    import os, signal
    from lightning.pytorch.callbacks import Callback

    class KillAtStep(Callback):
        '''Sends `signame` to its own process when training reaches `step` (SIGKILL: after that
        step's checkpoint; SIGINT/SIGTERM: agentlit finishes the step and saves last.ckpt).'''
        def __init__(self, step: int, signame: str = "SIGKILL"):
            self.step, self.signame, self.sent = step, signame, False
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step and not self.sent:
                self.sent = True
                os.kill(os.getpid(), getattr(signal, self.signame))
    """
)


def overlay(path: Path, callbacks: str) -> str:
    path.write_text("trainer:\n  callbacks:\n" + textwrap.indent(textwrap.dedent(callbacks), "    "))
    return str(path)


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def _configs(tmp_path: Path, every: int, kill_at: int, signame: str) -> tuple[str, str]:
    (tmp_path / "killer.py").write_text(KILLER)
    checkpoints = f"""
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {every}, save_last: true, save_top_k: -1}}
    """
    ckpt_cfg = overlay(tmp_path / "ckpt.yaml", checkpoints)
    kill_cfg = overlay(tmp_path / f"kill_{signame}.yaml", checkpoints + f"""
    - class_path: killer.KillAtStep
      init_args: {{step: {kill_at}, signame: {signame}}}
    """)
    return ckpt_cfg, kill_cfg


def assert_same_state(straight: dict, resumed: dict, total: int) -> None:
    assert straight["global_step"] == resumed["global_step"] == total
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), f"{k} differs after resume"
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[s], b[s]) for s in a)
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]


def interrupt_and_resume(tmp_path: Path, common: list[str], root: str, kill_at: int, every: int,
                         signame: str = "SIGKILL") -> dict:
    """Run ``common`` under ``root``, interrupt it with ``signame`` at step ``kill_at``, resume with
    ``--ckpt_path last``; checks the run continued in the same folder; returns the final checkpoint."""
    ckpt_cfg, kill_cfg = _configs(tmp_path, every, kill_at, signame)
    killed = run_agentlit(*common, "--config", kill_cfg, "--trainer.default_root_dir", root, cwd=tmp_path, check=False)
    run = tmp_path / root / "version_0"
    first = run / "checkpoints"
    if signame == "SIGKILL":
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        saved_at = kill_at  # the last periodic checkpoint
    else:
        # the step under way finishes, last.ckpt is written at the signal, its path and the resume command are printed
        assert killed.returncode == 128 + getattr(signal, signame), killed.stderr[-3000:]
        saved_at = kill_at + 1
        assert saved_at % every, "choose kill_at so that no periodic checkpoint falls on the interrupted step"
        assert f"checkpoint: {Path(root) / 'version_0' / 'checkpoints' / 'last.ckpt'}" in killed.stderr, killed.stderr
        assert "resume with: agentlit fit" in killed.stderr and "--ckpt_path last" in killed.stderr
        assert "Traceback" not in killed.stderr
        # the curves so far, as at the end of fit: a picture once some metric has been logged twice
        from agentlit.utils.plots import metric_panels, read_metrics

        assert (run / "metrics.csv").is_file()
        assert (run / "metrics.png").is_file() == bool(metric_panels(read_metrics(run / "metrics.csv"))) == (kill_at >= 4)
    assert weights(first / "last.ckpt")["global_step"] == saved_at
    resume = run_agentlit(*common, "--config", ckpt_cfg, "--trainer.default_root_dir", root, "--ckpt_path", "last", cwd=tmp_path)
    out = resume.stderr + resume.stdout
    # it really resumed (a fresh start with the same seed would end with the same weights too) ...
    assert f"Restoring states from the checkpoint path at {first / 'last.ckpt'}".replace(str(tmp_path) + "/", "") in out
    # ... in the same run folder: same logs, same checkpoint folder, no warning about it
    assert sorted(p.name for p in (tmp_path / root).iterdir()) == ["version_0"]
    assert "dirpath has changed" not in out and "exists and is not empty" not in out
    # one metrics.csv, the rows logged after the checkpoint by the interrupted run not repeated
    assert logged_steps(run) == logged_steps(tmp_path / "straight" / "version_0")
    return weights(first / "last.ckpt")


def logged_steps(run: Path) -> list[tuple[int, str]]:
    """(step, metric) of every value in ``run``'s metrics.csv, in file order."""
    return [(int(r["step"]), k) for r in csv.DictReader(open(run / "metrics.csv")) for k, v in r.items()
            if v and k not in ("step", "epoch")]


def assert_resume_is_exact(tmp_path: Path, common: list[str], kill_at: int, every: int, total: int) -> None:
    """Run ``common`` straight; run it again, SIGKILL it mid-epoch at step ``kill_at`` (a checkpoint
    exists), resume with ``--ckpt_path last``; the final checkpoints must be identical."""
    ckpt_cfg, _ = _configs(tmp_path, every, kill_at, "SIGKILL")
    run_agentlit(*common, "--config", ckpt_cfg, "--trainer.default_root_dir", "straight", cwd=tmp_path)
    resumed = interrupt_and_resume(tmp_path, common, "resumed", kill_at, every)
    assert_same_state(weights(tmp_path / "straight" / "version_0" / "checkpoints" / "last.ckpt"), resumed, total)


# Everything random that shapes training is on: augmentation, mixup/cutmix, drop path, EMA.
CLASSIFICATION = ["fit", "--config", QUICKSTART, *TINY, "--data.batch_size", "32", "--trainer.limit_train_batches", "10",
                  "--trainer.max_epochs", "3", "--model.mixup_alpha", "0.8", "--model.cutmix_alpha", "1.0",
                  "--model.drop_path_rate", "0.1", "--model.ema_decay", "0.9", "--model.warmup_epochs", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "diffusion"])
def test_resume_after_sigkill_is_exact(tmp_path, task):
    # killed mid-epoch 1: of 10 batches (classification), of 8 (diffusion)
    common, kill_at, every, total = {"classification": (CLASSIFICATION, 15, 5, 30), "diffusion": (DIFFUSION, 12, 4, 24)}[task]
    assert_resume_is_exact(tmp_path, common, kill_at=kill_at, every=every, total=total)
    straight = weights(tmp_path / "straight" / "version_0" / "checkpoints" / "last.ckpt")
    assert any(k.startswith("ema.") for k in straight["state_dict"])


@pytest.mark.slow
def test_ctrl_c_and_sigterm_save_a_checkpoint_and_resume_exactly(tmp_path):
    # 2 epochs of 10 steps; the loss logged every 2 steps, so an interrupted run has curves to draw
    common = [a if a != "3" else "2" for a in CLASSIFICATION] + ["--trainer.log_every_n_steps", "2"]
    ckpt_cfg, _ = _configs(tmp_path, 5, 0, "SIGKILL")
    run_agentlit(*common, "--config", ckpt_cfg, "--trainer.default_root_dir", "straight", cwd=tmp_path)
    straight = weights(tmp_path / "straight" / "version_0" / "checkpoints" / "last.ckpt")
    for signame, at in (("SIGINT", 6), ("SIGTERM", 12)):  # mid-epoch 0 and mid-epoch 1
        assert_same_state(straight, interrupt_and_resume(tmp_path, common, signame.lower(), at, 5, signame), 20)


@pytest.mark.slow
def test_segmentation_resume_after_sigkill_is_exact(tmp_path):
    # joint image/mask augmentation (random resize-crop, flip, photometric) + drop path
    common = ["fit", "--config", str(ROOT / "configs" / "segmentation" / "quickstart.yaml"),
              "--data.num_train", "48", "--data.num_val", "8", "--data.batch_size", "8", "--data.val_batch_size", "8",
              "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
              "--model.backbone_kwargs", "{img_size: 64, embed_dims: [16, 32, 64, 128], num_heads: [1, 1, 2, 4], "
              "depths: [1, 1, 1, 1], mlp_ratios: [4, 4, 4, 4], agent_num: [9, 16, 16, 4], drop_path_rate: 0.1}"]
    assert_resume_is_exact(tmp_path, common, kill_at=9, every=3, total=12)  # 6 batches per epoch


def assert_ddp_equals_one_process(tmp_path: Path, common: list[str], steps: int = 4) -> dict:
    """Run ``common`` for ``steps`` steps as one process with batch 16 and as 2-process DDP with batch
    8 each; every tensor of the final state must agree. Returns the one-process checkpoint."""
    common = [*common, "--trainer.max_steps", str(steps)]
    run_agentlit(*common, "--data.batch_size", "16", "--trainer.devices", "1", "--trainer.default_root_dir", "one", cwd=tmp_path)
    run_agentlit(*common, "--data.batch_size", "8", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                 "--trainer.default_root_dir", "two", cwd=tmp_path)
    one = weights(tmp_path / "one" / "version_0" / "checkpoints" / "last.ckpt")
    assert_same_weights(one, weights(tmp_path / "two" / "version_0" / "checkpoints" / "last.ckpt"), steps)
    return one


def assert_same_weights(one: dict, other: dict, steps: int) -> None:
    """Both checkpoints are at ``steps`` and every tensor of ``other``'s state is ``one``'s within the
    float tolerance of DDP (its all-reduce sums the ranks' gradients in another order)."""
    assert one["global_step"] == other["global_step"] == steps
    assert one["state_dict"].keys() == other["state_dict"].keys()
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(other["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    assert_ddp_equals_one_process(tmp_path, [
        "fit", "--config", QUICKSTART, *TINY, "--trainer.accelerator", "cpu", "--model.drop_path_rate", "0.0",
        "--trainer.limit_val_batches", "0", "--model.warmup_epochs", "0"])


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (360, 2), (5, 8)])
def test_eval_sampler_visits_every_sample_once(n, world):
    seen = [i for r in range(world) for i in EvalDistributedSampler(range(n), world, r)]
    assert sorted(seen) == list(range(n))


def test_train_sampler_split_matches_single_process_and_resumes():
    data = range(100)
    single = ResumableDistributedSampler(data, batch_size=8, num_replicas=1, rank=0, seed=3)
    single.set_epoch(2)
    order = [i for _, i in single]
    ranks = []
    for r in range(2):
        s = ResumableDistributedSampler(data, batch_size=4, num_replicas=2, rank=r, seed=3)
        s.set_epoch(2)
        ranks.append([i for _, i in s])
    # step t of one process (batch 8) = union of step t of both ranks (batch 4 each)
    for t in range(len(order) // 8):
        assert sorted(order[8 * t: 8 * t + 8]) == sorted(ranks[0][4 * t: 4 * t + 4] + ranks[1][4 * t: 4 * t + 4])
    resumed = ResumableDistributedSampler(data, batch_size=8, seed=3)
    resumed.set_epoch(2)
    resumed.resume_from(2, 5)
    assert [i for _, i in resumed] == order[40:]
    assert len(resumed) == 96  # the planned epoch length stays the full one (12 whole steps of 8)
    assert [i for _, i in resumed] == order  # the skip applies to the interrupted epoch only once


@pytest.mark.slow
def test_quickstart_trains_in_bf16_mixed_on_cpu(tmp_path):
    from agentlit.cli import cli

    c = cli(["--config", QUICKSTART, *TINY, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "4",
             "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(tmp_path)], run=False)
    c.trainer.fit(c.model, datamodule=c.datamodule)
    assert c.trainer.global_step == 4 and c.trainer.precision == "bf16-mixed"
    assert torch.isfinite(c.trainer.callback_metrics["val/loss"])
    assert all(torch.isfinite(p).all() for p in c.model.parameters())


# Class-conditional digits diffusion with everything random that shapes it on: noise, timesteps,
# classifier-free-guidance dropout, EMA, a validation pass (its sampling draws from fixed generators).
DIFFUSION = ["fit", "--config", str(ROOT / "configs" / "generation" / "digits.yaml"), "--data.batch_size", "32",
             "--trainer.limit_train_batches", "8", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "3",
             "--trainer.check_val_every_n_epoch", "1", "--model.eval_samples_per_class", "1",
             "--model.num_inference_steps", "2", "--model.warmup_steps", "4", "--model.ema_decay", "0.9",
             "--trainer.enable_progress_bar", "false"]


@pytest.mark.slow
def test_diffusion_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    # noise, timesteps and guidance dropout are drawn per sample of the global batch: the two ranks
    # together draw what one process draws, so the weights (and their EMA) agree
    common = [a for a in DIFFUSION if a not in ("--data.batch_size", "32")]
    one = assert_ddp_equals_one_process(tmp_path, [*common, "--trainer.limit_val_batches", "0", "--model.cfg_dropout", "0.5"])
    assert any(k.startswith("ema.") for k in one["state_dict"])
