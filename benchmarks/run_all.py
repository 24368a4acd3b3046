"""Run every benchmark and collect the results into ``benchmarks/results/REPORT.md`` (+ PNG plots).

    python benchmarks/run_all.py                       # full settings of each script (hours on a CPU: AgentSD at 512/1024 px)
    python benchmarks/run_all.py --quick               # small sizes and repeats (minutes)
    python benchmarks/run_all.py --quick --only attention profile
    python benchmarks/run_all.py --report-only         # rebuild REPORT.md and the plots from the JSON already there
    python benchmarks/run_all.py --args attention="--tokens 196 784 --repeats 3"   # extra flags for one script

Benchmarks (those whose script exists are run, each in its own process, one after another):
  attention  benchmarks/attention.py   agent vs softmax attention, time and memory vs token count
  models     benchmarks/models.py      throughput of the paper's speed pairs (agent model vs baseline)
  agentsd    benchmarks/agentsd.py     Stable Diffusion time per image, baseline / ToMe / AgentSD
  profile    agentlit profile          the quickstart config and Agent-DeiT-T at 224² (parameters, MACs, throughput)

Each run's command, exit status, wall time and machine (CPU model, cores, torch, device, load) go to
``results/run_all.json``; REPORT.md is generated from the JSON files only, with every section stamped
with the machine it ran on. A failing benchmark is reported and the others still run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MANIFEST = "run_all.json"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def benchmarks(device: str) -> dict[str, dict[str, Any]]:
    """name → script, the JSON files it writes (relative to the results folder) and its runs:
    a list of (output JSON, full-setting args, quick-setting args)."""
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    deit_224 = ["--config", "configs/classification/agent_deit_tiny_imagenet.yaml", "--trainer.accelerator", "auto",
                "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.precision", precision]
    return {
        "attention": dict(script="benchmarks/attention.py", runs=[
            ("attention.json", [], ["--tokens", "196", "784", "3136", "--repeats", "3", "--warmup", "1"])]),
        "models": dict(script="benchmarks/models.py", threads_flag="--threads", runs=[
            ("models.json", [], ["--models", "agent_deit_tiny:deit_tiny_patch16_224", "agent_pvt_tiny:pvt_v1_tiny",
                                 "--batch-size", "4", "--repeats", "3", "--warmup", "1"])]),
        "agentsd": dict(script="benchmarks/agentsd.py", runs=[
            (f"agentsd_{device}.json", [], ["--sizes", "256", "--steps", "2", "--agent-steps", "2", "--repeats", "1",
                                            "--warmup", "1"])]),
        "profile": dict(script="agentlit/profiling.py", module="agentlit", subcommand="profile", threads_flag="--threads", runs=[
            ("profile_quickstart.json", ["--config", "configs/quickstart.yaml"],
             ["--config", "configs/quickstart.yaml", "--steps", "3", "--warmup", "1"]),
            ("profile_agent_deit_tiny_224.json", [*deit_224, "--batch_size", "32"],
             [*deit_224, "--batch_size", "4", "--steps", "2", "--warmup", "1"]),
        ]),
    }


def _command(spec: dict[str, Any], out: str, args: list[str], results: Path, threads: int | None) -> list[str]:
    out_path = results / out
    try:
        out_arg = str(out_path.relative_to(ROOT))  # commands in the report name no machine paths
    except ValueError:
        out_arg = str(out_path)
    if "module" in spec:
        cmd = ["python", "-m", spec["module"], spec["subcommand"], *args]
    else:
        cmd = ["python", spec["script"], *args]
    if threads and spec.get("threads_flag"):
        cmd += [spec["threads_flag"], str(threads)]
    return cmd + ["--output", out_arg]


def run(names: list[str], quick: bool, results: Path, threads: int | None, extra: dict[str, list[str]]) -> dict[str, Any]:
    """Run the selected benchmarks; returns (and writes) the manifest."""
    sys.path.insert(0, str(ROOT))
    from agentlit.profiling import machine_info

    device = _device()
    specs = benchmarks(device)
    manifest_path = results / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for name in names:
        spec = specs[name]
        if not (ROOT / spec["script"]).is_file():
            print(f"[run_all] {name}: {spec['script']} does not exist, skipped", flush=True)
            continue
        entries = []
        for out, full, quick_args in spec["runs"]:
            cmd = _command(spec, out, (quick_args if quick else full) + extra.get(name, []), results, threads)
            shown = " ".join(shlex.quote(c) for c in cmd)
            print(f"[run_all] {name}: {shown}", flush=True)
            started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            t0 = time.perf_counter()
            machine = machine_info(device)  # before the run: the load average says what else was running
            lines: list[str] = []
            with subprocess.Popen([sys.executable, *cmd[1:]], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, bufsize=1) as proc:
                for line in proc.stdout:  # streamed, so long runs show progress
                    print(line, end="", flush=True)
                    lines = (lines + [line])[-60:]
            entries.append({"command": shown, "output": out, "returncode": proc.returncode, "started_utc": started,
                            "wall_s": round(time.perf_counter() - t0, 1), "quick": quick, "machine": machine,
                            "log_tail": "".join(lines)[-1500:] if proc.returncode else ""})
            status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
            print(f"[run_all] {name}: {status} in {entries[-1]['wall_s']} s", flush=True)
        manifest[name] = entries
        results.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


# ----------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}" if abs(v) >= 1e4 else str(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "–" if v is None else str(v)


def table(rows: list[dict[str, Any]], columns: list[str] | None = None, headers: dict[str, str] | None = None) -> str:
    """A markdown table of ``rows`` (columns: given, else every key in first-seen order)."""
    if not rows:
        return "_no rows_\n"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (list, dict))]
    headers = headers or {}
    out = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out) + "\n"


def machine_line(m: dict[str, Any] | None) -> str:
    """CPU model, cores, torch version, device (and GPU, threads, load) in one line."""
    if not m:
        return "machine: not recorded"
    parts = [f"CPU {m.get('cpu', '?')}"]
    if m.get("cores") is not None:
        usable = m.get("cores_usable")
        parts.append(f"{m['cores']} cores" + (f" ({usable} usable)" if usable and usable != m["cores"] else ""))
    if m.get("torch_threads"):
        parts.append(f"{m['torch_threads']} torch threads")
    parts.append(f"torch {m.get('torch', '?')}")
    parts.append(f"device {m.get('device', '?')}" + (f" ({m['gpu']})" if m.get("gpu") else ""))
    if m.get("loadavg_1m") is not None:
        parts.append(f"load avg {m['loadavg_1m']} at start")
    return "machine: " + ", ".join(parts)


def _machine(data: dict[str, Any], entry: dict[str, Any] | None) -> dict[str, Any]:
    """The run's machine: run_all's record (CPU model, cores, load) completed by the JSON's own fields;
    the thread count is the benchmark process's own."""
    m = dict(data.get("machine") or {})
    if not m and isinstance(data.get("settings"), dict):  # models.py keeps a few fields in settings
        s = data["settings"]
        m = {"cpu": s.get("machine"), "cores": s.get("cpu_count"), "torch": s.get("torch"), "threads": s.get("threads")}
    threads = m.pop("threads", None) or m.get("torch_threads")
    if entry and entry.get("machine"):
        m = {**m, **{k: v for k, v in entry["machine"].items() if v is not None}}
    if threads:
        m["torch_threads"] = threads
    m.setdefault("device", data.get("device", "cpu"))
    return m


def _plot_stamp(fig: Any, machine: dict[str, Any]) -> None:
    fig.text(0.01, 0.005, machine_line(machine), fontsize=7, color="0.4", ha="left", va="bottom")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def section_attention(data: dict[str, Any], machine: dict[str, Any], results: Path) -> tuple[str, list[str]]:
    rows = data.get("rows", [])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for impl in sorted({r["impl"] for r in rows}):
        rs = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["tokens"])
        n = [r["tokens"] for r in rs]
        line = axes[0].plot(n, [r["fwd_bwd_ms"] for r in rs], "o-", label=f"{impl} fwd+bwd")[0]
        axes[0].plot(n, [r["fwd_ms"] for r in rs], "s--", color=line.get_color(), alpha=0.7, label=f"{impl} fwd")
        axes[1].plot(n, [r["fwd_bwd_peak_mib"] for r in rs], "o-", color=line.get_color(), label=f"{impl} fwd+bwd")
        axes[1].plot(n, [r["fwd_peak_mib"] for r in rs], "s--", color=line.get_color(), alpha=0.7, label=f"{impl} fwd")
    tokens = sorted({r["tokens"] for r in rows})
    for ax, title in zip(axes, ("time (ms)", "peak memory (MiB)")):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("tokens N"), ax.set_title(title)
        ax.set_xticks(tokens, [str(t) for t in tokens]), ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=7)
    cfg = data.get("config", {})
    fig.suptitle(f"attention vs tokens ({data.get('device', '?')}, {data.get('dtype', '?')}, "
                 f"{cfg.get('agents', '?')} agents, d={cfg.get('head_dim', '?')}, H={cfg.get('heads', '?')})", fontsize=10)
    _plot_stamp(fig, machine)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(results / "report_attention.png", dpi=110)
    plt.close(fig)
    md = ["![attention time and memory vs tokens](report_attention.png)\n\n",
          table(rows, ["tokens", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_peak_mib", "fwd_bwd_peak_mib"],
                {"fwd_ms": "fwd ms", "fwd_bwd_ms": "fwd+bwd ms", "fwd_peak_mib": "fwd peak MiB",
                 "fwd_bwd_peak_mib": "fwd+bwd peak MiB"}),
          "\nRatios against agent attention in the same run (cost model: N / (2n)):\n\n",
          table(data.get("summary", []))]
    key = []
    summ = data.get("summary") or []
    if summ:
        s = max(summ, key=lambda r: r["tokens"])
        key.append(f"attention at N = {s['tokens']}: SDPA / agent time {s['sdpa_over_agent_fwd_bwd']:.2f}× (fwd+bwd), "
                   f"memory {s['sdpa_over_agent_fwd_bwd_memory']:.2f}× (cost model N/(2n) = {s['cost_model']:.1f})")
    return "".join(md), key


def section_models(data: dict[str, Any], machine: dict[str, Any], results: Path) -> tuple[str, list[str]]:
    res = data.get("results", {})
    rows = list(res.values())
    plt = _plt()
    keys = [k for k in ("infer_images_per_s", "train_images_per_s") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(6 * max(1, len(keys)), 4.3), squeeze=False)
    agents = {r["agent"] for r in data.get("ratios", [])}
    for ax, key in zip(axes[0], keys):
        names = list(res)
        values = [res[n].get(key, 0.0) for n in names]
        colors = ["tab:orange" if n in agents or n.startswith("agent_") else "tab:blue" for n in names]
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace("_patch16_224", "").replace("_patch4_window7_224", "") for n in names],
                      rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("images / s"), ax.set_title(("inference" if key.startswith("infer") else "training") + " throughput")
    s = data.get("settings", {})
    fig.suptitle(f"model throughput, batch {s.get('batch_size', '?')} at {s.get('img_size', '?')}² "
                 "(agent models orange, baselines blue)", fontsize=10)
    _plot_stamp(fig, machine)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(results / "report_models.png", dpi=110)
    plt.close(fig)
    md = ["![model throughput](report_models.png)\n\n", table(rows), "\nAgent model vs baseline, measured in the same run:\n\n",
          table(data.get("ratios", []))]
    key = []
    for r in data.get("ratios", []):
        paper = f" (paper, desktop CPU: {r['paper_cpu_speedup']}×)" if r.get("paper_cpu_speedup") else ""
        key.append(f"{r['agent']} vs {r['baseline']}: inference speed-up {r['infer_speedup']:.2f}×{paper}"
                   + (f", training {r['train_speedup']:.2f}×" if r.get("train_speedup") else "")
                   + f" (batch {data.get('settings', {}).get('batch_size', '?')})")
    return "".join(md), key


def section_agentsd(data: dict[str, Any], machine: dict[str, Any], results: Path, stem: str) -> tuple[str, list[str]]:
    rows = data.get("rows", [])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.3))
    sizes = sorted({r["size"] for r in rows})
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    width = 0.8 / max(1, len(settings))
    for i, setting in enumerate(settings):
        vals = [next((r["time_per_image_s"] for r in rows if r["size"] == s and r["setting"] == setting), 0.0) for s in sizes]
        bars = ax.bar([j + i * width for j in range(len(sizes))], vals, width, label=setting)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(sizes))], [f"{s} px" for s in sizes])
    ax.set_ylabel("s / image"), ax.legend(loc="lower right")
    steps = data.get("config", {}).get("steps", "?")
    ax.set_title(f"Stable Diffusion time per image, {steps} steps ({data.get('device', '?')}, {data.get('dtype', '?')})",
                 fontsize=10)
    _plot_stamp(fig, machine)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(results / f"report_{stem}.png", dpi=110)
    plt.close(fig)
    md = [f"{data.get('model', '')}\n\n" if data.get("model") else "", f"![AgentSD time per image](report_{stem}.png)\n\n",
          table(rows, ["size", "setting", "time_per_image_s", "time_per_step_s", "peak_mem_mib"],
                {"time_per_image_s": "s / image", "time_per_step_s": "s / step", "peak_mem_mib": "peak MiB"}),
          "\nSpeed-ups against the unpatched pipeline in the same run:\n\n", table(data.get("summary", []))]
    key = []
    for s in data.get("summary", []):
        if s.get("speedup_agentsd"):
            line = f"AgentSD at {s['size']} px (steps={steps}): {s['speedup_agentsd']:.2f}× vs SD"
            if s.get("estimated_50_steps_speedup_agentsd"):
                line += f", estimated 50-step {s['estimated_50_steps_speedup_agentsd']:.2f}× (paper: 1.84× on a GPU)"
            key.append(line)
    return "".join(md), key


def section_profiles(files: list[tuple[str, dict[str, Any]]]) -> tuple[str, list[str]]:
    rows, key = [], []
    for name, r in files:
        row = {
            "file": name, "model": r.get("model"), "batch": r.get("input", {}).get("batch_size"),
            "size": "×".join(str(v) for v in r.get("input", {}).get("img_size") or []),
            "params (M)": r["params"]["total"] / 1e6, "GMACs / item": r.get("macs", {}).get("per_item", 0) / 1e9,
        }
        for sec, label in (("inference", "inference items/s"), ("train", "training items/s")):
            if r.get(sec, {}).get("items_per_s"):
                row[label] = r[sec]["items_per_s"]
                row[label.split()[0] + " peak MiB"] = r[sec]["memory"]["peak_mib"]
        if r.get("inference", {}).get("steps"):  # multi-step inference (generation): seconds per image
            row["s / image"] = 1 / r["inference"]["items_per_s"]
        rows.append(row)
        kw = f" {json.dumps(r['model_kwargs'])}" if r.get("model_kwargs") else ""
        key.append(f"{r.get('model')}{kw} at {row['size']}: {_fmt(r['params']['total'] / 1e6)}M parameters, "
                   f"{r['macs']['per_item'] / 1e9:.3f} GMACs per image"
                   + (f", {row['inference items/s']:.1f} img/s inference" if "inference items/s" in row else "")
                   + (f", {row['training items/s']:.1f} img/s training (batch {row['batch']})" if "training items/s" in row else ""))
    return table(rows), key


def build_report(results: Path = RESULTS, command: str | None = None) -> Path:
    """Write ``REPORT.md`` and its PNGs in ``results`` from the JSON there; returns the report path."""
    manifest = json.loads((results / MANIFEST).read_text()) if (results / MANIFEST).is_file() else {}

    def entry(name: str, out: str) -> dict[str, Any] | None:
        return next((e for e in manifest.get(name, []) if e.get("output") == out), None)

    def load(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    sections: list[str] = []
    key: list[str] = []

    def add(title: str, name: str, out: str, data: dict[str, Any], make: Callable[..., tuple[str, list[str]]], *extra: Any) -> None:
        e = entry(name, out)
        m = _machine(data, e)
        body, k = make(data, m, results, *extra)
        if e:
            how = f"`{e['command']}`" + (" (quick settings)" if e.get("quick") else "") + f", {e['wall_s']} s, {e['started_utc']}"
        else:
            settings = data.get("config") or data.get("settings") or {}
            how = f"not run by run_all; settings recorded in `{out}`: " + ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items())
        sections.append(f"## {title}\n\n{machine_line(m)}  \ncommand: {how}\n\n{body}")
        key.extend(k)

    for out, title in (("attention.json", "Attention scaling"),):
        if (data := load(results / out)) is not None:
            add(title, "attention", out, data, section_attention)
    if (data := load(results / "models.json")) is not None:
        add("Model throughput", "models", "models.json", data, section_models)
    for path in sorted(results.glob("agentsd_*.json")):
        if (data := load(path)) is not None:
            add(f"AgentSD ({path.stem.split('_', 1)[1]})", "agentsd", path.name, data, section_agentsd, path.stem)
    profiles = [(p.name, d) for p in sorted(results.glob("profile_*.json")) if (d := load(p)) is not None]
    if profiles:
        body, k = section_profiles(profiles)
        stamps = []
        for name, d in profiles:
            e = entry("profile", name)
            how = f"`{e['command']}`" + (" (quick settings)" if e.get("quick") else "") if e else "(not run by run_all)"
            stamps.append(f"- `{name}`: {how}; {machine_line(_machine(d, e))}")
        sections.append("## agentlit profile\n\n" + "\n".join(stamps) + "\n\n" + body)
        key.extend(k)
    failures = [(n, e) for n, es in manifest.items() for e in es if e.get("returncode")]
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    head = [
        "# Benchmark report\n",
        f"Generated by `{command or 'python benchmarks/run_all.py'}` at {now} from the JSON files in this folder; "
        "do not edit by hand (rerun the command). Ratios compare runs made in the same process/run; absolute numbers "
        "depend on the machine stamped on each section (and on other load on it).\n",
    ]
    if key:
        head.append("## Key numbers\n\n" + "\n".join(f"- {k}" for k in key) + "\n")
    if failures:
        head.append("## Failed runs\n\n" + "\n".join(
            f"- {n}: `{e['command']}` exited {e['returncode']}:\n\n```\n{e.get('log_tail', '').strip()[-800:]}\n```" for n, e in failures) + "\n")
    path = results / "REPORT.md"
    results.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head + sections))
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["attention", "models", "agentsd", "profile"]
    p.add_argument("--quick", action="store_true", help="small sizes and repeats")
    p.add_argument("--only", nargs="+", choices=names, default=names, help="run only these benchmarks")
    p.add_argument("--report-only", action="store_true", help="only rebuild REPORT.md and its plots")
    p.add_argument("--threads", type=int, default=None, help="torch threads for models.py and agentlit profile")
    p.add_argument("--args", action="append", default=[], metavar='NAME="FLAGS"',
                   help="extra flags for one benchmark, e.g. attention=\"--tokens 196 784\" (repeatable)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON, PNGs and REPORT.md go")
    args = p.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, flags = item.partition("=")
        if name not in names:
            p.error(f"--args {item!r}: the name before '=' must be one of {names}")
        extra.setdefault(name, []).extend(shlex.split(flags))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    shown = "python benchmarks/run_all.py" + (" " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])) if (argv or sys.argv[1:]) else "")
    if not args.report_only:
        run(args.only, args.quick, args.results_dir.resolve(), args.threads, extra)
    report = build_report(args.results_dir, command=shown)
    print(f"[run_all] wrote {report}")
    return report


if __name__ == "__main__":
    main()
