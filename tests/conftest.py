"""Test-wide settings: never touch the network, keep runs deterministic and small."""
import os

# A hub miss otherwise retries for ~50 s; nothing in the suite may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``last.ckpt`` of a real 2-step ``agentlit fit`` of the tiny quickstart classifier, copied out of its
    run folder (read-only)."""
    from cli_helpers import QUICKSTART, TINY, run_main

    root = tmp_path_factory.mktemp("tiny_checkpoint")
    code, _, err = run_main("fit", "--config", QUICKSTART, *TINY, "--trainer.max_steps", "2", "--trainer.limit_val_batches",
                            "0", "--trainer.default_root_dir", str(root / "runs"))
    assert code == 0, err[-3000:]
    return _outside_the_run(root / "runs" / "version_0" / "checkpoints" / "last.ckpt", root / "shared")


def _outside_the_run(ckpt, folder):
    """A copy of ``ckpt`` (same file name) outside its run folder: evaluating a run's own checkpoint writes
    into that run (``version_0/test`` …), which a checkpoint shared by many tests must not collect."""
    import shutil

    folder.mkdir()
    shutil.copy(ckpt, folder / ckpt.name)
    return folder / ckpt.name


@pytest.fixture(scope="session")
def seg_checkpoint(tmp_path_factory):
    """``last.ckpt`` of a real 2-step ``agentlit fit`` of the segmentation quickstart, 4 images a batch, copied out
    of its run folder (read-only)."""
    from cli_helpers import SEG_CONFIG, SEG_TINY, run_main

    root = tmp_path_factory.mktemp("seg_checkpoint")
    code, _, err = run_main("fit", "--config", SEG_CONFIG, *SEG_TINY, "--trainer.max_steps", "2",
                            "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root / "runs"))
    assert code == 0, err[-3000:]
    return _outside_the_run(root / "runs" / "version_0" / "checkpoints" / "last.ckpt", root / "shared")
