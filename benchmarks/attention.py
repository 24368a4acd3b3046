"""Agent attention vs softmax attention: time and peak memory as the token count grows.

    python benchmarks/attention.py                 # N in {196, 784, 3136, 12544}, d=64, H=4, n=49
    python benchmarks/attention.py --tokens 196 784 --repeats 3
    python benchmarks/attention.py --sequence      # 1-D layers, L in {4096, 16384, 65536}, H=8, d=64, n=256

Three implementations measured in the same run, forward and forward+backward:
  agent  — ``agentlit.core.agent_attention`` (two SDPA calls through n agents), cost O(N·n·d)
  sdpa   — ``torch.nn.functional.scaled_dot_product_attention`` full softmax attention, O(N²·d)
  naive  — einsum + softmax full attention (materialises the N×N map)
The paper's cost model predicts sdpa/agent ≈ N / (2n) (two N×n products instead of one N×N).
Writes ``benchmarks/results/attention.json`` and ``attention.png``.

``--sequence`` measures whole 1-D attention layers (projections included, width H·d, batch 1),
without and with a key padding mask (the last quarter padded), forward and forward+backward:
  agent       — ``agentlit.AgentAttention`` on a sequence: pooled agents, position biases, depthwise conv
  agent-lean  — the same layer at the settings of ``agent-attention-pytorch``: learned agents, no
                biases, no conv, no qkv bias
  package     — ``agent_attention_pytorch.AgentSelfAttention`` (the ``bench`` extra), talking heads and
                gates off, so it computes what agent-lean computes
  sdpa        — qkv projection + SDPA softmax attention + output projection, run once per
                measurement (it is quadratic); above ``--sdpa-max-length`` only the unmasked forward
Writes ``benchmarks/results/attention_sequence.json``. CPU peak memory counts tensors created by ops
(the fused SDPA kernel's internal buffers are not seen).
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


class SoftmaxLayer(torch.nn.Module):
    """qkv → SDPA softmax attention → proj: the softmax layer at the agent layers' width."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, C))


def sequence_layers(dim: int, heads: int, agents: int) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """{name: (layer, call(layer, x, pad))}; ``pad`` (B, L) bool is True at padded tokens, or None."""
    from agentlit import AgentAttention

    ours = AgentAttention(dim, heads, feat_size=(4096,), agent_num=agents)
    lean = AgentAttention(dim, heads, feat_size=(4096,), agent_num=agents, agents="learned", position_bias=False,
                          dwc_kernel=0, qkv_bias=False)
    layers: dict[str, tuple[torch.nn.Module, Callable]] = {
        "agent": (ours, lambda m, x, pad: m(x, key_padding_mask=pad)),
        "agent-lean": (lean, lambda m, x, pad: m(x, key_padding_mask=pad)),
    }
    try:
        from agent_attention_pytorch import AgentSelfAttention
    except ImportError:
        print("agent-attention-pytorch is not installed (pip install -e '.[bench]'): its rows are skipped")
    else:
        package = AgentSelfAttention(dim, num_agent_tokens=agents, dim_head=dim // heads, heads=heads,
                                     talking_heads=False, gate=False)
        layers["package"] = (package, lambda m, x, pad: m(x, mask=None if pad is None else ~pad))  # True = keep
    layers["sdpa"] = (SoftmaxLayer(dim, heads), lambda m, x, pad: m(x, key_padding_mask=pad))
    return layers


def run_sequence(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    dim = args.seq_heads * args.seq_head_dim
    layers = sequence_layers(dim, args.seq_heads, args.seq_agents)
    rows = []
    for L in args.lengths:
        x = torch.randn(1, L, dim, device=device, dtype=dtype)
        for masked in (False, True):
            pad = None
            if masked:
                pad = torch.zeros(1, L, dtype=torch.bool, device=device)
                pad[:, L - L // 4:] = True
            for name, (layer, call) in layers.items():
                layer.to(device=device, dtype=dtype)
                big = name == "sdpa" and L > args.sdpa_max_length
                if big and masked:
                    continue  # quadratic: the unmasked forward says enough
                xg = x.clone().requires_grad_()

                def fwd():
                    with torch.no_grad():
                        return call(layer, x, pad)

                def fwd_bwd():
                    call(layer, xg, pad).sum().backward()

                # softmax attention is quadratic: one run per measurement is plenty at these lengths
                repeats, warmup = (1, 0) if name == "sdpa" else (args.repeats, args.warmup)
                row = {"impl": name, "length": L, "masked": masked, "fwd_ms": 1e3 * timeit(fwd, repeats, warmup, device)}
                if not big:
                    row.update(fwd_bwd_ms=1e3 * timeit(fwd_bwd, repeats, warmup, device),
                               fwd_peak_mib=peak_memory(fwd, device) / 2**20,
                               fwd_bwd_peak_mib=peak_memory(fwd_bwd, device) / 2**20)
                rows.append(row)
                f = lambda k, u: f"{row[k]:9.1f} {u}" if k in row else f"{'-':>9}   "  # noqa: E731
                print(f"L={L:6d} {'mask' if masked else '    '} {name:10s} fwd {f('fwd_ms', 'ms')}  fwd+bwd "
                      f"{f('fwd_bwd_ms', 'ms')}  peak {f('fwd_peak_mib', 'MiB')} / {f('fwd_bwd_peak_mib', 'MiB')}",
                      flush=True)
    summary = []
    for L in args.lengths:
        for masked in (False, True):
            by = {r["impl"]: r for r in rows if r["length"] == L and r["masked"] == masked}
            s = {"length": L, "masked": masked}
            for other in ("package", "sdpa"):
                for key in ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_peak_mib"):
                    if other in by and key in by[other]:
                        s[f"{other}_over_agent-lean_{key}"] = by[other][key] / by["agent-lean"][key]
                        s[f"{other}_over_agent_{key}"] = by[other][key] / by["agent"][key]
            summary.append(s)
    out = args.output if args.output != RESULTS / "attention.json" else RESULTS / "attention_sequence.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "attention_sequence", "machine": machine_info(device), "device": str(device),
              "dtype": args.dtype, "config": {k: v for k, v in vars(args).items() if k != "output"},
              "rows": rows, "summary": summary}
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")


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
    p.add_argument("--sequence", action="store_true", help="1-D layers vs SDPA and agent-attention-pytorch")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--seq-heads", type=int, default=8)
    p.add_argument("--seq-head-dim", type=int, default=64)
    p.add_argument("--seq-agents", type=int, default=256)
    p.add_argument("--sdpa-max-length", type=int, default=16384,
                   help="above this length SDPA's forward is timed once and its backward not at all (quadratic)")
    args = p.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.sequence:
        run_sequence(args, device, dtype)
        return
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
