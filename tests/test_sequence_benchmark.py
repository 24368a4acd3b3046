"""benchmarks/attention.py --sequence runs end to end at a tiny size (timings are never asserted;
agent-attention-pytorch is optional: its rows appear only where the ``bench`` extra is installed)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sequence_benchmark_tiny(tmp_path):
    out = tmp_path / "seq.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/attention.py", "--sequence", "--lengths", "64", "128",
                           "--seq-heads", "2", "--seq-head-dim", "8", "--seq-agents", "4", "--sdpa-max-length", "64",
                           "--repeats", "1", "--warmup", "0", "--device", "cpu", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    impls = {"agent", "agent-lean", "sdpa"} | ({"package"} if importlib.util.find_spec("agent_attention_pytorch") else set())
    for length in (64, 128):
        for masked in (False, True):
            got = {r["impl"] for r in report["rows"] if r["length"] == length and r["masked"] == masked}
            # above --sdpa-max-length softmax attention runs unmasked and forward only
            assert got == (impls - {"sdpa"} if (length, masked) == (128, True) else impls), (length, masked, got)
    sdpa_big = [r for r in report["rows"] if r["impl"] == "sdpa" and r["length"] == 128]
    assert "fwd_bwd_ms" not in sdpa_big[0] and all(r["fwd_ms"] > 0 for r in report["rows"])
