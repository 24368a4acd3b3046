"""Shared by the tests that drive the ``agentlit`` command in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
#: what a run hands the processes it starts (its run folder, its evaluation folder): never inherited by the next one
RUN_STATE = ("AGENTLIT_RUN_VERSION", "AGENTLIT_EVAL_FOLDER")
SEG_CONFIG = str(ROOT / "configs" / "segmentation" / "quickstart.yaml")
# The segmentation quickstart on 8 training and 4 validation images, 4 a batch.
SEG_TINY = ["--data.num_train", "8", "--data.num_val", "4", "--data.batch_size", "4", "--data.val_batch_size", "4",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# A much smaller network than the quickstart's so the suite stays fast; same code path.
TINY = [
    "--model.model_kwargs", "{patch_size: 8, depth: 1, agent_num: 4, embed_dim: 32, num_heads: 2}",
    "--model.img_size", "16", "--data.img_size", "16", "--trainer.enable_progress_bar", "false",
]


def pythonpath(cwd: Path) -> str:
    """``cwd`` (test-only modules written there), then this checkout (not whichever agentlit is installed)."""
    return os.pathsep.join([str(cwd), str(ROOT)])


def agentlit_env(cwd: Path) -> dict[str, str]:
    """The environment of an ``agentlit`` subprocess of this checkout: offline, no inherited run version."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath(cwd)}
    for name in RUN_STATE:
        env.pop(name, None)
    return env


def run_agentlit(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m agentlit ARGS`` of this checkout in ``cwd`` (importable there, e.g. for test-only
    callbacks), offline, with a fresh run-folder version; raises with the output tail when ``check`` and it fails."""
    env = agentlit_env(cwd)
    proc = subprocess.run([sys.executable, "-m", "agentlit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"agentlit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_main(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """``agentlit.cli.main(ARGS)`` in this process (no interpreter start-up: for the many error
    cases): (exit status, stdout, stderr), with the warnings a user would see appended to stderr."""
    import contextlib
    import io
    import warnings

    from agentlit import _lightning_cli
    from agentlit.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd = Path.cwd()
    for name in RUN_STATE:
        os.environ.pop(name, None)
    _lightning_cli.CREATED_RUN_DIRS.clear()
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")  # what a user's interpreter shows
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # shown only for __main__ outside tests
            try:
                main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(old_cwd)
        for name in RUN_STATE:
            os.environ.pop(name, None)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, "") for w in seen)
    return code, out.getvalue(), err.getvalue() + shown


def assert_one_line_error(code: int, stderr: str, expected: str) -> None:
    """The CLI's promise for a mistake: exit status 2, at most three lines on stderr, no traceback, the
    expected message, and never the advice to load untrusted pickles."""
    import re

    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(stderr.strip().splitlines()) <= 3, stderr[-3000:]
    assert re.search(expected, stderr), stderr[-3000:]
    assert "weights_only" not in stderr  # never advice to load untrusted pickles
