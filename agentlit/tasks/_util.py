"""Small helpers shared by the task modules."""
from __future__ import annotations

from pathlib import Path

import lightning as L

__all__ = ["latest_checkpoint"]


def latest_checkpoint(trainer: L.Trainer) -> str | None:
    """The most recently written checkpoint file of any checkpoint callback, if one exists."""
    paths = {p for cb in trainer.checkpoint_callbacks for p in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")) if p}
    existing = [Path(p) for p in paths if Path(p).is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None
