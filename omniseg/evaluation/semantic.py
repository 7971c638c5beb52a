"""Semantic segmentation metrics: IoU, accuracy, Dice, frequency-weighted IoU.

``mean_iou`` takes the arguments of the seeds' ``evaluate.load("mean_iou").compute(...)``
and returns the same keys with the same values; ``SemanticSegmentationMetric`` is its
streaming form. Both are computed from a :class:`~omniseg.evaluation.confusion.ConfusionMatrix`.

Definitions, per class ``c`` with ``I`` the intersection (true positives), ``P`` the predicted
area and ``R`` the reference area (ignored pixels left out):

* IoU ``I / (P + R - I)``; accuracy (recall) ``I / R``; Dice ``2 I / (P + R)``;
* NaN where the denominator is 0 (a class absent from both sides; for accuracy, absent
  from the references), and means skip NaN (``np.nanmean``), as ``evaluate`` does;
* overall accuracy ``sum(I) / sum(R)``;
* frequency-weighted IoU ``sum_c (R_c / sum(R)) * IoU_c`` over classes with ``R_c > 0``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from omniseg.evaluation.confusion import ConfusionMatrix, LabelMaps


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return numerator / denominator


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        # An all-NaN input (nothing counted yet) is a legitimate NaN result, not a warning.
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return float(np.nanmean(values)) if values.size else float("nan")


def metrics_from_areas(
    intersection: np.ndarray,
    predicted: np.ndarray,
    reference: np.ndarray,
    nan_to_num: float | None = None,
) -> dict[str, Any]:
    """All semantic metrics from per-class ``(intersection, predicted area, reference area)``.

    Returns a dict with ``mean_iou``, ``mean_accuracy``, ``overall_accuracy`` (floats),
    ``per_category_iou``, ``per_category_accuracy`` (float64 arrays) as ``evaluate``'s
    mean_iou does, plus ``per_category_dice``, ``mean_dice`` and ``frequency_weighted_iou``.
    With ``nan_to_num`` every NaN (scalars and arrays alike) is replaced by that number.
    """
    intersection = np.asarray(intersection, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    union = predicted + reference - intersection
    iou = _safe_divide(intersection, union)
    accuracy = _safe_divide(intersection, reference)
    dice = _safe_divide(2.0 * intersection, predicted + reference)
    total = reference.sum()
    present = reference > 0
    frequency_weighted = float((reference[present] / total * iou[present]).sum()) if total > 0 else float("nan")
    metrics: dict[str, Any] = {
        "mean_iou": _nanmean(iou),
        "mean_accuracy": _nanmean(accuracy),
        "overall_accuracy": float(_safe_divide(intersection.sum(), total)),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
        "mean_dice": _nanmean(dice),
        "per_category_dice": dice,
        "frequency_weighted_iou": frequency_weighted,
    }
    if nan_to_num is not None:
        metrics = {
            key: (np.nan_to_num(value, nan=nan_to_num) if isinstance(value, np.ndarray)
                  else float(np.nan_to_num(value, nan=nan_to_num)))
            for key, value in metrics.items()
        }
    return metrics


def metrics_from_confusion(confusion: ConfusionMatrix, nan_to_num: float | None = None) -> dict[str, Any]:
    """All semantic metrics (see :func:`metrics_from_areas`) from a confusion matrix."""
    return metrics_from_areas(*confusion.areas(), nan_to_num=nan_to_num)


class SemanticSegmentationMetric:
    """Streaming semantic metrics: ``update`` per batch, ``compute`` at the end, ``reset`` to reuse.

    Args: as :func:`mean_iou` (without the maps). ``all_reduce()`` sums the counts over a
    ``torch.distributed`` group before ``compute`` in a distributed run; ``merge(other)``
    does the same for metrics gathered some other way.

    Example::

        metric = SemanticSegmentationMetric(num_labels=11, ignore_index=11)
        for batch in loader:
            metric.update(model_predictions, batch["labels"])   # (B, H, W) class ids
        print(metric.compute()["mean_iou"])
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int | None = 255,
        reduce_labels: bool = False,
        nan_to_num: float | None = None,
        label_map: Mapping[int, int] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.confusion = ConfusionMatrix(num_labels, ignore_index, reduce_labels, label_map, device)
        self.nan_to_num = nan_to_num

    @property
    def num_labels(self) -> int:
        return self.confusion.num_labels

    def update(self, predictions: LabelMaps, references: LabelMaps) -> None:
        """Count a map, a ``(B, H, W)`` batch, or a list of maps against their references."""
        self.confusion.update(predictions, references)

    def compute(self) -> dict[str, Any]:
        """The metrics over everything seen since the last ``reset`` (see :func:`metrics_from_areas`)."""
        return metrics_from_confusion(self.confusion, self.nan_to_num)

    def reset(self) -> None:
        self.confusion.reset()

    def merge(self, other: "SemanticSegmentationMetric") -> "SemanticSegmentationMetric":
        """Add ``other``'s counts into this metric (in place); returns ``self``."""
        self.confusion.merge(other.confusion)
        return self

    def all_reduce(self, group: Any = None) -> "SemanticSegmentationMetric":
        """Sum counts over the ``torch.distributed`` group (no-op when not distributed)."""
        self.confusion.all_reduce(group)
        return self

    def confusion_matrix(self, normalize: str | None = None) -> np.ndarray:
        """The ``(num_labels, num_labels)`` matrix, rows reference, columns prediction.

        Args:
            normalize: ``None`` for counts, ``"true"`` to divide each row by its total (so the
                diagonal is per-class accuracy), ``"pred"`` for columns, ``"all"`` for the sum.
        """
        matrix = self.confusion.compute().to(torch.float64).numpy()
        if normalize is None:
            return matrix
        if normalize == "true":
            return np.nan_to_num(_safe_divide(matrix, matrix.sum(axis=1, keepdims=True)))
        if normalize == "pred":
            return np.nan_to_num(_safe_divide(matrix, matrix.sum(axis=0, keepdims=True)))
        if normalize == "all":
            return np.nan_to_num(_safe_divide(matrix, matrix.sum()))
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")


def mean_iou(
    predictions: LabelMaps,
    references: LabelMaps,
    num_labels: int,
    ignore_index: int | None,
    reduce_labels: bool = False,
    nan_to_num: float | None = None,
    label_map: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """Mean IoU and friends over lists of label maps, as ``evaluate``'s ``mean_iou`` computes them.

    Args:
        predictions: predicted class-id maps: a list of (H, W) arrays/tensors/PIL images
            (sizes may differ between images) or one (B, H, W) array.
        references: reference maps, the same shapes.
        num_labels: number of classes.
        ignore_index: reference value left out of every count (after ``label_map`` and
            ``reduce_labels``).
        reduce_labels: reference 0 -> ignored (255), every other reference label minus one.
        nan_to_num: replace NaN (classes absent from both sides) with this number.
        label_map: ``{old: new}`` applied to the references first.

    Returns:
        ``mean_iou``, ``mean_accuracy``, ``overall_accuracy``, ``per_category_iou``,
        ``per_category_accuracy`` (``evaluate``'s keys and values), plus ``per_category_dice``,
        ``mean_dice`` and ``frequency_weighted_iou``.
    """
    metric = SemanticSegmentationMetric(num_labels, ignore_index, reduce_labels, nan_to_num, label_map)
    if isinstance(predictions, Sequence) and isinstance(references, Sequence) and len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    metric.update(predictions, references)
    return metric.compute()
