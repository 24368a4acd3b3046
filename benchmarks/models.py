"""CPU throughput and peak memory of the paper's speed pairs, agent model vs baseline, in one run.

    python benchmarks/models.py                                   # the three pairs below, 224²
    python benchmarks/models.py --batch-size 8 --repeats 3        # a quick look
    python benchmarks/models.py --models agent_pvt_tiny:pvt_v1_tiny --output benchmarks/results/pvt_t.json

Pairs (docs/reference.md §2 "Speed"): Agent-PVT-S vs PVT-L (paper: 2.1× faster on a desktop CPU),
Agent-Swin-S vs Swin-B (1.7×), and Agent-DeiT-T vs DeiT-T. For each model: inference images/s
(eval, no grad), training images/s (forward + backward + SGD step) and the peak tensor memory of
one inference / one training step beyond the weights (:func:`agentlit.utils.memory.peak_memory`).
Each pair runs in its own spawned process, its two models timed in alternating rounds (so a change
in the machine's load hits both alike); timings are the median of ``--repeats`` after ``--warmup``.
Writes JSON and a PNG bar chart (same stem) and prints agent/baseline ratios.

``--variants eager compiled bf16`` adds, per model, inference rows for ``torch.compile`` (default
mode, timed after its compile) and bf16 autocast (``torch.autocast(device, torch.bfloat16)``, the
weights stay fp32: what ``trainer.precision: bf16-mixed`` does); their rows are ``name@compiled`` and
``name@bf16``, with ratios to the same model's eager row and agent-vs-baseline ratios per variant.
``--device cuda`` measures on a GPU (the GPU check runs the pairs at batch 64 in bf16).

On a machine whose cores other processes are using, pass ``--threads 1``: intra-op threads that
compete for busy cores slow small ops by an order of magnitude and swamp the comparison.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PAIRS = [
    ("agent_pvt_small", "pvt_v1_large"),
    ("agent_swin_small", "swin_base_patch4_window7_224"),
    ("agent_deit_tiny", "deit_tiny_patch16_224"),
]
PAPER_CPU_SPEEDUP = {("agent_pvt_small", "pvt_v1_large"): 2.1, ("agent_swin_small", "swin_base_patch4_window7_224"): 1.7}


def _interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds (by ``clock``) per call of each fn, the fns taking turns round by round so that a change
    in the machine's load hits every model of a pair alike; every other round runs them in reverse order,
    so none is always the one that follows another (what a call leaves behind, such as memory to page
    in again, then falls on each alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(repeats):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t = clock()
            fn()
            times[name].append(clock() - t)
    return times


def sgd_step(model: torch.nn.Module, x: torch.Tensor, loss_of: Callable[[object], torch.Tensor]) -> Callable[[], None]:
    """One training step of ``model`` on ``x`` as a call: forward, ``loss_of(output)``, backward, an SGD
    step (the benchmarks' training step; the model is put in training mode)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        opt.step()

    return step


VARIANTS = ("eager", "compiled", "bf16")


def _variant_fn(m: torch.nn.Module, x: torch.Tensor, variant: str) -> Callable[[], object]:
    """One inference call of ``m`` on ``x`` in the given variant (eager, compiled, bf16 autocast)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    if variant == "compiled":
        cm = torch.compile(m)  # shares m's weights

        def fn() -> object:
            out = cm(x)
            sync()
            return out
    elif variant == "bf16":
        def fn() -> object:
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = m(x)
            sync()
            return out
    else:
        def fn() -> object:
            out = m(x)
            sync()
            return out
    return fn


def measure_group(names: list[str], batch_size: int, img_size: int, warmup: int, repeats: int,
                  threads: int | None, train: bool, variants: tuple[str, ...] = ("eager",),
                  device: str = "cpu") -> dict[str, dict]:
    """Runs in a fresh process: throughput (images/s) and peak tensor memory (MiB) of each model."""
    import timm

    import agentlit  # noqa: F401  (registers the agent models)
    from agentlit.utils.memory import peak_memory

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    models = {name: timm.create_model(name, pretrained=False).to(device) for name in names}
    results = {
        f"{name}@{v}" if v != "eager" else name: dict(
            model=name, variant=v, params_m=sum(p.numel() for p in m.parameters()) / 1e6, batch_size=batch_size,
            img_size=img_size, device=device)
        for name, m in models.items() for v in variants
    }

    with torch.inference_mode() if "compiled" not in variants else torch.no_grad():
        for m in models.values():
            m.eval()
        for v in variants:  # each variant's models in alternating rounds
            fns = {(f"{n}@{v}" if v != "eager" else n): _variant_fn(m, x, v) for n, m in models.items()}
            times = _interleaved(fns, warmup + (1 if v == "compiled" else 0), repeats)  # + the compile call
            for key, fn in fns.items():
                results[key]["infer_images_per_s"] = batch_size / statistics.median(times[key])
                results[key]["infer_peak_mb"] = peak_memory(fn, device) / 2**20

    if train:
        y = torch.randint(0, 1000, (batch_size,), device=device)
        steps = {name: sgd_step(m, x, lambda out: torch.nn.functional.cross_entropy(out, y)) for name, m in models.items()}
        times = _interleaved(steps, max(1, warmup), repeats)
        for name, step in steps.items():
            results[name]["train_images_per_s"] = batch_size / statistics.median(times[name])
            results[name]["train_peak_mb"] = peak_memory(step, device) / 2**20  # activations, gradients, SGD step
    return results


def _run_isolated(kwargs: dict) -> dict[str, dict]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_group, kwds=kwargs)


def parse_models(entries: list[str] | None) -> list[tuple[str, str | None]]:
    """``a:b`` entries are (agent, baseline) pairs; a bare name is measured alone."""
    if not entries:
        return list(PAIRS)
    return [tuple(e.split(":", 1)) if ":" in e else (e, None) for e in entries]  # type: ignore[misc]


def plot(results: dict[str, dict], pairs: list[tuple[str, str | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("infer_images_per_s", "train_images_per_s") if any(k in r for r in results.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        labels, values, colors = [], [], []
        for agent, base in pairs:
            for name, color in ((agent, "tab:orange"), (base, "tab:blue")):
                if name:
                    labels.append(name.replace("_patch16_224", "").replace("_patch4_window7_224", ""))
                    values.append(results[name].get(key, 0.0))
                    colors.append(color)
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("images / s")
        ax.set_title(("inference" if key.startswith("infer") else "training") + " throughput (CPU)")
    fig.suptitle("agent model (orange) vs baseline (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None,
                        help="agent:baseline pairs or single model names (default: the paper's speed pairs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10, help="timed iterations per model and mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=VARIANTS,
                        help="inference variants per model: eager, compiled (torch.compile), bf16 (autocast)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--output", default=str(RESULTS / "models.json"), help="JSON path; the PNG gets the same stem")
    args = parser.parse_args(argv)

    pairs = parse_models(args.models)
    names = list(dict.fromkeys(n for pair in pairs for n in pair if n))
    import timm

    import agentlit  # noqa: F401

    unknown = [n for n in names if not timm.is_model(n)]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; e.g. {', '.join(a + ':' + b for a, b in PAIRS)}")

    results: dict[str, dict] = {}
    for group in pairs:  # one process per pair, its models measured in alternating rounds
        names_ = [n for n in group if n and n not in results]
        if not names_:
            continue
        results.update(_run_isolated(dict(names=names_, batch_size=args.batch_size, img_size=args.img_size,
                                          warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                                          train=not args.no_train, variants=tuple(args.variants),
                                          device=args.device)))
    for name in results:
        r = results[name]
        line = f"{name:41s} infer {r['infer_images_per_s']:8.2f} img/s  peak +{r['infer_peak_mb']:7.0f} MiB"
        if "train_images_per_s" in r:
            line += f" | train {r['train_images_per_s']:7.2f} img/s  peak +{r['train_peak_mb']:7.0f} MiB"
        print(line)

    ratios = []
    print("\nagent vs baseline (measured in this run):")
    for agent, base in pairs:
        if not base:
            continue
        a, b = results[agent], results[base]
        row = dict(agent=agent, baseline=base, infer_speedup=a["infer_images_per_s"] / b["infer_images_per_s"],
                   infer_memory_ratio=a["infer_peak_mb"] / max(b["infer_peak_mb"], 1e-9),
                   paper_cpu_speedup=PAPER_CPU_SPEEDUP.get((agent, base)))
        if "train_images_per_s" in a and "train_images_per_s" in b:
            row["train_speedup"] = a["train_images_per_s"] / b["train_images_per_s"]
            row["train_memory_ratio"] = a["train_peak_mb"] / max(b["train_peak_mb"], 1e-9)
        for v in args.variants:
            if v != "eager":
                av, bv = results[f"{agent}@{v}"], results[f"{base}@{v}"]
                row[f"infer_speedup_{v}"] = av["infer_images_per_s"] / bv["infer_images_per_s"]
                row[f"{v}_vs_eager_agent"] = av["infer_images_per_s"] / a["infer_images_per_s"]
                row[f"{v}_vs_eager_baseline"] = bv["infer_images_per_s"] / b["infer_images_per_s"]
                print(f"  {agent} vs {base} [{v}]: inference {row[f'infer_speedup_{v}']:.2f}x faster; {v} vs eager: "
                      f"agent {row[f'{v}_vs_eager_agent']:.2f}x, baseline {row[f'{v}_vs_eager_baseline']:.2f}x")
        ratios.append(row)
        paper = f" (paper: {row['paper_cpu_speedup']}x)" if row["paper_cpu_speedup"] else ""
        train = f", training {row['train_speedup']:.2f}x" if "train_speedup" in row else ""
        print(f"  {agent} vs {base}: inference {row['infer_speedup']:.2f}x faster{paper}{train}; "
              f"peak memory {row['infer_memory_ratio']:.2f}x (inference)"
              + (f", {row['train_memory_ratio']:.2f}x (training)" if "train_memory_ratio" in row else ""))

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(
        settings=dict(batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats, warmup=args.warmup,
                      threads=args.threads or torch.get_num_threads(), torch=torch.__version__,
                      variants=args.variants, device=args.device,
                      machine=platform.processor() or platform.machine(), cpu_count=mp.cpu_count()),
        results=results,
        ratios=ratios,
    )
    out.write_text(json.dumps(report, indent=2))
    plot(results, pairs, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
