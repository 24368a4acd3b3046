"""Agent models vs their softmax baselines as the resolution grows: speed, MACs and training memory.

    python benchmarks/scaling.py --threads 1                     # the full table (about 25 minutes on 2 cores)
    python benchmarks/scaling.py --threads 1 --quick             # 224² and 448² only, fewer repeats
    python benchmarks/scaling.py --pairs deit --sizes 896:1      # one pair at one size
    python benchmarks/scaling.py --threads 1 --processes 3 --sizes 224:8 448:2 896:1   # each cell in 3 processes, rounds pooled
    python benchmarks/scaling.py --device cuda --bf16 --repeats 10 --warmup 3   # the GPU table (gpu_check.sh)

Pairs: Agent-DeiT-T / DeiT-T, Agent-Swin-T / Swin-T and Agent-PVT-S / PVT-S, classification models
at 224² (batch 8), 448² (batch 2) and 896² (batch 1), and the detection backbones (backbone + FPN, as
``benchmarks/detection.py`` builds them with the dense agent grids) at 800×1344, batch 1.

For every pair and size, in one spawned process:
- **MAC ratio** = baseline MACs / agent MACs of one forward (:func:`agentlit.utils.flops.count_macs`):
  the speed ratio a perfectly efficient implementation of both would reach (the "limit");
- **inference** (eval, no grad) and **training step** (forward, backward, SGD step) times, the two
  models taking turns round by round so that a change in the machine's load hits both alike; the
  speed ratio is baseline time / agent time (medians), and **efficiency** = speed ratio / MAC ratio;
- **training peak memory**: the peak of live tensor bytes during one training step
  (:func:`agentlit.utils.memory.peak_memory`), agent vs baseline.

``--ceiling`` also times the agent model twice more, with its agent core replaced (agent pooling, bias
build, the local term and the projection still run):
- **flash**: the two agent steps as PyTorch's own fused attention kernel runs them, without position
  biases (``scaled_dot_product_attention`` of A over K, V, then of Q over A, V_A: the CPU flash kernel,
  forward and backward). Baseline time / that time is what the agent model would reach if its core ran
  at the rate of the best fused kernel PyTorch ships, its biases free;
- **free**: O = Q, no attention products at all. Baseline time / that time, the **ceiling**, is the most
  any agent core could reach with the rest of the model as it is; where the ceiling's efficiency is
  below a target, no attention kernel reaches it.

**Targets** (:func:`targets`): after the table, each cell is checked against the project's targets
(docs/performance.md): training ≥ 90% of the limit and inference ≥ 95% at the classification sizes,
training memory ≤ the baseline's (≤ 1.1× at 224²), and the detection backbones at least as fast as their
baselines (speed ratio ≥ 1.0). A missed speed cell whose flash or free column is below the same target
is marked out of reach of that stand-in. Every round also gives a paired ratio (the baseline's time over
the agent's in the same round); the JSON keeps each round's times and the quartiles of these ratios, and
a cell whose quartiles hold its target is listed as not settled by the run, met or missed. On a shared
machine a process can lean one way for its whole life: ``--processes K`` measures each cell in K fresh
processes and pools their rounds (each process's own efficiency is kept in the JSON).

Each speed ratio is printed beside its MAC ratio; JSON and a plot (speed ratio and limit vs
resolution, memory ratio) go to ``benchmarks/results/scaling.{json,png}``. Times are process CPU
seconds (``time.process_time``) with ``--threads 1``: other processes on the machine then cost this
one cache and memory bandwidth but not its time slices. The load average before and after each pair
is recorded; compare ratios inside one run, never absolute times across runs. ``--device cuda`` times
wall-clock seconds with the GPU synchronised and reports the CUDA allocator's peak; ``--bf16`` runs both
models under bf16 autocast (the weights stay fp32, as ``trainer.precision: bf16-mixed`` does).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from models import _interleaved, sgd_step  # the model benchmark's alternating timer and training step

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = {
    "deit": ("agent_deit_tiny", "deit_tiny_patch16_224"),
    "swin": ("agent_swin_tiny", "swin_tiny_patch4_window7_224"),
    "pvt": ("agent_pvt_small", "pvt_v1_small"),
}
SIZES = [(224, 8), (448, 2), (896, 1)]
DETECTION = "800x1344"


def _build(name: str, size: int | str, detection: bool) -> torch.nn.Module:
    import timm

    import agentlit  # noqa: F401  (registers the agent models)

    if detection:
        from detection import PAIRS as DET_PAIRS
        from detection import build

        spec = next(s for pair in DET_PAIRS.values() for s in pair if s[0] == name)
        return build(*spec)
    kwargs: dict[str, Any] = dict(img_size=size)
    return timm.create_model(name, pretrained=False, **kwargs)


_STAND_IN: list[str | None] = [None]  # the agent core's stand-in while a ceiling variant runs: "free" or "flash"


def _install_core_switch() -> None:
    """Route agentlit's fused agent op through a switch: off, the real op; "free", a stand-in whose
    attention products cost nothing (O = Q); "flash", the two agent steps as bias-free SDPA calls (the
    CPU flash kernel). Both keep the depthwise local term and the projection."""
    import torch.nn.functional as F

    from agentlit.core import functional

    real = functional.agent_attention_fused

    def switch(q, k, v, agents, agent_bias, query_bias, scale, broadcast_scale, *, dwc_weight=None, dwc_bias=None,
               layout=None, num_prefix_tokens=0, proj_weight=None, proj_bias=None):
        if _STAND_IN[0] is None:
            return real(q, k, v, agents, agent_bias, query_bias, scale, broadcast_scale, dwc_weight=dwc_weight,
                        dwc_bias=dwc_bias, layout=layout, num_prefix_tokens=num_prefix_tokens,
                        proj_weight=proj_weight, proj_bias=proj_bias)
        B, H, N, d = q.shape
        if _STAND_IN[0] == "flash":
            agent_v = F.scaled_dot_product_attention(agents, k, v, scale=scale)  # (B, H, n, d)
            o = F.scaled_dot_product_attention(q, agents, agent_v, scale=broadcast_scale)  # (B, H, N, d)
        else:
            o = q  # O = Q
        out = o.transpose(1, 2).reshape(B, N, H * d)  # (B, N, C) token-major
        if dwc_weight is not None:
            P = num_prefix_tokens
            tokens = v.transpose(1, 2).reshape(B, N, H * d)[:, P:]  # V's layout tokens (B, N - P, C)
            local = functional.depthwise_local(tokens, list(layout) if layout is not None else [N - P], dwc_weight, dwc_bias)
            out = torch.cat([out[:, :P], out[:, P:] + local], 1) if P else out + local
        return out.view(B, N, H, d) if proj_weight is None else F.linear(out, proj_weight, proj_bias)

    functional.agent_attention_fused = switch


def _with_stand_in(kind: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        _STAND_IN[0] = kind
        try:
            return fn()
        finally:
            _STAND_IN[0] = None
    return run


_CEILINGS = {"flash": "flash", "ceiling": "free"}  # timed variant -> the core's stand-in


def _outputs_sum(out: Any) -> torch.Tensor:
    """A scalar from a model's output (logits, or the FPN's dict / list of maps) to back-propagate."""
    if isinstance(out, torch.Tensor):
        return out.float().mean()
    values = out.values() if isinstance(out, dict) else out
    return sum(_outputs_sum(v) for v in values)


def measure_pair(pair: str, size: int | str, batch_size: int, warmup: int, repeats: int, threads: int,
                 modes: tuple[str, ...], ceiling: bool = False, device: str = "cpu", bf16: bool = False) -> dict[str, Any]:
    """Runs in a fresh process: MACs, inference and training times and training peak memory of a pair
    (and with ``ceiling`` the agent model's times with its core run by bias-free flash calls, and free)."""
    from agentlit.utils.flops import count_macs
    from agentlit.utils.memory import peak_memory

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if ceiling:
        _install_core_switch()
    detection = size == DETECTION
    agent_name, base_name = _detection_names(pair) if detection else PAIRS[pair]
    hw = (800, 1344) if detection else (int(size), int(size))
    x = torch.randn(batch_size, 3, *hw, device=device)
    models = {"agent": _build(agent_name, size, detection).to(device), "baseline": _build(base_name, size, detection).to(device)}
    row: dict[str, Any] = dict(pair=pair, size=str(size), batch_size=batch_size, agent=agent_name, baseline=base_name,
                               device=device, bf16=bf16, load_before=round(os.getloadavg()[0], 2))
    macs = {k: count_macs(m, x[:1])[0] for k, m in models.items()}
    row.update(agent_gmacs=macs["agent"] / 1e9, baseline_gmacs=macs["baseline"] / 1e9,
               mac_ratio=macs["baseline"] / macs["agent"])
    clock = time.process_time if threads == 1 and device == "cpu" else time.perf_counter
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16)

    def timed(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with autocast:
                out = fn()
            if device != "cpu":
                torch.cuda.synchronize(device)
            return out
        return run

    if "infer" in modes:
        for m in models.values():
            m.eval()
        with torch.inference_mode():
            fns = {k: timed(lambda m=m: m(x)) for k, m in models.items()}
            if ceiling:
                fns.update({k: _with_stand_in(kind, fns["agent"]) for k, kind in _CEILINGS.items()})
            times = _interleaved(fns, warmup, repeats, clock)
        row["infer_rounds_s"] = times

    if "train" in modes:
        y = torch.randint(0, 1000, (batch_size,), device=device)
        loss_of = _outputs_sum if detection else (lambda out: torch.nn.functional.cross_entropy(out, y))
        steps = {k: timed(sgd_step(m, x, loss_of)) for k, m in models.items()}
        if ceiling:
            steps.update({k: _with_stand_in(kind, steps["agent"]) for k, kind in _CEILINGS.items()})
        times = _interleaved(steps, max(1, warmup), repeats, clock)
        row["train_rounds_s"] = times
        for k in ("agent", "baseline"):
            row[f"{k}_train_peak_mib"] = peak_memory(steps[k], device) / 2**20
        row["train_memory_ratio"] = row["agent_train_peak_mib"] / row["baseline_train_peak_mib"]
    row["load_after"] = round(os.getloadavg()[0], 2)
    return summarise(row)


def summarise(row: dict[str, Any]) -> dict[str, Any]:
    """Every time-based field of a row from its rounds (``{mode}_rounds_s``: each model's time per round):
    medians ``{model}_{mode}_s``, ``{mode}_speed_ratio`` (baseline / agent medians), ``{mode}_efficiency``
    (over the MAC ratio), the stand-ins' efficiencies, and ``{mode}_efficiency_quartiles``: the first and
    third quartile of the rounds' own ratios (baseline time / agent time of the same round, over the MAC
    ratio). The two models of a round ran back to back, so the quartiles show how far the machine moved the
    ratio while it was measured; a target between them (a quarter of the rounds or more on either side) is
    not settled by the run. Rounds from several processes
    (``--processes``) are merged by concatenating them before this is called."""
    for mode in ("infer", "train"):
        times = row.get(f"{mode}_rounds_s")
        if times is None:
            continue
        row[f"{mode}_rounds_s"] = times = {k: [round(t, 6) for t in ts] for k, ts in times.items()}
        for k, ts in times.items():
            row[f"{k}_{mode}_s"] = statistics.median(ts)
        base, limit = row[f"baseline_{mode}_s"], row["mac_ratio"]
        row[f"{mode}_speed_ratio"] = base / row[f"agent_{mode}_s"]
        row[f"{mode}_efficiency"] = row[f"{mode}_speed_ratio"] / limit
        for k in _CEILINGS:
            if k in times:
                row[f"{mode}_{k}_efficiency"] = base / row[f"{k}_{mode}_s"] / limit
        paired = [b / a / limit for a, b in zip(times["agent"], times["baseline"])]
        row[f"{mode}_efficiency_quartiles"] = [round(v, 4) for v in _quartiles(paired)]
    return row


def _quartiles(values: list[float]) -> tuple[float, float]:
    """The first and third quartile of ``values`` (interpolated between them, never beyond the smallest
    and largest; one value is both)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def merge_processes(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the rows of the same cell measured in separate processes: their rounds concatenated
    (then :func:`summarise`d), each process's own efficiencies kept (``{mode}_process_efficiencies``), the
    lowest and highest load seen. A process keeps some state for its whole life (where its memory landed,
    what the machine's other tenants did meanwhile), so one process's rounds can all lean one way."""
    row = dict(runs[0])
    for mode in ("infer", "train"):
        if f"{mode}_rounds_s" in row:
            row[f"{mode}_rounds_s"] = {k: [t for r in runs for t in r[f"{mode}_rounds_s"][k]] for k in row[f"{mode}_rounds_s"]}
            row[f"{mode}_process_efficiencies"] = [round(r[f"{mode}_efficiency"], 4) for r in runs]
    row["processes"] = len(runs)
    row["load_before"] = min(r["load_before"] for r in runs)
    row["load_after"] = max(r["load_after"] for r in runs)
    return summarise(row)


def _detection_names(pair: str) -> tuple[str, str]:
    names = {"swin": ("agent_swin_tiny", "swin_tiny_patch4_window7_224"), "pvt": ("agent_pvt_small", "pvt_v1_small")}
    return names[pair]


def _run_isolated(kwargs: dict) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_pair, kwds=kwargs)


def _ratio(row: dict[str, Any], mode: str) -> str:
    if f"{mode}_speed_ratio" not in row:
        return "–"
    ceiling = (f"; flash {100 * row[f'{mode}_flash_efficiency']:.0f}%, free {100 * row[f'{mode}_ceiling_efficiency']:.0f}%"
               if f"{mode}_ceiling_efficiency" in row else "")
    return f"{row[f'{mode}_speed_ratio']:.2f}× ({100 * row[f'{mode}_efficiency']:.0f}%{ceiling})"


def _size_label(size: str) -> str:
    """224², or 800×1344 for the detection size."""
    return size.replace("x", "×") if size == DETECTION else f"{size}²"


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of docs/performance.md."""
    lines = [
        "| size, batch | pair | MAC ratio | inference speed ratio (of limit; ceilings) | training speed ratio (of limit; ceilings) "
        "| training peak memory, agent vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = (f"{r['agent_train_peak_mib']:.0f} vs {r['baseline_train_peak_mib']:.0f} MiB ({r['train_memory_ratio']:.2f}×)"
               if "train_memory_ratio" in r else "–")
        lines.append(f"| {_size_label(r['size'])}, {r['batch_size']} | {r['agent']} / {r['baseline']} | {r['mac_ratio']:.2f}× | "
                     f"{_ratio(r, 'infer')} | {_ratio(r, 'train')} | {mem} |")
    return "\n".join(lines)


TRAIN_TARGET, INFER_TARGET = 0.90, 0.95  # of the MAC limit, classification sizes
MEMORY_TARGET = {224: 1.10}  # training memory ratio allowed per size; 1.0 elsewhere (detection: not a target)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each measured cell against the targets: {"cells": [...], "met": {kind: [met, of]}}. A cell is
    {size, pair, kind, value, target, met} (kind: "train" / "infer" efficiency, "memory" ratio, or
    "detection_train" / "detection_infer" speed ratio), with ``out_of_reach`` naming the stand-in columns
    ("flash", "free") that miss the same target where they were measured. A speed cell whose rounds were
    recorded also has ``quartiles`` (of the per-round values, :func:`summarise`) and ``settled``: False when
    the target lies between them, so that another run on the same machine may well land on the other side."""
    cells = []

    def check(row: dict[str, Any], kind: str, value: float, target: float, above: bool, stand_ins: dict[str, float],
              spread: list[float] | None = None) -> None:
        met = value >= target if above else value <= target
        cell = dict(size=row["size"], pair=row["pair"], kind=kind, value=round(value, 4), target=target, met=met)
        if not met and stand_ins:
            cell["out_of_reach"] = [name for name, v in stand_ins.items() if v < target]
        if spread is not None:
            cell["quartiles"] = [round(v, 4) for v in spread]
            cell["settled"] = not spread[0] < target <= spread[1]
        cells.append(cell)

    for row in rows:
        detection = row["size"] == DETECTION
        for mode in ("train", "infer"):
            if f"{mode}_speed_ratio" not in row:
                continue
            scale = row["mac_ratio"] if detection else 1.0  # detection targets speed ratios, the others efficiencies
            stand_ins = {stand_in: row[f"{mode}_{variant}_efficiency"] * scale
                         for variant, stand_in in _CEILINGS.items() if f"{mode}_{variant}_efficiency" in row}
            spread = row.get(f"{mode}_efficiency_quartiles")
            spread = None if spread is None else [v * scale for v in spread]
            if detection:
                check(row, f"detection_{mode}", row[f"{mode}_speed_ratio"], 1.0, True, stand_ins, spread)
            else:
                target = TRAIN_TARGET if mode == "train" else INFER_TARGET
                check(row, mode, row[f"{mode}_efficiency"], target, True, stand_ins, spread)
        if not detection and "train_memory_ratio" in row:
            check(row, "memory", row["train_memory_ratio"], MEMORY_TARGET.get(int(row["size"]), 1.0), False, {})
    met: dict[str, list[int]] = {}
    for cell in cells:
        count = met.setdefault(cell["kind"], [0, 0])
        count[0] += int(cell["met"])
        count[1] += 1
    return dict(cells=cells, met=met)


def targets_text(summary: dict[str, Any]) -> str:
    """One line per kind of target: how many cells meet it, the misses, and the cells (met or missed) whose
    rounds' quartiles hold the target (the run does not settle them)."""
    allowances = ", ".join(f"≤ {v:g}× at {k}²" for k, v in MEMORY_TARGET.items())
    labels = {"train": f"training ≥ {TRAIN_TARGET:.0%} of the limit", "infer": f"inference ≥ {INFER_TARGET:.0%} of the limit",
              "memory": f"training memory ≤ the baseline's ({allowances})",
              "detection_train": "detection training ≥ 1.0×", "detection_infer": "detection inference ≥ 1.0×"}
    lines = []
    for kind, (met, of) in summary["met"].items():
        share = kind in ("train", "infer")
        shown = (lambda v: f"{v:.0%}") if share else (lambda v: f"{v:.2f}×")
        misses, unsettled = [], []
        for c in summary["cells"]:
            if c["kind"] != kind:
                continue
            name = f"{c['pair']} {_size_label(c['size'])}"
            if not c.get("settled", True):
                low, high = c["quartiles"]
                unsettled.append(f"{name} {shown(c['value'])} ({shown(low).rstrip('%×')}–{shown(high)})")
            if not c["met"]:
                reach = f", {' and '.join(c['out_of_reach'])} below it too" if c.get("out_of_reach") else ""
                misses.append(f"{name} {shown(c['value'])}{reach}")
        lines.append(f"{labels[kind]}: {met} of {of}" + (f" (missed: {'; '.join(misses)})" if misses else "")
                     + (f"; target between the quartiles of the rounds: {'; '.join(unsettled)}" if unsettled else ""))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"deit": "tab:blue", "swin": "tab:orange", "pvt": "tab:green"}
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for pair, color in colors.items():
        mine = {r["size"]: r for r in rows if r["pair"] == pair}
        xs = [i for i, s in enumerate(sizes) if s in mine]
        if not xs:
            continue
        for ax, mode in zip(axes[:2], ("infer", "train")):
            ys = [mine[sizes[i]].get(f"{mode}_speed_ratio") for i in xs]
            ax.plot(xs, [mine[sizes[i]]["mac_ratio"] for i in xs], "--", color=color, alpha=0.6)
            ax.plot(xs, ys, "o-", color=color, label=f"{pair}: measured (dashed: MAC limit)")
        axes[2].plot(xs, [mine[sizes[i]].get("train_memory_ratio") for i in xs], "o-", color=color, label=pair)
    for ax, title in zip(axes, ("inference speed ratio (baseline time / agent time)",
                                "training-step speed ratio", "training peak memory, agent / baseline")):
        ax.set_xticks(range(len(sizes)), [s if s == DETECTION else f"{s}²" for s in sizes])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("input size")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_size(text: str) -> tuple[int | str, int]:
    size, _, batch = text.partition(":")
    if size == DETECTION:
        return size, int(batch or 1)
    return int(size), int(batch or 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--sizes", nargs="+", default=[f"{s}:{b}" for s, b in SIZES] + [f"{DETECTION}:1"],
                        help=f"SIZE:BATCH entries; SIZE is an int (square input) or {DETECTION} (detection backbones)")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model and mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1,
                        help="fresh processes per pair and size, their rounds pooled (the run-to-run spread of a shared machine)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: time in CPU seconds)")
    parser.add_argument("--quick", action="store_true", help="224² and 448² only, 3 repeats")
    parser.add_argument("--ceiling", action="store_true", help="also time the agent model with its core as bias-free flash calls, and free")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--bf16", action="store_true", help="both models under bf16 autocast")
    parser.add_argument("--output", default=str(RESULTS / "scaling.json"), help="JSON path; the PNG gets the same stem")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.repeats < 1:
        parser.error(f"--processes {args.processes} and --repeats {args.repeats} must be at least 1")
    if args.ceiling and args.device != "cpu":
        parser.error("--ceiling replaces the CPU op; on --device cuda the agent models run SDPA kernels")
    sizes = [_parse_size(s) for s in args.sizes]
    if args.quick:
        sizes, args.repeats = [s for s in sizes if s[0] in (224, 448)], 3

    rows = []
    for size, batch in sizes:
        for pair in args.pairs:
            if size == DETECTION and pair == "deit":
                continue  # no DeiT detector
            row = merge_processes([_run_isolated(dict(
                pair=pair, size=size, batch_size=batch, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                modes=tuple(args.modes), ceiling=args.ceiling, device=args.device, bf16=args.bf16))
                for _ in range(args.processes)])
            rows.append(row)
            print(f"{row['size']:>9s} b{batch} {row['agent']} / {row['baseline']}: MAC ratio {row['mac_ratio']:.2f}x | "
                  f"inference {_ratio(row, 'infer')} | training {_ratio(row, 'train')} | training memory "
                  + (f"{row['agent_train_peak_mib']:.0f} vs {row['baseline_train_peak_mib']:.0f} MiB" if "train_memory_ratio" in row else "–")
                  + f" | load {row['load_before']}→{row['load_after']}", flush=True)
    print("\n" + table(rows))
    summary = targets(rows)
    print("\ntargets:\n" + targets_text(summary))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(settings=dict(threads=args.threads, repeats=args.repeats, processes=args.processes, ceiling=args.ceiling, device=args.device, bf16=args.bf16, warmup=args.warmup, torch=torch.__version__,
                                machine=platform.processor() or platform.machine(), cpu_count=mp.cpu_count(),
                                clock="process_time" if args.threads == 1 and args.device == "cpu" else "perf_counter"),
                  results=rows, targets=summary)
    out.write_text(json.dumps(report, indent=2))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
