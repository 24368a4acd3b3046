"""``agentlit profile``: parameters, MACs, throughput and peak memory of a configured task module.

The profiler knows nothing about particular tasks: it talks to the task protocol of
:mod:`agentlit.tasks.base` (``example_batch``, ``example_input``, ``inference_step``,
``training_loss``, ``timed_modules``, ``input_size``, ``at_input_size``, ``describe``), so a new
task is profiled by implementing those methods. Inputs are the task's random example batches
(batch size from ``--batch_size`` or the datamodule, size from ``--img_size`` or the task), so no
dataset has to be present. What is measured:

- MACs: one ``inference_step`` on a batch of one, with :func:`agentlit.utils.count_macs`
  (attention on the math SDPA backend, so agent and softmax attention are counted whatever backend
  serves them at run time), and a per-module breakdown in which every MAC is attributed once.
- Inference: ``inference_step(batch)`` in eval mode without gradients; items/s = batch / median time.
- Training: ``training_loss(batch)`` + backward + optimiser step (+ gradient clipping and the
  precision plugin as the trainer is configured); hooks such as EMA updates, data loading and
  logging are not included. A task whose ``training_loss`` raises ``NotImplementedError`` is
  reported as skipped.
- Per-step numbers for multi-step inference (e.g. a denoising loop): every module of
  ``timed_modules()`` is timed by forward hooks; calls per inference, time per call and MACs per
  call are reported under its label.
- Peak memory of one step: the CUDA allocator's peak above the level before the step, or on the
  CPU the peak of live tensor bytes (:func:`agentlit.utils.memory.peak_memory`) and the process's
  resident-memory growth sampled every millisecond (allocator caches make it a lower bound).
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from .errors import check_choice
from .utils.flops import count_macs, mac_breakdown
from .utils.measure import machine_info, peak_memory_report, sync, time_calls

__all__ = ["machine_info", "mac_breakdown", "format_report", "profile_module"]

#: what ``agentlit profile --mode`` measures (the trainer's ``profile`` is typed with it)
Mode = Literal["inference", "train", "both"]
_PROTOCOL = ("example_batch", "example_input", "inference_step", "training_loss", "timed_modules", "input_size",
             "at_input_size", "describe")


# ----------------------------------------------------------------------------- timing
class _StepTimer:
    """Forward hooks on the task's ``timed_modules()``: seconds of every call, per label."""

    def __init__(self, modules: dict[str, nn.Module], device: torch.device) -> None:
        self.modules, self.device = modules, device
        self.times: dict[str, list[float]] = {label: [] for label in modules}
        self._handles: list[Any] = []

    def __enter__(self) -> "_StepTimer":
        for label, module in self.modules.items():
            starts: list[float] = []

            def pre(*_: Any, starts: list[float] = starts) -> None:
                sync(self.device)
                starts.append(time.perf_counter())

            def post(*_: Any, starts: list[float] = starts, label: str = label) -> None:
                sync(self.device)
                self.times[label].append(time.perf_counter() - starts.pop())

            self._handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()


def _summary(times: list[float], items: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "items_per_s": items / med,
        "step_time_s": {"median": med, "min": min(times), "max": max(times), "runs": times},
        "items_per_step": items,
    }


# ----------------------------------------------------------------------------- MACs
class _Call(nn.Module):
    """Runs ``fn`` with the task as its only child, so MACs are attributed to ``task.<module path>``."""

    def __init__(self, task: nn.Module, fn: Callable[[], Any]) -> None:
        super().__init__()
        self.task, self._fn = task, fn

    def forward(self) -> Any:
        return self._fn()


def _count(task: nn.Module, batch: Any, timed: dict[str, nn.Module],
           ctx: Callable[[], Any]) -> tuple[int, dict[str, int], dict[str, int]]:
    """(MACs of one ``inference_step(batch)``, inclusive MACs per module path of the task, calls of
    each timed module)."""
    with ctx(), _StepTimer(timed, torch.device("cpu")) as timer:
        total, per = count_macs(_Call(task, lambda: task.inference_step(batch)))
    # the wrapper's names are "task.<path>": strip them back to the task's own module paths
    per_module = {k[len("task."):]: v for k, v in per.items() if k.startswith("task.")}
    return total, per_module, {label: len(t) for label, t in timer.times.items()}


# ----------------------------------------------------------------------------- training
def _optimizer(task: nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """The task's own optimiser when ``configure_optimizers`` runs without a fitted Trainer, else
    AdamW over the trainable parameters (the same per-step cost)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conf = task.configure_optimizers()
        while not isinstance(conf, torch.optim.Optimizer):
            conf = conf["optimizer"] if isinstance(conf, dict) else conf[0]
        return conf, type(conf).__name__ + " (the module's configure_optimizers)"
    except Exception:  # e.g. schedules that read trainer.estimated_stepping_batches
        opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-3)
        return opt, "AdamW (configure_optimizers needs a fitted Trainer; same per-step cost)"


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    with warnings.catch_warnings():  # self.log() outside a fit loop warns at every step
        warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
        yield


def _train(task: nn.Module, batch: Any, batch_size: int, trainer: Any, ctx: Callable[[], Any], steps: int,
           warmup: int, device: torch.device) -> dict[str, Any]:
    task.train()
    try:
        with ctx(), _quiet_logging():
            task.training_loss(batch)  # a warm-up forward; inference-only tasks raise here
    except NotImplementedError as err:
        return {"skipped": str(err) or f"{type(task).__name__} has no training step"}
    opt, opt_note = _optimizer(task)
    clip = getattr(trainer, "gradient_clip_val", None) if trainer is not None else None
    clip_algo = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm")
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    params = [p for p in task.parameters() if p.requires_grad]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with ctx(), _quiet_logging():
            loss = task.training_loss(batch)
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

    times = time_calls(step, steps, max(1, warmup), device)  # >= 1: optimiser state exists before timing
    what = f"{type(task).__name__}.training_loss + backward + {opt_note.split(' ')[0]}.step"
    if clip:
        what += f" + grad clip ({clip_algo} {clip})"
    out = {**_summary(times, batch_size), "what": what, "optimizer": opt_note,
           "memory": peak_memory_report(step, device)}
    opt.zero_grad(set_to_none=True)
    return out


# ----------------------------------------------------------------------------- entry point
def _default_batch_size(datamodule: Any) -> int:
    if datamodule is not None:
        hp = getattr(datamodule, "hparams", None) or {}
        for v in (getattr(datamodule, "batch_size", None), hp.get("batch_size")):
            if v:
                return int(v)
    return 1


def _measure(trainer: Any, task: nn.Module, batch_size: int, img_size: tuple[int, int] | None, mode: str,
             steps: int, warmup: int, top: int, device: torch.device) -> dict[str, Any]:
    if img_size is not None:
        task = task.at_input_size(img_size)  # rebuilt when its config fixes the size; never edited in place
    size = img_size or task.input_size()
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    if plugin is not None:
        task = plugin.convert_module(task)
    task = task.to(device)
    ctx = plugin.forward_context if plugin is not None else contextlib.nullcontext
    try:
        batch = move_data_to_device(task.example_batch(batch_size, size), device)
    except NotImplementedError as err:  # TaskModule's default: the one method a task must write
        raise ValueError(f"{err}: agentlit profile measures the task on its random example batches") from err
    args = task.example_input(batch)
    params = {name: sum(p.numel() for p in child.parameters()) for name, child in task.named_children()}
    report: dict[str, Any] = {
        **task.describe(),
        "input": {"batch_size": batch_size, "img_size": list(size) if size else None,
                  "shape": [list(a.shape) for a in args if isinstance(a, Tensor)],
                  "data": "random data from the task's example_batch"},
        "precision": str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true",
        "params": {"total": sum(p.numel() for p in task.parameters()),
                   "trainable": sum(p.numel() for p in task.parameters() if p.requires_grad),
                   "by_module": {k: v for k, v in params.items() if v}},
    }
    was_training = task.training
    timed = task.timed_modules()
    paths = {id(m): n for n, m in task.named_modules()}

    # MACs of one item (linear in the batch), attention on the math backend so it is counted
    total, per_module, calls = _count(task, move_data_to_device(task.example_batch(1, size), device), timed, ctx)
    report["macs"] = {"per_item": total, "per_batch": total * batch_size,
                      "convention": "multiply-accumulates of matmuls and convolutions (= FLOPs / 2)"}
    if timed:  # inclusive MACs of each timed module, split over its calls
        report["macs"]["per_call_per_item"] = {
            label: per_module.get(paths[id(m)], 0) // calls[label] for label, m in timed.items()
            if calls[label] and id(m) in paths}
    uncalled = [f"timed_modules()[{label!r}] ({type(m).__name__}) is not called by {type(task).__name__}."
                "inference_step: name the module the inference runs (e.g. the EMA copy when sampling uses it)"
                for label, m in timed.items() if not calls[label]]
    if uncalled:
        report["warnings"] = uncalled
    report["macs_breakdown"] = mac_breakdown(per_module, total, top)

    if mode in ("inference", "both"):
        task.eval()

        def infer() -> None:
            with torch.no_grad(), ctx():
                task.inference_step(batch)

        for _ in range(warmup):
            infer()
        with _StepTimer(timed, device) as timer:
            times = time_calls(infer, steps, 0, device)
        report["inference"] = {**_summary(times, batch_size), "what": f"{type(task).__name__}.inference_step, eval, no grad",
                               "memory": peak_memory_report(infer, device)}
        report["inference"]["steps"] = {
            label: {
                "calls_per_inference": len(t) / steps,
                "time_per_call_s": statistics.median(t) if t else None,
                "share_of_time": sum(t) / sum(times),
            }
            for label, t in timer.times.items()
        }
    if mode in ("train", "both"):
        report["train"] = _train(task, batch, batch_size, trainer, ctx, steps, warmup, device)
    task.train(was_training)
    return report


def profile_module(
    trainer: Any,
    model: nn.Module,
    datamodule: Any = None,
    *,
    batch_size: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    mode: Mode = "both",
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
        model: a task module implementing the protocol of :mod:`agentlit.tasks.base`.
        datamodule: gives the batch size when ``batch_size`` is not set (may be None).
        batch_size: items per measured step (default: the datamodule's, else 1).
        img_size: input size override, an int (square) or (H, W); the task is rebuilt at that size.
        mode: "inference", "train" or "both".
        steps: timed steps per measurement (default 5; 3 for tasks with ``timed_modules``).
        warmup: untimed steps before timing (default 2; 1 for tasks with ``timed_modules``).
        threads: torch intra-op threads during the measurement (None: leave torch's setting).
        output: JSON path for the report.
        top: rows of the MAC breakdown.
        verbose: print the table (and where the JSON went).
    Returns:
        the report dict (keys: task, module, model, model_kwargs, input, precision, params, macs,
        macs_breakdown, inference, train, machine, wall_time_s).
    """
    check_choice("mode", mode, Mode)
    size = None if img_size is None else (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    for name, value, low in (("batch_size", batch_size, 1), ("img_size", min(size) if size else None, 1),
                             ("steps", steps, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name}={value} must be >= {low}")
    missing = [m for m in _PROTOCOL if not callable(getattr(model, m, None))]
    if missing:
        raise ValueError(
            f"agentlit profile needs the task protocol, and {type(model).__qualname__} lacks {missing}: subclass "
            "agentlit.tasks.base.TaskModule and define example_batch(batch_size, img_size)"
        )
    t0 = time.perf_counter()
    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    multi_step = bool(model.timed_modules())
    steps = steps if steps is not None else (3 if multi_step else 5)
    warmup = warmup if warmup is not None else (1 if multi_step else 2)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        report = _measure(trainer, model, batch_size or _default_batch_size(datamodule), size, mode, steps, warmup,
                          top, device)
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


# ----------------------------------------------------------------------------- the table
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
    """The printed table of :func:`profile_module`'s report.

    Args:
        report: a report from :func:`profile_module` (or its JSON).
    """
    mach = report.get("machine", {})
    inp = report["input"]
    size = "x".join(str(s) for s in inp["img_size"]) if inp.get("img_size") else "any size"
    lines = [
        f"agentlit profile: {report['module']} ({report['model']}"
        + (f" {json.dumps(report['model_kwargs'], default=str)})" if report.get("model_kwargs") else ")"),
        f"  machine     {mach.get('gpu') or mach.get('cpu', '?')} | {mach.get('device', '?')} | {mach.get('torch_threads', '?')} "
        f"threads | torch {mach.get('torch', '?')} | load {mach.get('loadavg_1m', '?')}",
        f"  input       batch {inp['batch_size']} x {size} ({report.get('precision')})",
        f"  parameters  {_fmt_count(report['params']['total'])} (trainable {_fmt_count(report['params']['trainable'])})",
    ]
    if report.get("macs"):
        per_call = "".join(f", {_fmt_count(n)} per {label}"
                           for label, n in report["macs"].get("per_call_per_item", {}).items())
        lines.append(f"  MACs        {_fmt_count(report['macs']['per_item'])} per item{per_call}")
    for key, label in (("inference", "inference"), ("train", "training")):
        r = report.get(key)
        if not r:
            continue
        if "skipped" in r:
            lines.append(f"  {label:<11} skipped: {r['skipped']}")
            continue
        st = r["step_time_s"]
        lines.append(f"  {label:<11} {r['items_per_s']:.3g} items/s  ({st['median'] * 1e3:.1f} ms per batch, median of "
                     f"{len(st['runs'])}; {_fmt_mem(r['memory'])})")
        lines.append(f"  {'':<11} {r['what']}")
        for step, s in (r.get("steps") or {}).items():
            if s["time_per_call_s"] is not None:
                lines.append(f"  {'':<11} {step}: {s['time_per_call_s'] * 1e3:.1f} ms per call on the batch of "
                             f"{inp['batch_size']}, {s['calls_per_inference']:g} calls per inference "
                             f"({100 * s['share_of_time']:.0f}% of the time)")
    lines += [f"  warning     {w}" for w in report.get("warnings") or []]
    rows = report.get("macs_breakdown") or []
    if rows:
        width = max(len("module"), *(len(r["module"]) for r in rows))
        lines.append("  MACs by module (per item; repeated blocks merged as *):")
        lines.append(f"    {'module':<{width}}  {'n':>3}  {'MACs':>9}  share")
        for r in rows:
            lines.append(f"    {r['module']:<{width}}  {r['instances']:>3}  {_fmt_count(r['macs']):>9}  {100 * r['share']:5.1f}%")
    return "\n".join(lines)
