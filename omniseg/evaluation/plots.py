"""Pictures of evaluation results: per-class IoU bars and a normalised confusion matrix.

Needs matplotlib (the ``plot`` extra: ``pip install omniseg[plot]``); it is imported only
when a picture is drawn, with the non-interactive Agg backend, so servers need no display.
Files are written atomically (PNG).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omniseg.io.atomic import atomic_write_bytes


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError(
            "drawing evaluation plots needs matplotlib: pip install 'omniseg[plot]'"
        ) from error
    return plt


def _save(figure: Any, path: str | Path) -> Path:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_per_class_iou(
    per_class_iou: Sequence[float] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    mean_iou: float | None = None,
    metric_name: str = "IoU",
    title: str | None = None,
) -> Path:
    """Horizontal bars of IoU (or another 0..1 per-class figure, named by ``metric_name``: PQ,
    AP) per class in class order, top to bottom; values written at the bar ends, the mean
    (``mean_iou``, default the NaN-skipping mean) as a dashed line; classes without a value
    (absent from both sides) say "n/a". Returns ``path``."""
    plt = _pyplot()
    values = np.asarray(per_class_iou, dtype=np.float64)
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} IoU values but {len(class_names)} class names")
    count = len(values)
    figure, axes = plt.subplots(figsize=(7.5, max(2.5, 0.32 * count + 1.2)))
    positions = np.arange(count)
    shown = np.nan_to_num(values, nan=0.0)
    # Colour by quality (red to green), so weak classes stand out at a glance.
    colours = plt.get_cmap("RdYlGn")(0.15 + 0.7 * shown)
    axes.barh(positions, shown, color=colours, edgecolor="0.35", linewidth=0.6)
    for y, value in zip(positions, values):
        text = "n/a" if math.isnan(value) else f"{value:.3f}"
        axes.text(min(value, 1.0) + 0.01 if not math.isnan(value) else 0.01, y, text, va="center", fontsize=8)
    if mean_iou is None and not np.all(np.isnan(values)):
        mean_iou = float(np.nanmean(values))
    if mean_iou is not None and not math.isnan(mean_iou):
        axes.axvline(mean_iou, color="0.2", linestyle="--", linewidth=1)
        axes.text(mean_iou, -0.9, f" mean {mean_iou:.3f}", fontsize=8, va="bottom")
    axes.set_yticks(positions, [str(name) for name in class_names], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.1)
    axes.set_ylim(count - 0.5, -1.2)
    axes.set_xlabel(metric_name)
    axes.set_title(title or f"{metric_name} per class")
    axes.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def plot_confusion_matrix(
    matrix: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str = "Confusion matrix (rows normalised: share of each true class)",
) -> Path:
    """Heat map of a confusion matrix whose rows are reference classes and columns predicted
    classes, each row divided by its total (so the diagonal is per-class accuracy).

    Args:
        matrix: ``(n, n)`` counts (rows: reference, columns: prediction).
        class_names: ``n`` names.
        path: where the PNG goes.

    Cells are annotated with percentages when there are at most 25 classes; rows of classes
    absent from the references stay empty (white).
    """
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"matrix is {counts.shape} but there are {len(class_names)} class names")
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(totals > 0, counts / totals, np.nan)
    count = len(class_names)
    size = max(4.0, 0.45 * count + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1.0, size))
    colour_map = plt.get_cmap("Blues").with_extremes(bad="white")
    image = axes.imshow(np.ma.masked_invalid(normalised), cmap=colour_map, vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(count)
    names = [str(name) for name in class_names]
    axes.set_xticks(ticks, names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(ticks, names, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title, fontsize=10)
    if count <= 25:
        for row in range(count):
            for column in range(count):
                value = normalised[row, column]
                if math.isnan(value) or value < 0.005:
                    continue
                axes.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                          color="white" if value > 0.5 else "0.15")
    return _save(figure, path)
