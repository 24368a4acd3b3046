"""Training curves from a run's ``metrics.csv`` (what CSVLogger writes)."""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["metric_panels", "plot_metrics", "read_metrics"]


def read_metrics(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric column of ``metrics_csv`` as ``{name: [(step, value), ...]}`` (empty cells skipped).

    Args:
        metrics_csv: a CSVLogger ``metrics.csv`` (columns ``step``, ``epoch`` and one per metric).
    """
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step") or ""
            if not step.lstrip("-").isdigit():
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or not value:
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                if math.isfinite(v):
                    series[key].append((int(step), v))
    return dict(series)


def metric_panels(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[str]]:
    """The panels of ``metrics.png``: metric family (``loss``, ``acc1``, ``learning rate`` …) → the
    metrics drawn in it. A panel of a single dot says nothing, so only metrics logged more than once
    get one, and never a metric that is -1 throughout (COCO's "no object of this size").

    Args:
        series: ``{name: [(step, value), ...]}`` as :func:`read_metrics` returns it.
    """
    panels: dict[str, list[str]] = defaultdict(list)
    for name in sorted(series):
        points = series[name]
        if len(points) < 2 or all(value == -1 for _, value in points):
            continue
        family = "learning rate" if name.startswith("lr") else name.split("/", 1)[-1].removesuffix("_step").removesuffix("_epoch")
        panels[family].append(name)
    return dict(panels)


def plot_metrics(metrics_csv: str | Path, output: str | Path) -> Path | None:
    """Write ``output`` (PNG): one panel per metric family (``loss``, ``acc1`` …), train and val
    curves over the global step; learning rates in their own panel; metrics logged only once get none
    (:func:`metric_panels`). None when there is nothing to plot.

    Args:
        metrics_csv: the run's ``metrics.csv``.
        output: the PNG to write.
    """
    metrics_csv, output = Path(metrics_csv), Path(output)
    if not metrics_csv.is_file():
        return None
    series = read_metrics(metrics_csv)
    panels = metric_panels(series)
    if not panels:
        return None

    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (family, names) in zip(axes.flat, panels.items()):
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker=None if len(steps) > 30 else "o", markersize=3, label=name)
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    return output
