"""Panoptic quality (PQ, SQ, RQ) with the COCO panoptic definition.

Kirillov et al., "Panoptic Segmentation" (CVPR 2019), as the COCO panoptic evaluator
(``panopticapi``'s ``pq_compute``) implements it:

* a predicted and a ground-truth segment of the same category match when their IoU is
  above 0.5 (which makes matches unique); pixels of the prediction that are VOID in the
  ground truth are left out of the union;
* crowd ground-truth segments (``iscrowd: 1``) are never matched and never false negatives;
* an unmatched predicted segment is not a false positive when more than half of it lies on
  VOID plus the crowd region of its own category (the last crowd segment of that category
  listed for the image, as the reference evaluator does);
* per category ``PQ = sum(IoU of matches) / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU) / TP``,
  ``RQ = TP / (TP + FP/2 + FN/2)``; the "All" / "Things" / "Stuff" figures average over the
  categories with at least one TP, FP or FN (``n`` says how many).

The ground-truth area of a segment is its JSON ``area`` when given (the reference evaluator
reads it from there) and its pixel count otherwise; predicted areas are always counted.

``PanopticQuality`` is the streaming in-memory form (an id map and segments per image);
``pq_compute`` reads COCO panoptic files (PNG id maps ``R + 256 G + 256^2 B`` and JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from omniseg.errors import InputError

VOID = 0


@dataclass
class CategoryStats:
    """Running counts of one category."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    def __iadd__(self, other: "CategoryStats") -> "CategoryStats":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        return self


def rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (H, W, 3) -> segment ids ``R + 256 G + 256^2 B`` (uint32)."""
    color = np.asarray(color)
    if color.ndim == 2:
        return color.astype(np.uint32)
    color = color[..., :3].astype(np.uint32)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids (H, W) -> COCO panoptic PNG colours (H, W, 3) uint8."""
    ids = np.asarray(ids).astype(np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256) % 256], axis=-1).astype(np.uint8)


def _normalise_categories(categories: Any) -> dict[int, bool]:
    """Categories as ``{id: isthing}`` from a COCO list, ``{id: info}`` or ``{id: bool}``."""
    if isinstance(categories, Mapping):
        result = {}
        for key, value in categories.items():
            isthing = value.get("isthing", 0) if isinstance(value, Mapping) else value
            result[int(key)] = bool(isthing)
        return result
    return {int(c["id"]): bool(c.get("isthing", 0)) for c in categories}


def _as_id_map(ids: Any, what: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim == 3 and ids.shape[-1] in (3, 4):
        ids = rgb2id(ids)
    if ids.ndim != 2:
        raise InputError(what, f"expected a (H, W) segment-id map, got shape {ids.shape}")
    if ids.dtype.kind not in "iub":
        raise InputError(what, f"segment ids must be integers, got {ids.dtype}")
    return ids.astype(np.int64)


def _category_of(segment: Mapping[str, Any]) -> int:
    # The pipeline / post-processing outputs say "label_id"; COCO files say "category_id".
    if "category_id" in segment:
        return int(segment["category_id"])
    return int(segment["label_id"])


class PanopticQuality:
    """Streaming panoptic quality over images given as id maps plus segment lists.

    Args:
        categories: COCO ``categories`` list (``id``, ``isthing``), or ``{id: isthing}``.

    ``update`` per image; ``compute`` returns ``{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"},
    "per_class": {category_id: {"pq", "sq", "rq", "tp", "fp", "fn"}}}`` (``per_class`` lists the
    categories with at least one TP, FP or FN). ``merge`` adds another instance's counts.
    """

    def __init__(self, categories: Any) -> None:
        self.categories = _normalise_categories(categories)
        self.stats: dict[int, CategoryStats] = {}

    def reset(self) -> None:
        self.stats = {}

    def _stat(self, category_id: int) -> CategoryStats:
        if category_id not in self.stats:
            self.stats[category_id] = CategoryStats()
        return self.stats[category_id]

    def merge(self, other: "PanopticQuality") -> "PanopticQuality":
        """Add ``other``'s counts (for example another worker's) into this one; returns ``self``."""
        for category_id, stat in other.stats.items():
            self._stat(category_id).__iadd__(stat)
        return self

    def update(
        self,
        pred_ids: Any,
        pred_segments: Sequence[Mapping[str, Any]],
        gt_ids: Any,
        gt_segments: Sequence[Mapping[str, Any]],
        image: str = "image",
    ) -> None:
        """Count one image.

        Args:
            pred_ids: (H, W) predicted segment ids (or an (H, W, 3) COCO panoptic colour image);
                0 and negative values are VOID (unassigned).
            pred_segments: ``{"id", "category_id"}`` (or ``"label_id"``) per predicted segment.
            gt_ids: (H, W) ground-truth segment ids (or colours); 0 is VOID.
            gt_segments: ``{"id", "category_id", "iscrowd"?, "area"?}`` per ground-truth segment.
            image: a name for error messages.
        """
        pred = _as_id_map(pred_ids, f"{image} (prediction)")
        gt = _as_id_map(gt_ids, f"{image} (ground truth)")
        if pred.shape != gt.shape:
            raise InputError(image, f"prediction is {pred.shape[::-1]} (W, H) but ground truth is {gt.shape[::-1]}")
        pred[pred < 0] = VOID

        # Compact indices: 0 is VOID on both sides; ground-truth ids the JSON does not list go
        # to a last bucket that is neither VOID nor a segment (the reference skips them too).
        gt_info = {int(s["id"]): s for s in gt_segments}
        pred_info = {int(s["id"]): s for s in pred_segments}
        for segment_id, segment in pred_info.items():
            if _category_of(segment) not in self.categories:
                raise InputError(image, f"predicted segment {segment_id} has unknown category {_category_of(segment)}")
        gt_keys = np.array([VOID] + sorted(gt_info), dtype=np.int64)
        pred_keys = np.array([VOID] + sorted(pred_info), dtype=np.int64)

        pred_index = np.searchsorted(pred_keys, pred).clip(max=len(pred_keys) - 1)
        unknown = pred_keys[pred_index] != pred
        if unknown.any():
            missing = sorted(set(np.unique(pred[unknown]).tolist()))
            raise InputError(image, f"predicted segment ids {missing[:10]} are in the id map but not in segments_info")
        gt_index = np.searchsorted(gt_keys, gt).clip(max=len(gt_keys) - 1)
        gt_index[gt_keys[gt_index] != gt] = len(gt_keys)
        n_gt, n_pred = len(gt_keys) + 1, len(pred_keys)
        joint = np.bincount((gt_index * n_pred + pred_index).ravel(), minlength=n_gt * n_pred)
        intersections = joint.reshape(n_gt, n_pred)

        pred_area = intersections.sum(axis=0)
        for j, segment_id in enumerate(pred_keys[1:].tolist(), start=1):
            if pred_area[j] == 0:
                raise InputError(image, f"predicted segment {segment_id} is in segments_info but not in the id map")
        gt_pixels = intersections.sum(axis=1)
        gt_area = {
            segment_id: float(gt_info[segment_id]["area"]) if "area" in gt_info[segment_id] else float(gt_pixels[i])
            for i, segment_id in enumerate(gt_keys[1:].tolist(), start=1)
        }
        pred_void = intersections[0]  # per predicted segment: pixels on ground-truth VOID

        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        rows, cols = np.nonzero(intersections[1 : len(gt_keys), 1:])
        for i, j in zip((rows + 1).tolist(), (cols + 1).tolist()):
            gt_id, pred_id = int(gt_keys[i]), int(pred_keys[j])
            gt_segment = gt_info[gt_id]
            if gt_segment.get("iscrowd", 0) == 1:
                continue
            category = _category_of(gt_segment)
            if category != _category_of(pred_info[pred_id]):
                continue
            intersection = float(intersections[i, j])
            union = float(pred_area[j]) + gt_area[gt_id] - intersection - float(pred_void[j])
            iou = intersection / union
            if iou > 0.5:
                stat = self._stat(category)
                stat.tp += 1
                stat.iou += iou
                gt_matched.add(gt_id)
                pred_matched.add(pred_id)

        crowd_by_category: dict[int, int] = {}
        for i, gt_id in enumerate(gt_keys[1:].tolist(), start=1):
            if gt_id in gt_matched:
                continue
            gt_segment = gt_info[gt_id]
            if gt_segment.get("iscrowd", 0) == 1:
                crowd_by_category[_category_of(gt_segment)] = i
                continue
            self._stat(_category_of(gt_segment)).fn += 1

        for j, pred_id in enumerate(pred_keys[1:].tolist(), start=1):
            if pred_id in pred_matched:
                continue
            category = _category_of(pred_info[pred_id])
            covered = float(pred_void[j])
            if category in crowd_by_category:
                covered += float(intersections[crowd_by_category[category], j])
            # Mostly on VOID or on a crowd region of its own class: not counted against it.
            if covered / float(pred_area[j]) > 0.5:
                continue
            self._stat(category).fp += 1

    def _average(self, isthing: bool | None) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        totals = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        per_class: dict[int, dict[str, float]] = {}
        for category_id, category_isthing in self.categories.items():
            if isthing is not None and category_isthing != isthing:
                continue
            stat = self.stats.get(category_id, CategoryStats())
            if stat.tp + stat.fp + stat.fn == 0:
                continue
            denominator = stat.tp + 0.5 * stat.fp + 0.5 * stat.fn
            figures = {
                "pq": stat.iou / denominator,
                "sq": stat.iou / stat.tp if stat.tp else 0.0,
                "rq": stat.tp / denominator,
            }
            per_class[category_id] = {**figures, "tp": stat.tp, "fp": stat.fp, "fn": stat.fn}
            for key in totals:
                totals[key] += figures[key]
        n = len(per_class)
        # No category of the group occurred: the average is undefined (the reference divides by 0).
        averaged = {key: (value / n if n else float("nan")) for key, value in totals.items()}
        return {**averaged, "n": n}, per_class

    def compute(self) -> dict[str, Any]:
        """PQ / SQ / RQ for all categories, things, stuff, and per class."""
        result: dict[str, Any] = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            result[name], per_class = self._average(isthing)
            if name == "All":
                result["per_class"] = per_class
        return result


def _read_id_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(path, "panoptic PNG not found")
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB") if image.mode not in ("RGB", "I", "I;16", "L") else image)
    except (OSError, ValueError) as error:
        raise InputError(path, f"cannot read the panoptic PNG ({error})") from error
    return rgb2id(array).astype(np.int64)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise InputError(path, "file not found") from error
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a readable JSON file ({error})") from error


def pq_compute(
    gt_json_file: str | Path,
    pred_json_file: str | Path,
    gt_folder: str | Path | None = None,
    pred_folder: str | Path | None = None,
) -> dict[str, Any]:
    """Panoptic quality of COCO panoptic predictions against COCO panoptic ground truth.

    Args:
        gt_json_file: ground-truth JSON (``annotations`` with ``image_id``, ``file_name``,
            ``segments_info``; ``categories`` with ``id`` and ``isthing``).
        pred_json_file: predictions JSON (``annotations`` in the same form).
        gt_folder: folder of the ground-truth PNGs; default: the JSON's path without ``.json``.
        pred_folder: folder of the predicted PNGs; default likewise.

    Returns:
        ``{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {category_id: {...}}}``.

    Raises:
        InputError: a missing or unreadable file, an image without prediction, or a prediction
            whose PNG and ``segments_info`` disagree.
    """
    gt_json_file, pred_json_file = Path(gt_json_file), Path(pred_json_file)
    gt_folder = Path(gt_folder) if gt_folder is not None else gt_json_file.with_suffix("")
    pred_folder = Path(pred_folder) if pred_folder is not None else pred_json_file.with_suffix("")
    gt_json, pred_json = _read_json(gt_json_file), _read_json(pred_json_file)
    for path, content, key in ((gt_json_file, gt_json, "annotations"), (gt_json_file, gt_json, "categories"),
                               (pred_json_file, pred_json, "annotations")):
        if key not in content:
            raise InputError(path, f"no '{key}' list")

    metric = PanopticQuality(gt_json["categories"])
    predictions = {annotation["image_id"]: annotation for annotation in pred_json["annotations"]}
    for gt_annotation in gt_json["annotations"]:
        image_id = gt_annotation["image_id"]
        if image_id not in predictions:
            raise InputError(pred_json_file, f"no prediction for the image with id {image_id!r}")
        pred_annotation = predictions[image_id]
        pred_png = pred_folder / pred_annotation["file_name"]
        metric.update(
            _read_id_png(pred_png),
            pred_annotation["segments_info"],
            _read_id_png(gt_folder / gt_annotation["file_name"]),
            gt_annotation["segments_info"],
            image=str(pred_png),
        )
    return metric.compute()
