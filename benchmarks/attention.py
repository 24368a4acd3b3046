"""Agent attention vs softmax attention: time and peak memory as the token count grows.

    python benchmarks/attention.py                 # N in {196, 784, 3136, 12544}, d=64, H=4, n=49
    python benchmarks/attention.py --tokens 196 784 --repeats 3

Three implementations measured in the same run, forward and forward+backward:
  agent  — ``agentlit.core.agent_attention`` (two SDPA calls through n agents), cost O(N·n·d)
  sdpa   — ``torch.nn.functional.scaled_dot_product_attention`` full softmax attention, O(N²·d)
  naive  — einsum + softmax full attention (materialises the N×N map)
The paper's cost model predicts sdpa/agent ≈ N / (2n) (two N×n products instead of one N×N).
Writes ``benchmarks/results/attention.json`` and ``attention.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from agentlit.core import agent_attention
from agentlit.profiling import machine_info
from agentlit.utils.memory import peak_memory

RESULTS = Path(__file__).resolve().parent / "results"


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    attn = torch.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhnm,bhmd->bhnd", attn.softmax(-1), v)


def make_impls(n_agents: int) -> dict[str, Callable]:
    def agent(q, k, v):
        B, H, N, d = q.shape
        side = int(N**0.5)
        # agents pooled from the queries, as the layer does (square maps in this benchmark)
        a = F.adaptive_avg_pool2d(q.reshape(B * H, side, side, d).permute(0, 3, 1, 2), int(n_agents**0.5))
        a = a.flatten(2).transpose(1, 2).reshape(B, H, n_agents, d)
        return agent_attention(q, k, v, a)

    return {"agent": agent, "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v), "naive": naive_attention}


def timeit(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` runs after ``warmup`` runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[196, 784, 3136, 12544])
    p.add_argument("--agents", type=int, default=49)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--naive-max-tokens", type=int, default=12544, help="skip the naive einsum above this N")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--output", type=Path, default=RESULTS / "attention.json")
    args = p.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    impls = make_impls(args.agents)
    rows = []
    for N in args.tokens:
        shape = (args.batch, args.heads, N, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        for name, fn in impls.items():
            if name == "naive" and N > args.naive_max_tokens:
                continue
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

            def fwd():
                with torch.no_grad():
                    return fn(q, k, v)

            def fwd_bwd():
                fn(qg, kg, vg).sum().backward()

            row = {
                "impl": name, "tokens": N,
                "fwd_ms": 1e3 * timeit(fwd, args.repeats, args.warmup, device),
                "fwd_bwd_ms": 1e3 * timeit(fwd_bwd, args.repeats, args.warmup, device),
                "fwd_peak_mib": peak_memory(fwd, device) / 2**20,
                "fwd_bwd_peak_mib": peak_memory(fwd_bwd, device) / 2**20,
            }
            rows.append(row)
            print(f"N={N:6d} {name:6s} fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  "
                  f"peak {row['fwd_peak_mib']:8.1f} / {row['fwd_bwd_peak_mib']:8.1f} MiB", flush=True)

    # Ratios against the baselines measured above, and the cost model's prediction N / (2n).
    summary = []
    print(f"\n{'N':>6} | {'sdpa/agent fwd':>14} | {'sdpa/agent f+b':>14} | {'naive/agent fwd':>15} | "
          f"{'mem sdpa/agent':>14} | {'N/(2n)':>7}")
    for N in args.tokens:
        by = {r["impl"]: r for r in rows if r["tokens"] == N}
        a = by["agent"]
        s = {
            "tokens": N,
            "sdpa_over_agent_fwd": by["sdpa"]["fwd_ms"] / a["fwd_ms"],
            "sdpa_over_agent_fwd_bwd": by["sdpa"]["fwd_bwd_ms"] / a["fwd_bwd_ms"],
            "naive_over_agent_fwd": by["naive"]["fwd_ms"] / a["fwd_ms"] if "naive" in by else None,
            "sdpa_over_agent_fwd_bwd_memory": by["sdpa"]["fwd_bwd_peak_mib"] / max(a["fwd_bwd_peak_mib"], 1e-9),
            "cost_model": N / (2 * args.agents),
        }
        summary.append(s)
        naive = f"{s['naive_over_agent_fwd']:15.2f}" if s["naive_over_agent_fwd"] else f"{'-':>15}"
        print(f"{N:6d} | {s['sdpa_over_agent_fwd']:14.2f} | {s['sdpa_over_agent_fwd_bwd']:14.2f} | {naive} | "
              f"{s['sdpa_over_agent_fwd_bwd_memory']:14.2f} | {s['cost_model']:7.1f}")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "attention", "machine": machine_info(device), "device": str(device), "dtype": args.dtype,
              "config": {k: v for k, v in vars(args).items() if k not in ("output",)}, "rows": rows, "summary": summary}
    args.output.write_text(json.dumps(report, indent=2, default=str))
    plot(rows, args.output.with_suffix(".png"))
    print(f"\nwrote {args.output} and {args.output.with_suffix('.png')}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl in sorted({r["impl"] for r in rows}):
        rs = [r for r in rows if r["impl"] == impl]
        axes[0].plot([r["tokens"] for r in rs], [r["fwd_bwd_ms"] for r in rs], "o-", label=impl)
        axes[1].plot([r["tokens"] for r in rs], [r["fwd_bwd_peak_mib"] for r in rs], "o-", label=impl)
    for ax, title in zip(axes, ("forward+backward time (ms)", "forward+backward peak memory (MiB)")):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("tokens N"), ax.set_title(title), ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
