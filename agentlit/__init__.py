"""agentlit: Agent Attention (Han et al., ECCV 2024) as a PyTorch Lightning pipeline.

``import agentlit`` is cheap: torch, timm and diffusers load when something needs them, so
``agentlit --help`` starts in a fraction of a second. The agent backbones still land in timm's
registry before any model is built: right away when timm is already imported, otherwise the moment
timm finishes importing (a one-shot import hook), so ``import agentlit, timm;
timm.create_model("agent_deit_tiny")`` works in either order.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "AgentAttention", "AgentMultiheadAttention", "agent_attention", "agent_attention_tokens", "convert", "load_exported",
    "models", "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from . import models
    from .conversion import convert
    from .core import AgentAttention, AgentMultiheadAttention, agent_attention, agent_attention_tokens
    from .export import load_exported

# public name -> (module, attribute or None for the module itself), imported on first access
_LAZY = {
    "AgentAttention": (".core", "AgentAttention"),
    "AgentMultiheadAttention": (".core", "AgentMultiheadAttention"),
    "agent_attention": (".core", "agent_attention"),
    "agent_attention_tokens": (".core", "agent_attention_tokens"),
    "convert": (".conversion", "convert"),
    "load_exported": (".export", "load_exported"),
    "models": (".models", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'agentlit' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _RegisterWithTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``agentlit.models`` (which registers the agent backbones) right after ``timm`` has
    been imported. Removes itself on first use; timm's module keeps timm's own loader."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):  # noqa: ANN001
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        module.__spec__.loader = module.__loader__ = self._inner
        self._inner.exec_module(module)
        importlib.import_module(".models", __name__)


if "timm" in sys.modules:
    importlib.import_module(".models", __name__)
elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())
