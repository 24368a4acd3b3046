"""The quickstart's speed on an idle and on a shared machine, for each CPU thread setting, in one run.

    python benchmarks/threads.py                      # 40 training steps per run, 2 rounds
    python benchmarks/threads.py --steps 20 --rounds 1

Runs ``agentlit fit --config configs/quickstart.yaml`` for ``--steps`` training steps (one short
validation, no checkpoint) as a user would, start-up included, under four thread settings:

- ``agentlit``: the ``agentlit`` command's default (torch's own on an idle machine, passive OpenMP
  waiting when other work keeps cores busy: :func:`agentlit.environment.thread_default`);
- ``torch``: PyTorch's own default (one spinning thread per core: the CLI entered without
  agentlit's default);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` with torch's thread count;
- ``one thread``: ``OMP_NUM_THREADS=1``;

each on an idle machine and beside one competing CPU-bound process (``python -c "while True:
pass"``). Settings take turns within a round and conditions alternate round by round, so a drift
in the machine's load hits all alike. Prints seconds per run (median over rounds) and each
setting's ratio to one thread in the same condition; writes ``results/threads.json``.
Meaningful only when nothing else runs: the load average before the run is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentlit.environment import THREAD_VARIABLES  # the variables that mean the user chose

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
# the CLI without agentlit's thread default: what the quickstart ran with before it existed
_TORCH_DEFAULT = "import sys; from agentlit.cli import cli; cli(sys.argv[1:])"
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "agentlit": (["agentlit"], {}),
    "torch": ([sys.executable, "-c", _TORCH_DEFAULT], {}),
    "passive": (["agentlit"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "one thread": (["agentlit"], {"OMP_NUM_THREADS": "1"}),
}


def _run(setting: str, steps: int, root: str) -> float:
    """Seconds for one quickstart run of ``steps`` training steps under ``setting``."""
    command, extra = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES} | extra
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", str(steps), "--trainer.limit_val_batches", "1",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", root]
    start = time.perf_counter()
    subprocess.run(command + args, env=env, cwd=root, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every setting in every condition")
    parser.add_argument("--output", type=Path, default=RESULTS / "threads.json", help="JSON to write")
    args = parser.parse_args()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    times: dict[str, dict[str, list[float]]] = {c: {s: [] for s in SETTINGS} for c in ("idle", "busy")}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            for condition in (("idle", "busy") if r % 2 == 0 else ("busy", "idle")):
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
                try:
                    time.sleep(0.5 if spinner else 0)  # the competitor is running before the run looks
                    for setting in SETTINGS:
                        t = _run(setting, args.steps, root)
                        times[condition][setting].append(t)
                        print(f"round {r} {condition:>4} {setting:>10}: {t:6.1f} s", flush=True)
                finally:
                    if spinner:
                        spinner.kill()
                        spinner.wait()

    median = {c: {s: statistics.median(v) for s, v in per.items()} for c, per in times.items()}
    ratios = {c: {s: m / median[c]["one thread"] for s, m in per.items()} for c, per in median.items()}
    print(f"\nquickstart, {args.steps} training steps per run (start-up included), median of {args.rounds}; "
          f"load average before: {load}")
    print(f"{'setting':>10} | {'idle s':>7} | {'busy s':>7} | idle / 1 thread | busy / 1 thread")
    for s in SETTINGS:
        print(f"{s:>10} | {median['idle'][s]:7.1f} | {median['busy'][s]:7.1f} | "
              f"{ratios['idle'][s]:15.2f} | {ratios['busy'][s]:15.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "load_average_before": load},
        "steps": args.steps, "rounds": args.rounds, "seconds": times, "median_seconds": median,
        "ratio_to_one_thread": ratios}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
