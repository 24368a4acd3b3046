"""Measuring helpers shared by ``agentlit profile`` and the benchmarks: where a measurement ran,
timed calls, and the peak memory of one call (on the CPU as well as on CUDA)."""
from __future__ import annotations

import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .memory import peak_memory

__all__ = ["machine_info", "sync", "time_calls", "peak_memory_report"]

_MIB = 2**20


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a measurement ran: CPU model, cores, torch threads/version, device (and GPU), load.

    Args:
        device: the device the measurement ran on.
    """
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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed calls.

    Args:
        fn: the call to time.
        steps: timed calls.
        warmup: untimed calls first.
        device: synchronised after each call, so queued GPU work is inside the time.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
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


def peak_memory_report(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one ``fn()`` call in MiB: on CUDA the allocator's peak above the level before;
    on the CPU the peak of live tensor bytes and the growth of resident memory sampled every
    millisecond (a lower bound: allocators cache).

    Args:
        fn: the call to measure.
        device: where ``fn`` runs.
    """
    if device.type == "cuda":
        return {"peak_mib": peak_memory(fn, device) / _MIB, "method": "torch.cuda.max_memory_allocated above the level before"}
    with _RSSPeak() as rss:
        tensors = peak_memory(fn, device)
    return {
        "peak_mib": tensors / _MIB,
        "method": "peak of live tensor bytes created during the step (dispatcher-level tracker)",
        "rss_increase_mib": None if rss.increase is None else rss.increase / _MIB,
        # ru_maxrss: KiB on Linux, bytes on macOS
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (_MIB if platform.system() == "Darwin" else 1024),
    }
