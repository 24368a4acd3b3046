"""Peak tensor memory of a piece of code, on the CPU as well as on CUDA."""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["TensorMemoryTracker", "peak_memory"]


class TensorMemoryTracker(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the mode and their peak.

    CPU allocators keep no statistics, so this counts at the dispatcher: every op output's
    storage is added once when created and subtracted when it is freed. Inputs that existed
    before entering are not counted (peak is the *extra* memory the code needs).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)

        def release(key: int = key, size: int = size) -> None:
            self.current -= size
            self._seen.discard(key)

        weakref.finalize(storage, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while running ``fn()`` (CUDA: the allocator's counter; CPU: tracked tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak
