"""The official release's state-dict layouts, read from ``tests/data/official_keys/<model>.tsv``.

Each file starts with one ``#`` header line (model, release config and its agent settings, input size,
entry counts); every other line is ``key<TAB>shape<TAB>kind`` with the shape written ``d0xd1x…`` and
kind ``param`` or ``buffer``. The listings hold names and shapes only, no weights, so tests build
random tensors of these shapes to exercise the loaders.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

OFFICIAL_KEYS = Path(__file__).resolve().parent / "data" / "official_keys"
MODELS = sorted(p.stem for p in OFFICIAL_KEYS.glob("*.tsv"))


def _rows(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    path = OFFICIAL_KEYS / f"{name}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"no official layout listing {path.name}; available: {MODELS}")
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, kind = line.split("\t")
        rows.append((key, tuple(int(d) for d in shape.split("x")), kind))
    return rows


def official_layout(name: str) -> dict[str, tuple[int, ...]]:
    """key → shape of every state-dict entry (parameters and persistent buffers) of the official model."""
    return {key: shape for key, shape, _ in _rows(name)}


def official_buffers(name: str) -> set[str]:
    """Keys of the persistent buffers (e.g. Swin's ``relative_position_index``, ``attn_mask``)."""
    return {key for key, _, kind in _rows(name) if kind == "buffer"}


def official_param_count(name: str) -> int:
    """Total number of parameter values (buffers excluded), the figure a paper's "params" column counts."""
    return sum(torch.Size(shape).numel() for _, shape, kind in _rows(name) if kind == "param")


def header_param_count(name: str) -> int:
    """The parameter total written in the listing's header line (a cross-check on the rows)."""
    header = (OFFICIAL_KEYS / f"{name}.tsv").read_text().splitlines()[0]
    return int(re.search(r"holding (\d+) values", header).group(1))


def random_official_state_dict(name: str, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the official keys and shapes; integer buffers (index tables) are zeros,
    float buffers (attention masks) zeros as well, as the model rebuilds both itself."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape, kind in _rows(name):
        if kind == "buffer":
            dtype = torch.long if key.endswith("index") else torch.float32
            out[key] = torch.zeros(shape, dtype=dtype)
        else:
            out[key] = torch.randn(shape, generator=g) * std
    return out
