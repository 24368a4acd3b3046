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
        '''SIGKILLs its own process when training reaches `step` (after that step's checkpoint).'''
        def __init__(self, step: int):
            self.step = step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)
    """
)


def overlay(path: Path, callbacks: str) -> str:
    path.write_text("trainer:\n  callbacks:\n" + textwrap.indent(textwrap.dedent(callbacks), "    "))
    return str(path)


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def assert_resume_is_exact(tmp_path: Path, common: list[str], kill_at: int, every: int, total: int) -> None:
    """Run ``common`` straight; run it again, SIGKILL it mid-epoch at step ``kill_at`` (a checkpoint
    exists), resume with ``--ckpt_path last``; the final checkpoints must be identical."""
    (tmp_path / "killer.py").write_text(KILLER)
    checkpoints = f"""
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {every}, save_last: true, save_top_k: -1}}
    """
    ckpt_cfg = overlay(tmp_path / "ckpt.yaml", checkpoints)
    kill_cfg = overlay(tmp_path / "kill.yaml", checkpoints + f"""
    - class_path: killer.KillAtStep
      init_args: {{step: {kill_at}}}
    """)
    run_agentlit(*common, "--config", ckpt_cfg, "--trainer.default_root_dir", "straight", cwd=tmp_path)

    killed = run_agentlit(*common, "--config", kill_cfg, "--trainer.default_root_dir", "resumed", cwd=tmp_path, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first = tmp_path / "resumed" / "version_0" / "checkpoints"
    assert weights(first / "last.ckpt")["global_step"] == kill_at
    resume = run_agentlit(*common, "--config", ckpt_cfg, "--trainer.default_root_dir", "resumed", "--ckpt_path", "last", cwd=tmp_path)
    # it really resumed (a fresh start with the same seed would end with the same weights too)
    assert f"Restoring states from the checkpoint path at {first / 'last.ckpt'}".replace(str(tmp_path) + "/", "") in resume.stderr + resume.stdout
    logged = [r for r in csv.DictReader(open(tmp_path / "resumed" / "version_1" / "metrics.csv")) if r.get("step")]
    assert logged and min(int(r["step"]) for r in logged) >= kill_at

    straight = weights(tmp_path / "straight" / "version_0" / "checkpoints" / "last.ckpt")
    resumed = weights(tmp_path / "resumed" / "version_1" / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == total
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), f"{k} differs after resume"
    for a, b in zip(straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[s], b[s]) for s in a)
    assert straight["lr_schedulers"] == resumed["lr_schedulers"]
    # the interrupted run's files are untouched; the resumed run wrote a new run folder
    assert weights(first / "last.ckpt")["global_step"] == kill_at


def test_resume_after_sigkill_is_exact(tmp_path):
    # Everything random that shapes training is on: augmentation, mixup/cutmix, drop path, EMA.
    common = ["fit", "--config", QUICKSTART, *TINY, "--data.batch_size", "32", "--trainer.limit_train_batches", "10",
              "--trainer.max_epochs", "3", "--model.mixup_alpha", "0.8", "--model.cutmix_alpha", "1.0",
              "--model.drop_path_rate", "0.1", "--model.ema_decay", "0.9", "--model.warmup_epochs", "1"]
    assert_resume_is_exact(tmp_path, common, kill_at=15, every=5, total=30)  # killed mid-epoch 1 of 10 batches
    straight = weights(tmp_path / "straight" / "version_0" / "checkpoints" / "last.ckpt")
    assert any(k.startswith("ema.") for k in straight["state_dict"])


def test_segmentation_resume_after_sigkill_is_exact(tmp_path):
    # joint image/mask augmentation (random resize-crop, flip, photometric) + drop path
    common = ["fit", "--config", str(ROOT / "configs" / "segmentation" / "quickstart.yaml"),
              "--data.num_train", "48", "--data.num_val", "8", "--data.batch_size", "8", "--data.val_batch_size", "8",
              "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
              "--model.backbone_kwargs", "{img_size: 64, embed_dims: [16, 32, 64, 128], num_heads: [1, 1, 2, 4], "
              "depths: [1, 1, 1, 1], mlp_ratios: [4, 4, 4, 4], agent_num: [9, 16, 16, 4], drop_path_rate: 0.1}"]
    assert_resume_is_exact(tmp_path, common, kill_at=9, every=3, total=12)  # 6 batches per epoch


def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    common = ["fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps", "4", "--trainer.accelerator", "cpu",
              "--model.drop_path_rate", "0.0", "--trainer.limit_val_batches", "0", "--model.warmup_epochs", "0"]
    run_agentlit(*common, "--data.batch_size", "16", "--trainer.devices", "1", "--trainer.default_root_dir", "one", cwd=tmp_path)
    run_agentlit(*common, "--data.batch_size", "8", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.default_root_dir", "two", cwd=tmp_path)
    one = weights(tmp_path / "one" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    two = weights(tmp_path / "two" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=k)
    init = weights(tmp_path / "one" / "version_0" / "checkpoints" / "last.ckpt")
    assert init["global_step"] == 4


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
    assert len(resumed) == 100  # the planned epoch length stays the full one
    assert [i for _, i in resumed] == order  # the skip applies to the interrupted epoch only once


def test_quickstart_trains_in_bf16_mixed_on_cpu(tmp_path):
    from agentlit.cli import cli

    c = cli(["--config", QUICKSTART, *TINY, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "4",
             "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(tmp_path)], run=False)
    c.trainer.fit(c.model, datamodule=c.datamodule)
    assert c.trainer.global_step == 4 and c.trainer.precision == "bf16-mixed"
    assert torch.isfinite(c.trainer.callback_metrics["val/loss"])
    assert all(torch.isfinite(p).all() for p in c.model.parameters())
