"""Detection backbones at COCO resolution: backbone + FPN forward time, agent model vs baseline, in one run.

    python benchmarks/detection.py                              # 800x1333 (padded to 800x1344), both pairs
    python benchmarks/detection.py --repeats 2 --warmup 1 --threads 1   # a quick look on a shared machine

Pairs: Agent-PVT-S vs PVT-S and Agent-Swin-T vs Swin-T, each as the detection configs build it
(dense agent grids 12-16-28-28 / 9-12-14-7, FPN 256 over stages 1-4 + a pooled level, a LayerNorm per
Swin output), inference (eval, no grad). The two models of a pair are timed in alternating rounds,
so a change in the machine's load hits both alike; times are medians of ``--repeats`` after
``--warmup``. Then the peak memory of one more inference call of each (live tensor bytes on the CPU,
the allocator's peak on CUDA), with what the model keeps between calls counted. Prints agent/baseline
ratios and writes JSON to ``benchmarks/results/detection.json``.

``--keep-biases`` lets every agent layer keep its position biases between calls (by default only
layers whose biases are small do: ``AgentPositionBias.bias_cache_elements``), the speed-for-memory
trade measured in docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
from pathlib import Path

import torch

from models import _interleaved  # the alternating-rounds timer of the model benchmark

from agentlit.utils.memory import peak_memory

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = (800, 1344)  # 1333 padded to a multiple of 32, as the detector batches a 800x1333 image
DENSE_PVT = dict(img_size=SIZE, agent_num=[[12, 12], [16, 16], [28, 28], [28, 28]])
DENSE_SWIN = dict(img_size=SIZE, strict_img_size=False, dynamic_img_size=True, agent_num=[[9, 9], [12, 12], [14, 14], [7, 7]])
PAIRS = {
    "Agent-PVT-S vs PVT-S": (("agent_pvt_small", DENSE_PVT, False), ("pvt_v1_small", dict(img_size=SIZE), False)),
    "Agent-Swin-T vs Swin-T": (("agent_swin_tiny", DENSE_SWIN, True),
                               ("swin_tiny_patch4_window7_224", dict(img_size=SIZE, strict_img_size=False, dynamic_img_size=True), True)),
}


def build(name: str, kwargs: dict, out_norm: bool) -> torch.nn.Module:
    """Backbone + FPN (+ pooled P6) as ``DetectionModule`` builds it for the R-CNNs."""
    import agentlit  # noqa: F401  (registers the agent models)
    from agentlit.models import build_backbone
    from agentlit.models.detection import DetectionBackbone

    return DetectionBackbone(build_backbone(name, (0, 1, 2, 3), None, False, **kwargs), 256, "pool", out_norm).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS), help="which pairs to run")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per model")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--keep-biases", action="store_true",
                        help="every agent layer keeps its position biases between calls (default: small ones only)")
    parser.add_argument("--output", default=str(RESULTS / "detection.json"), help="JSON path")
    args = parser.parse_args(argv)
    if args.keep_biases:
        from agentlit.core import AgentPositionBias

        AgentPositionBias.bias_cache_elements = 1 << 62
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, *SIZE, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    rows = []
    for pair in args.pairs:
        models = {name: build(name, kw, norm).to(device) for name, kw, norm in PAIRS[pair]}

        def call(m: torch.nn.Module) -> None:
            m(x)
            sync()

        with torch.inference_mode():
            times = _interleaved({n: (lambda m=m: call(m)) for n, m in models.items()}, args.warmup, args.repeats)
            peak = {n: peak_memory(lambda m=m: call(m), device) / 2**20 for n, m in models.items()}
        (agent, base) = list(models)
        row = dict(pair=pair, agent=agent, baseline=base, agent_peak_mib=peak[agent], baseline_peak_mib=peak[base],
                   agent_ms=1e3 * statistics.median(times[agent]), baseline_ms=1e3 * statistics.median(times[base]),
                   agent_params_m=sum(p.numel() for p in models[agent].parameters()) / 1e6,
                   baseline_params_m=sum(p.numel() for p in models[base].parameters()) / 1e6)
        row["speedup"] = row["baseline_ms"] / row["agent_ms"]
        rows.append(row)
        print(f"{pair}: {agent} {row['agent_ms']:.0f} ms, {base} {row['baseline_ms']:.0f} ms per forward "
              f"(batch {args.batch_size}, {SIZE[0]}x{SIZE[1]}): agent {row['speedup']:.2f}x faster; "
              f"peak memory {peak[agent]:.0f} vs {peak[base]:.0f} MiB")
        del models

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        settings=dict(batch_size=args.batch_size, size=list(SIZE), repeats=args.repeats, warmup=args.warmup,
                      keep_biases=args.keep_biases,
                      threads=args.threads or torch.get_num_threads(), device=str(device), torch=torch.__version__,
                      machine=platform.processor() or platform.machine(), cpu_count=mp.cpu_count(),
                      load_avg=[round(v, 2) for v in os.getloadavg()]),
        results=rows,
    )
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
