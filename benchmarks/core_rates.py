"""How fast the agent core runs its arithmetic, layer shape by layer shape, against the matrix products alone.

    python benchmarks/core_rates.py --threads 1                      # Agent-DeiT-T and Agent-PVT-S at 224², 448², 896²
    python benchmarks/core_rates.py --models agent_deit_tiny --sizes 224:8

One forward pass of each agent model records the shape of every call of the CPU agent op (batch B,
heads H, queries N, keys M, head dim d, agents n). Each distinct shape is then timed five ways on
random tensors, taking turns round by round (forward, no grad, 1 thread: process CPU seconds):

- **core**: the CPU op (``agentlit.core.agent_attention``) with both position biases, as the layers
  call it (Q, K, V strided views of one qkv tensor), without the local term and the projection;
- **products**: the op's four matrix products alone as plain contiguous ``bmm`` calls, A Kᵀ (n × M),
  P1 V, Q Aᵀ (N × n) and P2 V_A: no softmax, no bias, no layout; what the same MACs cost at the GEMM
  library's speed for these shapes;
- **flash**: the two agent steps as PyTorch's CPU flash-attention kernel runs them
  (``scaled_dot_product_attention`` of A over K, V, then of Q over A, V_A) without biases: the scaling
  table's flash column (``benchmarks/scaling.py --ceiling``) for one layer;
- **flash + biases**: the same two calls with B1 and B2 as float masks (B2 token-major, as a mask
  must be): what the op would cost if it handed every step to the flash kernel;
- **softmax**: ``scaled_dot_product_attention`` of the N queries over N keys (a ViT's attention at
  that size): the rate the softmax kernel reaches on long rows, for reference (up to
  ``--softmax-max-tokens``: it is quadratic).

Each row prints GMAC/s for each, the core's time over the products' time (what the softmaxes,
biases, loops and layout cost on top of the arithmetic), over the flash calls' time with and without
biases (below 1: the op beats PyTorch's kernel at that shape) and, beside the speed ratio core vs
softmax, their MAC ratio. The scaling table's efficiency (``benchmarks/scaling.py``) follows from these rates:
where the core's rate is far below the products' and the softmax kernel's, the agent model reaches
less of its MAC limit. JSON goes to ``benchmarks/results/core_rates.json``.
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
import torch.nn.functional as F

from models import _interleaved  # the model benchmark's alternating timer

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["agent_deit_tiny", "agent_pvt_small"]
SIZES = ["224:8", "448:2", "896:1"]


def layer_shapes(model_name: str, size: int, batch: int) -> list[dict[str, int]]:
    """The distinct (B, H, N, M, d, n) of the CPU agent op's calls in one forward pass of ``model_name``
    at ``size``² and ``batch``, with how many layers call each."""
    import timm

    import agentlit  # noqa: F401  (registers the agent models)
    from agentlit.core import functional

    seen: dict[tuple[int, ...], int] = {}
    real = functional.agent_attention_fused

    def record(q, k, v, agents, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        key = (q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], agents.shape[2])
        seen[key] = seen.get(key, 0) + 1
        return real(q, k, v, agents, *args, **kwargs)

    model = timm.create_model(model_name, pretrained=False, img_size=size).eval()
    functional.agent_attention_fused = record
    try:
        with torch.no_grad():
            model(torch.randn(batch, 3, size, size))
    finally:
        functional.agent_attention_fused = real
    return [dict(zip(("B", "H", "N", "M", "d", "n"), key), layers=count) for key, count in seen.items()]


def shape_fns(B: int, H: int, N: int, M: int, d: int, n: int, softmax_max_tokens: int
              ) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """The timed calls of one layer shape (the softmax reference up to ``softmax_max_tokens``) and their MACs."""
    from agentlit.core import agent_attention

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3, H, d, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) strided views, as a layer's qkv gives them
    if M != N:
        k, v = torch.randn(2, B, M, H, d, generator=g).permute(0, 1, 3, 2, 4).unbind(0)
    agents = torch.randn(B, H, n, d, generator=g)
    b1 = torch.randn(1, H, n, M, generator=g)
    b2 = torch.randn(1, H, n, N, generator=g).transpose(-1, -2)  # agent-major memory, as the bias modules give it
    s = d**-0.5
    # the products alone: contiguous operands, heads and batch folded
    a_, k_, v_, q_ = (t.reshape(B * H, -1, d).contiguous() for t in (agents, k, v, q))
    p1, p2 = torch.rand(B * H, n, M, generator=g), torch.rand(B * H, N, n, generator=g)
    kt, at = k_.transpose(1, 2).contiguous(), a_.transpose(1, 2).contiguous()
    qs, ks, vs = (torch.randn(B, H, N, d, generator=g) for _ in range(3))

    def core() -> object:
        return agent_attention(q, k, v, agents, agent_bias=b1, query_bias=b2, scale=s, broadcast_scale=s)

    def products() -> object:
        agent_v = torch.bmm(p1, v_)
        torch.bmm(a_, kt)
        torch.bmm(q_, at)
        return torch.bmm(p2, agent_v)

    b2_mask = b2.contiguous()  # (1, H, N, n) token-major: the mask layout the flash kernel reads

    def flash() -> object:
        agent_v = F.scaled_dot_product_attention(agents, k, v, scale=s)  # (B, H, n, d)
        return F.scaled_dot_product_attention(q, agents, agent_v, scale=s)  # (B, H, N, d)

    def flash_biases() -> object:
        agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=b1, scale=s)
        return F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=b2_mask, scale=s)

    def softmax() -> object:
        return F.scaled_dot_product_attention(qs, ks, vs)

    macs = dict(core=B * H * d * 2 * (n * M + N * n), softmax=B * H * d * 2 * N * N)
    macs["products"] = macs["flash"] = macs["flash_biases"] = macs["core"]
    fns: dict[str, Callable[[], object]] = dict(core=core, products=products, flash=flash, flash_biases=flash_biases)
    if N <= softmax_max_tokens:
        fns["softmax"] = softmax
    return fns, macs


def measure(shape: dict[str, int], repeats: int, warmup: int, inner: int, softmax_max_tokens: int) -> dict[str, Any]:
    """One layer shape's row: ms and GMAC/s of each timed call, core / products, and core vs softmax
    (speed ratio beside the MAC ratio) where the softmax reference ran."""
    fns, macs = shape_fns(*(shape[k] for k in ("B", "H", "N", "M", "d", "n")), softmax_max_tokens)

    def batched(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(inner):
                fn()
        return run

    with torch.no_grad():
        times = _interleaved({k: batched(f) for k, f in fns.items()}, warmup, repeats, clock=time.process_time)
    row: dict[str, Any] = dict(shape)
    for name, ts in times.items():
        seconds = statistics.median(ts) / inner
        row[f"{name}_ms"] = seconds * 1e3
        row[f"{name}_gmacs_per_s"] = macs[name] / seconds / 1e9
    row["core_over_products"] = row["core_ms"] / row["products_ms"]
    row["core_over_flash"] = row["core_ms"] / row["flash_ms"]
    row["core_over_flash_biases"] = row["core_ms"] / row["flash_biases_ms"]
    if "softmax_ms" in row:
        row["speed_ratio_vs_softmax"] = row["softmax_ms"] / row["core_ms"]
        row["mac_ratio_vs_softmax"] = macs["softmax"] / macs["core"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, help="registered agent models (timm names)")
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="SIZE:BATCH entries (square inputs)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inner", type=int, default=5, help="calls per timed round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--softmax-max-tokens", type=int, default=12544, help="skip the softmax reference above this N")
    parser.add_argument("--output", default=str(RESULTS / "core_rates.json"))
    args = parser.parse_args(argv)
    import timm

    import agentlit  # noqa: F401  (registers the agent models)

    unknown = [m for m in args.models if m not in timm.list_models("agent_*")]
    if unknown:
        parser.error(f"--models {' '.join(unknown)}: not a registered agent model; valid: {', '.join(timm.list_models('agent_*'))}")
    torch.set_num_threads(args.threads)
    sizes = []
    for entry in args.sizes:
        size, _, batch = entry.partition(":")
        if not (size.isdigit() and batch.isdigit()):
            parser.error(f"--sizes entry {entry!r} is not SIZE:BATCH, for example 224:8")
        sizes.append((int(size), int(batch)))

    rows = []
    load_before = os.getloadavg()[0]
    for model_name in args.models:
        for size, batch in sizes:
            for shape in layer_shapes(model_name, size, batch):
                row = dict(model=model_name, size=size,
                           **measure(shape, args.repeats, args.warmup, args.inner, args.softmax_max_tokens))
                rows.append(row)
                versus = (f" | vs softmax {row['speed_ratio_vs_softmax']:.2f}x (MAC ratio {row['mac_ratio_vs_softmax']:.2f}x)"
                          if "softmax_ms" in row else "")
                softmax = f", softmax {row['softmax_gmacs_per_s']:.1f}" if "softmax_ms" in row else ""
                print(f"{model_name} {size}² {row['layers']:2d}x (B {row['B']}, H {row['H']}, N {row['N']}, M {row['M']}, "
                      f"d {row['d']}, n {row['n']}): GMAC/s core {row['core_gmacs_per_s']:.1f}, products "
                      f"{row['products_gmacs_per_s']:.1f}, flash {row['flash_gmacs_per_s']:.1f} (with biases "
                      f"{row['flash_biases_gmacs_per_s']:.1f}){softmax} | core / products {row['core_over_products']:.2f}x, "
                      f"/ flash {row['core_over_flash']:.2f}x (with biases {row['core_over_flash_biases']:.2f}x)"
                      + versus, flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(settings=dict(threads=args.threads, repeats=args.repeats, inner=args.inner, warmup=args.warmup,
                                torch=torch.__version__, machine=platform.processor() or platform.machine(),
                                cpu_count=mp.cpu_count(), clock="process_time",
                                load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2)),
                  results=rows)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
