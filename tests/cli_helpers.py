"""Shared by the tests that drive the ``agentlit`` command in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# A much smaller network than the quickstart's so the suite stays fast; same code path.
TINY = [
    "--model.model_kwargs", "{patch_size: 8, depth: 1, agent_num: 4, embed_dim: 32, num_heads: 2}",
    "--model.img_size", "16", "--data.img_size", "16", "--trainer.enable_progress_bar", "false",
]


def run_agentlit(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m agentlit ARGS`` in ``cwd`` (importable there, e.g. for test-only callbacks), offline,
    with a fresh run-folder version; raises with the output tail when ``check`` and it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(cwd)}
    env.pop("AGENTLIT_RUN_VERSION", None)
    proc = subprocess.run([sys.executable, "-m", "agentlit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"agentlit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
