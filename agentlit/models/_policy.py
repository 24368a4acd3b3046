"""Which parameters are never weight-decayed: one rule for every model family.

The agent models' training code (inherited from the DeiT, Swin, PVT and CSWin code bases) decays
no position information and nothing one-dimensional:

- agent position biases (``an_bias``, ``na_bias``, ``ah/aw/ha/wa_bias``, ``ac/ca_bias``; ``al/la_bias``
  of sequences, ``ad/da_bias`` of volumes), found by module type (:class:`~agentlit.core.AgentPositionBias`), so a renamed attribute cannot escape;
- position embeddings / relative-position tables and class / distillation / register tokens, found
  by parameter name (timm's and the official releases' names: ``pos_embed``, ``pos_embed1``..,
  ``absolute_pos_embed``, ``relative_position_bias_table``, ``cls_token``, ``dist_token``,
  ``reg_token``) and learned agents (``agent_tokens``);
- norms' weights and every bias: one-dimensional, excluded by timm's rule
  (``param.ndim <= 1 or name.endswith(".bias")``, see :func:`agentlit.tasks.optim.param_groups`).

Each family's ``no_weight_decay()`` returns :func:`no_weight_decay_names` of itself (timm's
optimizer factory reads it); the tasks build their optimizers with
:func:`agentlit.tasks.optim.param_groups`, which applies the same rule to any module tree.
"""
from __future__ import annotations

import re

from torch import nn

from ..core import AgentPositionBias
from ..core.bias import AGENT_BIAS_NAMES

__all__ = ["NO_DECAY_NAME", "agent_bias_names", "no_weight_decay_names"]

#: The last component of a parameter name that is never decayed (position information, extra tokens).
NO_DECAY_NAME = re.compile(
    r"^(pos_embed\d*|absolute_pos_embed|relative_position_bias_table|cls_token|dist_token|reg_token|agent_tokens)$"
)


def agent_bias_names(model: nn.Module) -> set[str]:
    """Names of every agent position-bias parameter of ``model``.

    Args:
        model: any module; its :class:`~agentlit.core.AgentPositionBias` sub-modules are searched.
    """
    return {
        f"{name}.{k}" if name else k
        for name, m in model.named_modules()
        if isinstance(m, AgentPositionBias)
        for k in AGENT_BIAS_NAMES
        if isinstance(getattr(m, k, None), nn.Parameter)
    }


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Multi-dimensional parameters of ``model`` that are never decayed: agent biases, position
    embeddings / tables, class and distillation tokens (1-D ones are excluded by the optimizer's rule).

    Args:
        model: any module; names are relative to it, as ``model.named_parameters()`` gives them.
    """
    named = {n for n, _ in model.named_parameters() if NO_DECAY_NAME.match(n.rpartition(".")[2])}
    return named | agent_bias_names(model)
