"""LightningModules: one per task, all built on the shared agent-attention core."""
from .classification import ClassificationModule

__all__ = ["ClassificationModule"]
