"""``agentlit profile``: parameters, MACs, throughput and peak memory of a configured task module.

Built from the same YAML as ``agentlit fit``; inputs are random tensors with the data's shapes
(batch size and resolution from the datamodule, or ``--batch_size`` / ``--img_size``), so no
dataset has to be present. What is measured:

- MACs: one forward of the module (its ``forward``: the classifier, or the segmenter's evaluation
  inference) per item, with :func:`agentlit.utils.count_macs` (attention runs on the math SDPA
  backend, so agent and softmax attention are counted whatever backend serves them at run time),
  and a per-module breakdown in which every MAC is attributed once.
- Inference: ``module(x)`` in eval mode without gradients; items/s = batch / median step time.
- Training: ``module.training_step(batch)`` (the task's own loss) + backward + optimiser step
  (+ gradient clipping and the precision plugin as the trainer is configured); hooks such as EMA
  updates, data loading and logging are not included.
- Peak memory of one step: the CUDA allocator's peak above the level before the step, or on the
  CPU the peak of live tensor bytes (:func:`agentlit.utils.memory.peak_memory`) and the process's
  resident-memory growth sampled every millisecond (allocator caches make it a lower bound).
- Generation (a module with a diffusers ``pipe`` and ``generate``): seconds per image for full
  pipeline calls (text encoding, denoising loop, VAE decoding) and per denoising step (UNet calls,
  timed by hooks), MACs per image and per step. A task may define
  ``example_input(batch_size, img_size) -> (forward_args: tuple, train_batch)`` to be profiled
  with its own inputs.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import platform
import resource
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .utils.flops import count_macs
from .utils.memory import peak_memory

__all__ = ["machine_info", "mac_breakdown", "format_report", "profile_module"]

MODES = ("inference", "train", "both")
_MIB = 2**20


# ----------------------------------------------------------------------------- machine
def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a measurement ran: CPU model, cores, torch threads/version, device (and GPU), load."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "device": str(device),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):  # other processes on the machine change CPU timings; say so
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


# ----------------------------------------------------------------------------- timing / memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


class _RSSPeak:
    """Peak growth of the process's resident memory while inside (sampled by a thread)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self.base = interval, 0, 0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._stop = threading.Event()
        self.available = Path("/proc/self/statm").exists()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "_RSSPeak":
        if self.available:
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def increase(self) -> int | None:
        return self.peak - self.base if self.available else None


def _memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one ``fn()`` call, in MiB (see the module docstring for the methods)."""
    if device.type == "cuda":
        return {"peak_mib": peak_memory(fn, device) / _MIB, "method": "torch.cuda.max_memory_allocated above the level before"}
    with _RSSPeak() as rss:
        tensors = peak_memory(fn, device)
    out = {
        "peak_mib": tensors / _MIB,
        "method": "peak of live tensor bytes created during the step (dispatcher-level tracker)",
        "rss_increase_mib": None if rss.increase is None else rss.increase / _MIB,
        # ru_maxrss: KiB on Linux, bytes on macOS
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (_MIB if platform.system() == "Darwin" else 1024),
    }
    return out


def _summary(times: list[float], items: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "items_per_s": items / med,
        "step_time_s": {"median": med, "min": min(times), "max": max(times), "runs": times},
        "items_per_step": items,
    }


# ----------------------------------------------------------------------------- MACs
def _pattern(name: str) -> str:
    """``model.blocks.3.attn`` → ``model.blocks.*.attn`` (repeated blocks are summed)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def mac_breakdown(per_module: dict[str, int], total: int, top: int = 12) -> list[dict[str, Any]]:
    """Every MAC attributed once: to the deepest module whose own ``forward`` performed it.

    ``per_module`` holds inclusive counts (``count_macs``' second output). A module's own share is
    its count minus its counted children's; a module that also has children is listed as
    ``name [direct]`` (e.g. the attention products inside an attention layer besides its linears).
    Rows of repeated blocks are merged (``blocks.*``). Returns the ``top`` rows by MACs plus an
    ``(other)`` row, each ``{"module", "instances", "macs", "share"}``; the rows sum to ``total``.
    """
    own = dict(per_module)
    own.setdefault("", total)  # the root's own share: everything not below a counted child
    parents: set[str] = set()
    for n, macs in per_module.items():
        if n == "":
            continue
        parts = n.split(".")
        parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in own), "")
        own[parent] -= macs
        parents.add(parent)
    groups: dict[str, dict[str, int]] = {}
    for n, macs in own.items():
        if macs <= 0:
            continue
        label = "(root)" if n == "" else _pattern(n) + (" [direct]" if n in parents else "")
        g = groups.setdefault(label, {"macs": 0, "instances": 0})
        g["macs"] += macs
        g["instances"] += 1
    rows = sorted(({"module": k, **v} for k, v in groups.items()), key=lambda r: -r["macs"])
    shown = rows[:top]
    rest = total - sum(r["macs"] for r in shown)
    if rest > 0:
        shown.append({"module": "(other)", "macs": rest, "instances": sum(r["instances"] for r in rows[top:])})
    for r in shown:
        r["share"] = r["macs"] / total if total else 0.0
    return shown


# ----------------------------------------------------------------------------- inputs
def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[-2]), int(v[-1])) if len(v) >= 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def _hparams(module: nn.Module) -> dict[str, Any]:
    return dict(getattr(module, "hparams", {}) or {})


def _default_img_size(module: nn.Module, datamodule: Any) -> tuple[int, int]:
    hp = _hparams(module)
    dm_hp = _hparams(datamodule) if datamodule is not None else {}
    for v in (hp.get("img_size"), (hp.get("backbone_kwargs") or {}).get("img_size"),
              getattr(datamodule, "img_size", None), getattr(datamodule, "crop_size", None), dm_hp.get("img_size")):
        if v:
            return _pair(v)
    for m in module.modules():  # a timm model's default input size
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return _pair(cfg["input_size"])
    return 224, 224


def _default_batch_size(datamodule: Any) -> int:
    if datamodule is not None:
        for v in (getattr(datamodule, "batch_size", None), _hparams(datamodule).get("batch_size")):
            if v:
                return int(v)
    return 1


def _in_chans(module: nn.Module) -> int:
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _resized(module: nn.Module, size: tuple[int, int]) -> nn.Module:
    """The module rebuilt from its own hyper-parameters at another input size, if its config fixes one
    (``img_size``, or ``backbone_kwargs.img_size``): position embeddings / agent biases follow."""
    hp = _hparams(module)
    value: Any = size[0] if size[0] == size[1] else list(size)
    changed = False
    if "img_size" in hp and (hp["img_size"] is None or _pair(hp["img_size"]) != size):
        hp["img_size"], changed = value, True
    bk = hp.get("backbone_kwargs")
    if isinstance(bk, dict) and "img_size" in bk and _pair(bk["img_size"]) != size:
        hp["backbone_kwargs"], changed = {**bk, "img_size": value}, True
    if not changed:
        return module
    params = inspect.signature(type(module).__init__).parameters
    return type(module)(**{k: v for k, v in hp.items() if k in params})


def _example(module: nn.Module, batch_size: int, size: tuple[int, int], device: torch.device) -> tuple[str, tuple, Any]:
    """(task kind, forward args, training batch) with random inputs of the given shape."""
    from .tasks import ClassificationModule, SegmentationModule

    if hasattr(module, "example_input"):
        from lightning.fabric.utilities.apply_func import move_data_to_device

        args, batch = module.example_input(batch_size, size[0] if size[0] == size[1] else size)
        args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        return "custom", move_data_to_device(args, device), move_data_to_device(batch, device)
    x = torch.randn(batch_size, _in_chans(module), *size, device=device)
    num_classes = int(_hparams(module).get("num_classes") or 0)
    if isinstance(module, SegmentationModule):
        mask = torch.randint(0, num_classes, (batch_size, *size), device=device)
        return "segmentation", (x,), {"image": x, "mask": mask}
    if isinstance(module, ClassificationModule):
        return "classification", (x,), (x, torch.randint(0, num_classes, (batch_size,), device=device))
    raise ValueError(
        f"agentlit profile does not know the inputs of {type(module).__qualname__}: define "
        "`example_input(batch_size, img_size) -> (forward_args, training_batch)` on it, or use one of "
        "ClassificationModule, SegmentationModule, GenerationModule"
    )


def _optimizer(module: nn.Module, trainer: Any) -> tuple[torch.optim.Optimizer, str]:
    """The module's own optimiser when ``configure_optimizers`` runs without a fitted Trainer,
    else AdamW (same per-step cost) over its parameter groups."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conf = module.configure_optimizers()
        while not isinstance(conf, torch.optim.Optimizer):
            conf = conf["optimizer"] if isinstance(conf, dict) else conf[0]
        return conf, type(conf).__name__ + " (the module's configure_optimizers)"
    except Exception:  # e.g. schedules that read trainer.estimated_stepping_batches
        hp = _hparams(module)
        groups = module.param_groups() if hasattr(module, "param_groups") else [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(groups, lr=float(hp.get("lr", 1e-3)), weight_decay=float(hp.get("weight_decay", 0.0)))
        return opt, "AdamW (configure_optimizers needs a fitted Trainer; same per-step cost)"


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    with warnings.catch_warnings():  # self.log() outside a fit loop warns at every step
        warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
        yield


def _precision(trainer: Any) -> Any:
    return getattr(trainer, "precision_plugin", None) if trainer is not None else None


# ----------------------------------------------------------------------------- vision tasks
def _profile_vision(trainer: Any, module: nn.Module, datamodule: Any, batch_size: int | None, img_size: int | None,
                    mode: str, steps: int, warmup: int, top: int, device: torch.device) -> dict[str, Any]:
    size = _pair(img_size) if img_size else _default_img_size(module, datamodule)
    if img_size:
        module = _resized(module, size)
    batch_size = batch_size or _default_batch_size(datamodule)
    plugin = _precision(trainer)
    if plugin is not None:
        module = plugin.convert_module(module)
    module = module.to(device)
    ctx = plugin.forward_context if plugin is not None else contextlib.nullcontext
    kind, args, batch = _example(module, batch_size, size, device)
    hp = _hparams(module)
    report: dict[str, Any] = {
        "task": kind,
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "model": hp.get("model_name") or hp.get("backbone") or type(module).__name__,
        "model_kwargs": hp.get("model_kwargs") or hp.get("backbone_kwargs") or {},
        "input": {"batch_size": batch_size, "img_size": list(size),
                  "shape": [list(a.shape) for a in args if isinstance(a, Tensor)], "data": "random tensors of the data's shape"},
        "precision": str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true",
        "params": {"total": sum(p.numel() for p in module.parameters()),
                   "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)},
    }

    # MACs of one item (linear in the batch), attention on the math backend so it is counted
    one = tuple(a[:1] if isinstance(a, Tensor) and a.shape[:1] == (batch_size,) else a for a in args)
    with ctx():
        total, per_module = count_macs(module, *one)
    report["macs"] = {"per_item": total, "per_batch": total * batch_size,
                      "convention": "multiply-accumulates of matmuls and convolutions (= FLOPs / 2)"}
    report["macs_breakdown"] = mac_breakdown(per_module, total, top)

    was_training = module.training
    if mode in ("inference", "both"):
        module.eval()

        def infer() -> None:
            with torch.no_grad(), ctx():
                module(*args)

        times = _time(infer, steps, warmup, device)
        report["inference"] = {**_summary(times, batch_size), "what": f"{type(module).__name__}.forward, eval, no grad",
                               "memory": _memory(infer, device)}
    if mode in ("train", "both"):
        module.train()
        opt, opt_note = _optimizer(module, trainer)
        clip = getattr(trainer, "gradient_clip_val", None) if trainer is not None else None
        clip_algo = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm")
        scaler = getattr(plugin, "scaler", None)
        params = [p for p in module.parameters() if p.requires_grad]

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            with ctx(), _quiet_logging():
                out = module.training_step(batch, 0)
            loss = out["loss"] if isinstance(out, dict) else out
            if scaler is not None:  # fp16 mixed precision: scaled backward, unscale before clipping
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if clip:
                if clip_algo == "value":
                    torch.nn.utils.clip_grad_value_(params, clip)
                else:
                    torch.nn.utils.clip_grad_norm_(params, clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()

        times = _time(train_step, steps, max(1, warmup), device)  # >= 1: optimiser state exists before timing
        what = f"{type(module).__name__}.training_step (loss) + backward + {opt_note.split(' ')[0]}.step"
        if clip:
            what += f" + grad clip ({clip_algo} {clip})"
        report["train"] = {**_summary(times, batch_size), "what": what, "optimizer": opt_note,
                           "memory": _memory(train_step, device)}
        opt.zero_grad(set_to_none=True)
    module.train(was_training)
    return report


# ----------------------------------------------------------------------------- generation
def _is_generation(module: nn.Module) -> bool:
    return hasattr(module, "pipe") and hasattr(module, "generate") and hasattr(module, "unet")


class _PipelineCall(nn.Module):
    """Holds the pipeline's networks as children so MACs are attributed to ``unet.…``, ``vae.…``."""

    def __init__(self, module: nn.Module, run: Callable[[], Any]) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = module.unet, module.vae, module.text_encoder
        self._run = run

    def forward(self) -> Any:
        return self._run()


def _profile_generation(trainer: Any, module: nn.Module, datamodule: Any, batch_size: int | None, img_size: int | None,
                        mode: str, steps: int, warmup: int, top: int, device: torch.device) -> dict[str, Any]:
    hp = module.hparams
    batch_size = batch_size or _default_batch_size(datamodule)
    prompts = list(getattr(datamodule, "prompts", None) or ["a photo of a golden retriever"])
    prompts = [prompts[i % len(prompts)] for i in range(batch_size)]
    seeds = list(range(batch_size))
    old_hw = (hp.get("height"), hp.get("width"))
    if img_size:
        hp["height"] = hp["width"] = int(img_size)
    module = module.to(device)
    unet_times: list[float] = []
    starts: list[float] = []

    def pre(*_: Any) -> None:
        _sync(device)
        starts.append(time.perf_counter())

    def post(*_: Any) -> None:
        _sync(device)
        unet_times.append(time.perf_counter() - starts.pop())

    def run() -> Any:
        with torch.no_grad():
            return module.generate(prompts, seeds, output_type="pt")

    try:
        info = module._run_info if hasattr(module, "_run_info") else {}
        agentsd = getattr(module, "agentsd", None)
        report: dict[str, Any] = {
            "task": "generation",
            "module": f"{type(module).__module__}.{type(module).__qualname__}",
            "model": hp.get("pretrained_model_name_or_path") or info.get("model") or "pipeline",
            "input": {"batch_size": batch_size, "img_size": [info.get("height"), info.get("width")],
                      "prompts": prompts, "num_inference_steps": hp.get("num_inference_steps"),
                      "guidance_scale": hp.get("guidance_scale")},
            "precision": hp.get("torch_dtype", "float32"),
            "agentsd": None if agentsd is None else vars(agentsd),
            "params": {name: sum(p.numel() for p in getattr(module, name).parameters())
                       for name in ("unet", "vae", "text_encoder")},
        }
        report["params"]["total"] = sum(report["params"].values())
        report["params"]["trainable"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if mode == "train":
            report["train"] = {"skipped": f"{type(module).__name__} has no training step (AgentSD is training-free)"}
            return report
        handles = [module.unet.register_forward_pre_hook(pre), module.unet.register_forward_hook(post)]
        try:
            for _ in range(warmup):
                run()
            unet_times.clear()
            times = _time(run, steps, 0, device)
            calls = len(unet_times) // max(1, steps)
            step_time = statistics.median(unet_times)
        finally:
            for h in handles:
                h.remove()
        memory = _memory(run, device)
        total, per_module = count_macs(_PipelineCall(module, run))
        unet_macs = per_module.get("unet", 0)
        med = statistics.median(times)
        report["generation"] = {
            "time_per_image_s": med / batch_size,
            "time_per_denoising_step_s": step_time,
            "time_per_denoising_step_per_image_s": step_time / batch_size,
            "unet_calls_per_run": calls,
            "unet_share_of_time": sum(unet_times) / sum(times),
            "runs_s": times,
            "what": "full pipeline calls (text encoding, denoising loop, VAE decoding); a denoising step = one UNet "
                    "call (classifier-free guidance batched into it), timed by hooks",
            "memory": memory,
        }
        if mode == "both":
            report["train"] = {"skipped": f"{type(module).__name__} has no training step (AgentSD is training-free)"}
        report["macs"] = {"per_item": total // batch_size, "per_batch": total,
                          "per_denoising_step_per_item": unet_macs // max(1, calls) // batch_size,
                          "convention": "multiply-accumulates of matmuls and convolutions (= FLOPs / 2), one full pipeline call"}
        report["macs_breakdown"] = mac_breakdown(per_module, total, top)
        return report
    finally:
        hp["height"], hp["width"] = old_hw


# ----------------------------------------------------------------------------- entry point
def _fmt_count(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suffix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def _fmt_mem(m: dict[str, Any]) -> str:
    s = f"peak {m['peak_mib']:.1f} MiB"
    if m.get("rss_increase_mib") is not None:
        s += f", RSS +{m['rss_increase_mib']:.1f} MiB"
    return s


def format_report(report: dict[str, Any]) -> str:
    """The printed table of :func:`profile_module`'s report."""
    mach = report.get("machine", {})
    inp = report["input"]
    lines = [
        f"agentlit profile: {report['module']} ({report['model']}"
        + (f" {json.dumps(report['model_kwargs'], default=str)})" if report.get("model_kwargs") else ")"),
        f"  machine     {mach.get('gpu') or mach.get('cpu', '?')} | {mach.get('device', '?')} | {mach.get('torch_threads', '?')} "
        f"threads | torch {mach.get('torch', '?')} | load {mach.get('loadavg_1m', '?')}",
        f"  input       batch {inp['batch_size']} x {inp['img_size']} ({report.get('precision')})",
        f"  parameters  {_fmt_count(report['params']['total'])} (trainable {_fmt_count(report['params']['trainable'])})",
    ]
    macs = report.get("macs")
    if macs:
        line = f"  MACs        {_fmt_count(macs['per_item'])} per item"
        if "per_denoising_step_per_item" in macs:
            line += f", {_fmt_count(macs['per_denoising_step_per_item'])} per denoising step"
        lines.append(line)
    for key, label in (("inference", "inference"), ("train", "training")):
        r = report.get(key)
        if not r:
            continue
        if "skipped" in r:
            lines.append(f"  {label:<11} skipped: {r['skipped']}")
            continue
        st = r["step_time_s"]
        lines.append(f"  {label:<11} {r['items_per_s']:.1f} items/s  ({st['median'] * 1e3:.1f} ms/step, median of "
                     f"{len(st['runs'])}; {_fmt_mem(r['memory'])})")
        lines.append(f"  {'':<11} {r['what']}")
    g = report.get("generation")
    if g:
        lines.append(f"  generation  {g['time_per_image_s']:.3f} s/image, {g['time_per_denoising_step_s'] * 1e3:.1f} ms per denoising "
                     f"step of the batch of {inp['batch_size']} ({g['unet_calls_per_run']} UNet calls per pipeline call, "
                     f"median of {len(g['runs_s'])}; {_fmt_mem(g['memory'])})")
    rows = report.get("macs_breakdown") or []
    if rows:
        width = max(len("module"), *(len(r["module"]) for r in rows))
        lines.append("  MACs by module (per item; repeated blocks merged as *):")
        lines.append(f"    {'module':<{width}}  {'n':>3}  {'MACs':>9}  share")
        for r in rows:
            lines.append(f"    {r['module']:<{width}}  {r['instances']:>3}  {_fmt_count(r['macs']):>9}  {100 * r['share']:5.1f}%")
    return "\n".join(lines)


def profile_module(
    trainer: Any,
    model: nn.Module,
    datamodule: Any = None,
    *,
    batch_size: int | None = None,
    img_size: int | None = None,
    mode: str = "both",
    steps: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    output: str | None = None,
    top: int = 12,
    verbose: bool = True,
) -> dict[str, Any]:
    """Profile a task module (see the module docstring for what is measured).

    Args:
        trainer: the CLI's Trainer (device, precision, gradient clipping) or None (CPU, fp32).
        model: a task LightningModule; datamodule: gives batch size / resolution (may be None).
        batch_size, img_size: overrides (square ``img_size``); the module is rebuilt from its
            hyper-parameters when its config fixes the input size.
        mode: "inference", "train" or "both"; steps / warmup: timed / untimed steps per measurement
            (defaults: 5 / 2, generation 3 / 1 pipeline calls).
        threads: torch intra-op threads during the measurement (None: leave torch's setting).
        output: JSON path for the report; top: rows of the MAC breakdown.
    Returns:
        the report dict (keys: task, module, model, input, precision, params, macs, macs_breakdown,
        inference / train / generation, machine, wall_time_s).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    for name, value, low in (("batch_size", batch_size, 1), ("img_size", img_size, 1), ("steps", steps, 1),
                             ("warmup", warmup, 0), ("threads", threads, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name}={value} must be >= {low}")
    t0 = time.perf_counter()
    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    generation = _is_generation(model)
    steps = steps if steps is not None else (3 if generation else 5)
    warmup = warmup if warmup is not None else (1 if generation else 2)
    fn = _profile_generation if generation else _profile_vision
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        report = fn(trainer, model, datamodule, batch_size, img_size, mode, steps, warmup, top, device)
        report["machine"] = machine_info(device)  # torch_threads as measured
    finally:
        torch.set_num_threads(old_threads)
    if trainer is not None and getattr(trainer, "num_devices", 1) > 1:
        report["note"] = f"measured on one device ({device}) of the trainer's {trainer.num_devices}"
    report["wall_time_s"] = time.perf_counter() - t0
    if verbose:
        print(format_report(report), flush=True)
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        if verbose:
            print(f"wrote {path}", flush=True)
    return report
