"""AgentSD vs ToMe vs plain Stable Diffusion: time per image and peak memory, one pipeline, one run.

    python benchmarks/agentsd.py                                   # 512² and 1024², 50 steps (GPU setting)
    python benchmarks/agentsd.py --sizes 512 1024 --steps 1 --repeats 1 --warmup 0   # quick CPU run

The pipeline has the Stable Diffusion v1.5 architecture (UNet 860M, VAE, CLIP ViT-L/14 text encoder)
built from its configs with RANDOM weights — SD 1.5 weights cannot be downloaded here, and time
and memory do not depend on weight values. Three settings on the same pipeline, interleaved:

  baseline  unpatched (diffusers' own SDPA attention)
  tome      ToMe only: ratio 0.4, sx=sy=2 at every step (= AgentSD's late phase)
  agentsd   the paper's schedule: steps < agent_steps agent attention (sx=sy=4, agent_ratio 0.95,
            N/16 agents) on 40%-merged tokens, later steps ToMe only

Per image = one pipeline call for ``--batch`` prompts (classifier-free guidance doubles the UNet
batch) divided by the batch; VAE decoding is excluded unless ``--decode`` (the patch does not touch
it). When fewer than 50 steps are run, the 50-step time per image is also *estimated* from the
measured per-step times: baseline 50·t_base, ToMe 50·t_tome, AgentSD agent_steps·t_agent + rest·t_tome
(valid when every measured AgentSD step was an agent step, i.e. --steps <= --agent-steps).
Peak memory: CUDA allocator peak above the weights; on the CPU, the process's resident memory
sampled every 2 ms during the call, peak minus the level before it (large tensors are mmap'ed and
returned to the OS when freed, so this follows the activations; no per-op cost on the timing).
Writes ``benchmarks/results/agentsd_<device>.json`` and ``.png``.

``--unet`` times ONE UNet call per setting instead (one denoising step, no text encoder/VAE), on the
SD 1.5 (``--arch sd15``) or SDXL (``--arch sdxl``) UNet architecture, with more settings:

  baseline  unpatched
  tomesd    the real tomesd package (pip install tomesd) at ``--ratio``, its defaults otherwise
  tome      agentlit's ToMe phase (ratio, sx=sy=2, no agents)
  agentsd   agentlit's agent phase, ``apply_patch(unet, ratio)`` with default arguments
  shared    the agent phase with ``share_matching=True``
  ceiling   the self-attention of the patched level removed entirely (what no merging can beat)

and opt-in settings that go past the default patch (they change outputs more; off by default):

  deeper    the agent phase on the next level as well (``max_downsample`` = 2 x the default level)
  mlp       the agent phase with ``merge_mlp=True`` (the MLP on merged tokens, tomesd's option)
  tomesd_deeper / tomesd_mlp   the tomesd package with the same options

and the 50-step schedule estimate: baseline/tomesd 50 x their step, agentsd 20 agent steps + 30
ToMe steps. Writes ``benchmarks/results/agentsd_unet_<arch>_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from agentlit.diffusion import apply_patch, build_sd15_pipeline, remove_patch
from agentlit.profiling import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_STEPS = 50
SETTINGS = ("baseline", "tome", "agentsd")


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Make glibc serve every allocation >= nbytes with mmap and unmap it on free (no dynamic
    threshold), so resident memory follows live tensors instead of the allocator's caches."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class RSSPeak:
    """Peak resident set size above the level at entry, sampled in a background thread (Linux)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak = interval, 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self._base)
            time.sleep(self.interval)

    def __enter__(self) -> "RSSPeak":
        self._base = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def configure(pipe, setting: str, args) -> None:
    remove_patch(pipe)
    if setting == "tome":
        apply_patch(pipe, ratio=args.ratio, agent_steps=0)  # late settings (sx=sy=2, no agents) from step 0
    elif setting == "agentsd":
        apply_patch(pipe, ratio=args.ratio, agent_steps=args.agent_steps, attn_precision=args.attn_precision)


def run_once(pipe, size: int, args, device: torch.device, track_cpu_memory: bool) -> tuple[float, int | None]:
    """Seconds for one pipeline call and its peak extra memory in bytes."""
    kw = dict(prompt=["a photo of a golden retriever"] * args.batch, num_inference_steps=args.steps,
              guidance_scale=args.guidance, height=size, width=size,
              generator=torch.Generator().manual_seed(0), output_type="pil" if args.decode else "latent")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        pipe(**kw)
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - base
    if track_cpu_memory and Path("/proc/self/statm").exists():
        with RSSPeak() as rss:
            t0 = time.perf_counter()
            pipe(**kw)
            seconds = time.perf_counter() - t0
        return seconds, rss.peak
    t0 = time.perf_counter()
    pipe(**kw)
    return time.perf_counter() - t0, None


UNET_SETTINGS = ("baseline", "tomesd", "tome", "agentsd", "shared", "ceiling", "deeper", "mlp", "tomesd_deeper",
                 "tomesd_mlp")
DEFAULT_UNET_SETTINGS = UNET_SETTINGS[:6]


class _NoSelfAttention:
    """attn1 processor of the ceiling setting: the layer adds nothing (its cost is gone)."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def first_attention_down_block(unet) -> int | None:
    """Index of the first down block with transformer blocks (its level = 2 ** index), or None."""
    return next((i for i, b in enumerate(unet.down_blocks) if getattr(b, "attentions", None)), None)


def finest_attention_blocks(unet) -> list:
    """Transformer blocks at the finest resolution that has any (what apply_patch patches by default)."""
    i = first_attention_down_block(unet)
    if i is None:
        return []
    parts = [unet.down_blocks[i], unet.up_blocks[len(unet.up_blocks) - 1 - i]]
    return [m for part in parts for m in part.modules() if type(m).__name__ == "BasicTransformerBlock"]


def configure_unet(unet, setting: str, args, saved: dict) -> None:
    """Put ``unet`` into ``setting`` (undoing the previous one)."""
    remove_patch(unet)
    if saved:
        for block, proc in saved.items():
            block.attn1.set_processor(proc)
        saved.clear()
    if getattr(unet, "_tomesd_info", None) is not None or any(
            type(m).__name__.startswith("ToMe") for m in unet.modules()):
        import tomesd

        tomesd.remove_patch(unet)
    level = 2 ** (first_attention_down_block(unet) or 0)  # SD 1.x: 1, SDXL: 2
    if setting.startswith("tomesd"):
        import tomesd

        opts = {"tomesd_deeper": {"max_downsample": 2 * level}, "tomesd_mlp": {"merge_mlp": True}}.get(setting, {})
        tomesd.apply_patch(unet, ratio=args.ratio, **opts)
    elif setting == "tome":
        apply_patch(unet, args.ratio, agent_steps=0)
    elif setting == "agentsd":
        apply_patch(unet, args.ratio)
    elif setting == "shared":
        apply_patch(unet, args.ratio, share_matching=True)
    elif setting == "deeper":
        apply_patch(unet, args.ratio, max_downsample=2 * level)
    elif setting == "mlp":
        apply_patch(unet, args.ratio, merge_mlp=True)
    elif setting == "ceiling":
        for block in finest_attention_blocks(unet):
            saved[block] = block.attn1.processor
            block.attn1.set_processor(_NoSelfAttention())


def unet_inputs(unet, size: int, batch: int, device, dtype) -> tuple[tuple, dict]:
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    sample = torch.randn(batch, cfg.in_channels, lat, lat, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    kw = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text + (size, crop, target) ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=dtype, device=device),
        }
    return (sample, torch.tensor(999, device=device), ctx), kw


def unet_main(args) -> None:
    from diffusers import UNet2DConditionModel

    from agentlit.diffusion import sd15_unet_config, sdxl_unet_config, tiny_sdxl_unet_config, tiny_unet_config

    device = torch.device(args.device)
    if device.type == "cpu" and not args.no_cpu_memory:
        fixed_mmap_threshold()
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    configs = {"sd15": sd15_unet_config, "sdxl": sdxl_unet_config, "tiny": tiny_unet_config,
               "tiny-sdxl": tiny_sdxl_unet_config}
    settings = [s for s in args.unet_settings if s != "baseline"]
    try:
        import tomesd  # noqa: F401
    except ImportError:
        skipped = [st for st in settings if st.startswith("tomesd")]
        if skipped:
            print(f"tomesd not installed (pip install -e '.[bench]'): skipping {', '.join(skipped)}", flush=True)
            settings = [st for st in settings if st not in skipped]
    settings.insert(0, "baseline")
    output = args.output or RESULTS / f"agentsd_unet_{args.arch}_{device.type}.json"
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**configs[args.arch]()).eval().to(device, dtype)
    torch.random.set_rng_state(gen_state)
    print(f"{args.arch} UNet architecture, RANDOM weights ({sum(q.numel() for q in unet.parameters()) / 1e6:.0f}M "
          f"params), {dtype}, {device}, UNet batch {args.batch}, ratio {args.ratio}", flush=True)
    saved: dict = {}
    rows, summary = [], []
    for size in args.sizes:
        (sample, t, ctx), kw = unet_inputs(unet, size, args.batch, device, dtype)
        times: dict[str, list[float]] = {s: [] for s in settings}
        cpus: dict[str, list[float]] = {s: [] for s in settings}  # process CPU seconds: robust to a shared machine
        mems: dict[str, list[int]] = {s: [] for s in settings}
        for rep_i in range(args.warmup + args.repeats):
            for setting in settings:  # interleaved: load drift hits every setting alike
                configure_unet(unet, setting, args, saved)
                torch.manual_seed(rep_i)
                c0 = time.process_time()
                with torch.no_grad():
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                        t0 = time.perf_counter()
                        unet(sample, t, ctx, **kw)
                        torch.cuda.synchronize(device)
                        sec, mem = time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - base
                    elif not args.no_cpu_memory and Path("/proc/self/statm").exists():
                        with RSSPeak() as rss:
                            t0 = time.perf_counter()
                            unet(sample, t, ctx, **kw)
                            sec = time.perf_counter() - t0
                        mem = rss.peak
                    else:
                        t0 = time.perf_counter()
                        unet(sample, t, ctx, **kw)
                        sec, mem = time.perf_counter() - t0, None
                cpu = time.process_time() - c0
                if rep_i >= args.warmup:
                    times[setting].append(sec)
                    cpus[setting].append(cpu)
                    if mem is not None:
                        mems[setting].append(mem)
                print(f"{size}px {setting:8s} {'warm-up' if rep_i < args.warmup else f'run {rep_i - args.warmup}'}: "
                      f"{sec:8.3f} s/step, {cpu:8.2f} CPU s" + (f", peak {mem / 2**20:8.0f} MiB" if mem is not None else ""), flush=True)
        configure_unet(unet, "baseline", args, saved)
        med = {st: statistics.median(v) for st, v in times.items()}
        for st in settings:
            rows.append({"size": size, "setting": st, "time_per_step_s": med[st], "times_s": times[st],
                         "speedup": med["baseline"] / med[st],
                         # the fastest repeat: interference on a shared machine only ever adds time
                         "best_speedup": min(times["baseline"]) / min(times[st]), "cpu_s": cpus[st],
                         "cpu_speedup": statistics.median(cpus["baseline"]) / statistics.median(cpus[st]),
                         "peak_mem_mib": max(mems[st]) / 2**20 if mems[st] else None})
        s = {"size": size, **{f"speedup_{st}": med["baseline"] / med[st] for st in settings}}
        for ours, theirs in (("agentsd", "tomesd"), ("ceiling", "tomesd"), ("deeper", "tomesd_deeper"), ("mlp", "tomesd_mlp")):
            if ours in med and theirs in med:
                s[f"{ours}_vs_{theirs}"] = med[theirs] / med[ours]
                s[f"best_{ours}_vs_{theirs}"] = min(times[theirs]) / min(times[ours])
        if "tome" in med and "agentsd" in med:
            agent_n = 20
            est = {"baseline": PAPER_STEPS * med["baseline"],
                   "agentsd": agent_n * med["agentsd"] + (PAPER_STEPS - agent_n) * med["tome"]}
            if "tomesd" in med:
                est["tomesd"] = PAPER_STEPS * med["tomesd"]
                s["estimated_50_steps_agentsd_vs_tomesd"] = est["tomesd"] / est["agentsd"]
            s["estimated_50_steps_s"] = est
            s["estimated_50_steps_speedup_agentsd"] = est["baseline"] / est["agentsd"]
        summary.append(s)
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, float)), flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "agentsd_unet", "arch": args.arch, "model": "RANDOM weights: timing/memory only",
              "machine": machine_info(device), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "output"},
              "rows": rows, "summary": summary}
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sizes (px, square)")
    p.add_argument("--steps", type=int, default=PAPER_STEPS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="prompts per pipeline call")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--agent-steps", type=int, default=20)
    p.add_argument("--attn-precision", default=None, choices=[None, "fp32"])
    p.add_argument("--decode", action="store_true", help="include VAE decoding in the time")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--no-cpu-memory", action="store_true", help="skip the CPU resident-memory sampling")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--unet", action="store_true", help="time one UNet call per setting (see above)")
    p.add_argument("--arch", default="sd15", choices=["sd15", "sdxl", "tiny", "tiny-sdxl"], help="UNet for --unet")
    p.add_argument("--unet-settings", nargs="+", default=list(DEFAULT_UNET_SETTINGS), choices=UNET_SETTINGS)
    args = p.parse_args()
    if args.unet:
        return unet_main(args)
    if "baseline" not in args.settings:
        args.settings.insert(0, "baseline")

    device = torch.device(args.device)
    if device.type == "cpu" and not args.no_cpu_memory:
        fixed_mmap_threshold()
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    output = args.output or RESULTS / f"agentsd_{device.type}.json"
    t0 = time.perf_counter()
    pipe = build_sd15_pipeline(seed=0, torch_dtype=dtype).to(device)
    print(f"SD 1.5 architecture, RANDOM weights ({sum(q.numel() for q in pipe.unet.parameters()) / 1e6:.0f}M-param "
          f"UNet), {dtype}, {device}; built in {time.perf_counter() - t0:.0f}s", flush=True)

    rows = []
    for size in args.sizes:
        times: dict[str, list[float]] = {s: [] for s in args.settings}
        mems: dict[str, list[int]] = {s: [] for s in args.settings}
        for rep in range(args.warmup + args.repeats):
            for setting in args.settings:  # interleaved: load drift hits every setting alike
                configure(pipe, setting, args)
                with torch.no_grad():
                    sec, mem = run_once(pipe, size, args, device, track_cpu_memory=not args.no_cpu_memory)
                if rep >= args.warmup:
                    times[setting].append(sec / args.batch)
                    if mem is not None:
                        mems[setting].append(mem)
                print(f"{size}px {setting:8s} {'warm-up' if rep < args.warmup else f'run {rep - args.warmup}'}: "
                      f"{sec / args.batch:8.2f} s/img" + (f", peak {mem / 2**20:8.0f} MiB" if mem is not None else ""),
                      flush=True)
        remove_patch(pipe)
        for setting in args.settings:
            t = statistics.median(times[setting])
            rows.append({"size": size, "latent": size // 8, "tokens_full_res": (size // 8) ** 2, "setting": setting,
                         "time_per_image_s": t, "time_per_step_s": t / args.steps, "times_s": times[setting],
                         "peak_mem_mib": max(mems[setting]) / 2**20 if mems[setting] else None})

    summary = []
    for size in args.sizes:
        by = {r["setting"]: r for r in rows if r["size"] == size}
        base = by["baseline"]
        s = {"size": size}
        for setting, r in by.items():
            s[f"{setting}_s_per_img"] = r["time_per_image_s"]
            s[f"speedup_{setting}"] = base["time_per_image_s"] / r["time_per_image_s"]
            if r["peak_mem_mib"] and base["peak_mem_mib"]:
                s[f"mem_ratio_{setting}"] = r["peak_mem_mib"] / base["peak_mem_mib"]
        if args.steps < PAPER_STEPS and args.steps <= args.agent_steps and {"tome", "agentsd"} <= set(by):
            agent_n = min(args.agent_steps, PAPER_STEPS)
            t_base, t_tome, t_agent = (by[k]["time_per_step_s"] for k in ("baseline", "tome", "agentsd"))
            est = {"baseline": PAPER_STEPS * t_base, "tome": PAPER_STEPS * t_tome,
                   "agentsd": agent_n * t_agent + (PAPER_STEPS - agent_n) * t_tome}
            s["estimated_50_steps_s_per_img"] = est
            s["estimated_50_steps_speedup_agentsd"] = est["baseline"] / est["agentsd"]
            s["estimated_50_steps_speedup_tome"] = est["baseline"] / est["tome"]
        summary.append(s)

    estimated = any("estimated_50_steps_speedup_agentsd" in s for s in summary)
    print(f"\n{'size':>5} | " + " | ".join(f"{st:>9} s/img" for st in args.settings)
          + " | speed-up tome | speed-up agentsd" + (" | est. 50-step agentsd" if estimated else ""))
    for s in summary:
        line = f"{s['size']:5d} | " + " | ".join(f"{s[f'{st}_s_per_img']:15.2f}" for st in args.settings)
        line += f" | {s.get('speedup_tome', float('nan')):13.2f} | {s.get('speedup_agentsd', float('nan')):16.2f}"
        if "estimated_50_steps_speedup_agentsd" in s:
            line += f" | {s['estimated_50_steps_speedup_agentsd']:20.2f}"
        print(line)

    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "agentsd",
        "model": "Stable Diffusion v1.5 architecture (agentlit.diffusion.build_sd15_pipeline) with RANDOM weights: "
                 "timing/memory only, no image quality",
        "machine": machine_info(device), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "time_includes": "text encoding + denoising loop"
                         + (" + VAE decoding" if args.decode else " (no VAE decoding)"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "output"},
        "rows": rows, "summary": summary,
    }
    output.write_text(json.dumps(report, indent=2))
    plot(rows, summary, args, output.with_suffix(".png"), f"{device.type}, {report['dtype']}")
    print(f"\nwrote {output} and {output.with_suffix('.png')}")


def plot(rows: list[dict], summary: list[dict], args, path: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, settings = args.sizes, args.settings
    has_mem = all(r["peak_mem_mib"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4), squeeze=False)
    width = 0.8 / len(settings)
    for j, setting in enumerate(settings):
        rs = [next(r for r in rows if r["size"] == sz and r["setting"] == setting) for sz in sizes]
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(sizes))]
        bars = axes[0, 0].bar(xs, [r["time_per_image_s"] for r in rs], width, label=setting)
        for b, s in zip(bars, summary):
            axes[0, 0].annotate(f"{s[f'speedup_{setting}']:.2f}×", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=8)
        if has_mem:
            axes[0, 1].bar(xs, [r["peak_mem_mib"] for r in rs], width, label=setting)
    titles = [f"time per image, {args.steps} steps ({where})", "peak memory (MiB)"]
    for k, ax in enumerate(axes[0]):
        ax.set_xticks(range(len(sizes)), [f"{s}²" for s in sizes])
        ax.set_xlabel("image size (px)"), ax.set_title(titles[k], fontsize=10), ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("seconds")
    fig.suptitle("SD 1.5 architecture, random weights: baseline vs ToMe vs AgentSD", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
