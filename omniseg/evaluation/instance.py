"""COCO mask AP through pycocotools' ``COCOeval``.

omniseg only turns masks into COCO structures (RLE via ``pycocotools.mask``); the matching,
interpolated precision and area ranges are pycocotools' own, so the figures are the COCO
figures by construction.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from omniseg.errors import InputError

# COCOeval.stats order for iouType "segm".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _binary_masks(masks: Any, what: str) -> np.ndarray:
    """(N, H, W) bool masks from a tensor, an array, or a list of 2-D masks / PIL "L" images."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, (list, tuple)):
        if not masks:
            return np.zeros((0, 0, 0), dtype=bool)
        masks = np.stack([np.asarray(m) for m in masks])
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise InputError(what, f"expected (N, H, W) masks, got shape {masks.shape}")
    # PIL "L" masks are 0/255, probabilities 0..1: anything above half of the top value is in.
    if masks.dtype == bool:
        return masks
    if masks.dtype == np.uint8:
        return masks > 127 if masks.max(initial=0) > 1 else masks > 0
    return masks > 0.5


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """One binary (H, W) mask -> COCO compressed RLE with a JSON-ready ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def masks_to_coco_results(
    image_id: int,
    masks: Any,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    scores: Sequence[float] | np.ndarray | torch.Tensor,
) -> list[dict[str, Any]]:
    """Predicted instances of one image -> COCO results (``image_id``, ``category_id``,
    ``segmentation`` as RLE, ``score``), the form ``COCO.loadRes`` reads.

    Args:
        image_id: the image's id in the ground truth.
        masks: (N, H, W) binary masks (bool, 0/1, 0/255 or probabilities thresholded at 0.5).
        labels: N category ids.
        scores: N confidences.
    """
    binary = _binary_masks(masks, f"image {image_id} predictions")
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    scores = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).reshape(-1)
    if not (len(binary) == len(labels) == len(scores)) and len(labels):
        raise InputError(
            f"image {image_id}", f"{len(binary)} masks but {len(labels)} labels and {len(scores)} scores"
        )
    return [
        {"image_id": image_id, "category_id": int(label), "segmentation": encode_mask(mask), "score": float(score)}
        for mask, label, score in zip(binary, labels, scores)
    ]


def pipeline_to_coco_results(
    image_id: int, segments: Iterable[Mapping[str, Any]], label2id: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The image-segmentation pipeline's instance output (``{"score", "label", "mask"}`` with
    PIL "L" masks and class names) -> COCO results, names mapped through ``label2id``."""
    results = []
    for segment in segments:
        if segment["label"] not in label2id:
            raise InputError(f"image {image_id}", f"label {segment['label']!r} is not in label2id")
        mask = _binary_masks(np.asarray(segment["mask"]), f"image {image_id}")[0]
        results.append(
            {
                "image_id": image_id,
                "category_id": int(label2id[segment["label"]]),
                "segmentation": encode_mask(mask),
                "score": float(segment["score"] if segment["score"] is not None else 1.0),
            }
        )
    return results


def _coco_from_dataset(dataset: Mapping[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dict(dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _load_gt(ground_truth: COCO | Mapping[str, Any] | str | Path) -> COCO:
    if isinstance(ground_truth, COCO):
        return ground_truth
    if isinstance(ground_truth, (str, Path)):
        path = Path(ground_truth)
        try:
            dataset = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise InputError(path, "COCO annotation file not found") from error
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(path, f"not a readable COCO JSON file ({error})") from error
        return _coco_from_dataset(dataset)
    return _coco_from_dataset(ground_truth)


def evaluate_coco_masks(
    ground_truth: COCO | Mapping[str, Any] | str | Path,
    results: Sequence[Mapping[str, Any]] | str | Path,
    per_class: bool = True,
) -> dict[str, Any]:
    """COCO mask AP of ``results`` against ``ground_truth`` (COCOeval, iouType "segm").

    Args:
        ground_truth: a COCO instances JSON path, its loaded dict, or a ``COCO`` object
            (polygon or RLE segmentations).
        results: COCO results (a list or a JSON path), e.g. from :func:`masks_to_coco_results`.
        per_class: also report AP per category (from COCOeval's precision array).

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` (COCOeval's ``stats``:
        -1 where undefined, e.g. no ground truth of that size) and, with ``per_class``,
        ``per_class_AP`` ``{category_id: AP}`` (NaN for categories without ground truth).
    """
    coco_gt = _load_gt(ground_truth)
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    results = list(results)
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:
            # loadRes cannot take an empty list; an empty result set simply scores 0.
            coco_dt = _coco_from_dataset({"images": coco_gt.dataset.get("images", []),
                                          "categories": coco_gt.dataset.get("categories", []),
                                          "annotations": []})
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics: dict[str, Any] = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    if per_class:
        # precision: [IoU thresholds, recall points, categories, area ranges, max detections];
        # area "all" and the largest maxDets, as the headline AP uses.
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_class_ap = {}
        for k, category_id in enumerate(evaluator.params.catIds):
            values = precision[:, :, k]
            values = values[values > -1]
            per_class_ap[int(category_id)] = float(values.mean()) if values.size else float("nan")
        metrics["per_class_AP"] = per_class_ap
    return metrics


class InstanceSegmentationMetric:
    """Streaming COCO mask AP: ``update`` per image with predicted and ground-truth masks,
    ``compute`` runs COCOeval. Masks are kept as compressed RLE only, so memory stays small.

    Args:
        categories: category ids, or COCO ``categories`` dicts (``id``, ``name``).

    Example::

        metric = InstanceSegmentationMetric(categories=[1, 2, 3])
        metric.update(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels)
        metric.compute()["AP"]
    """

    def __init__(self, categories: Iterable[int] | Iterable[Mapping[str, Any]]) -> None:
        self.categories = [
            {"id": int(c["id"]), "name": str(c.get("name", c["id"]))} if isinstance(c, Mapping)
            else {"id": int(c), "name": str(c)}
            for c in categories
        ]
        self.reset()

    def reset(self) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def update(
        self,
        pred_masks: Any,
        pred_labels: Sequence[int] | np.ndarray | torch.Tensor,
        pred_scores: Sequence[float] | np.ndarray | torch.Tensor,
        gt_masks: Any,
        gt_labels: Sequence[int] | np.ndarray | torch.Tensor,
        gt_iscrowd: Sequence[int] | None = None,
    ) -> int:
        """Add one image; returns the image id it was given."""
        image_id = len(self.images) + 1
        gt = _binary_masks(gt_masks, f"image {image_id} ground truth")
        gt_labels = np.asarray(gt_labels.cpu() if isinstance(gt_labels, torch.Tensor) else gt_labels).reshape(-1)
        if len(gt) != len(gt_labels):
            raise InputError(f"image {image_id}", f"{len(gt)} ground-truth masks but {len(gt_labels)} labels")
        preds = _binary_masks(pred_masks, f"image {image_id} predictions")
        if len(gt):
            height, width = gt.shape[1:]
        elif len(preds):
            height, width = preds.shape[1:]
        else:
            height, width = 0, 0
        self.images.append({"id": image_id, "height": int(height), "width": int(width)})
        crowd = [0] * len(gt) if gt_iscrowd is None else [int(c) for c in gt_iscrowd]
        for mask, label, iscrowd in zip(gt, gt_labels, crowd):
            rle = encode_mask(mask)
            self.annotations.append(
                {
                    # COCOeval treats annotation id 0 as "unmatched", so ids start at 1.
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": iscrowd,
                }
            )
        self.results.extend(masks_to_coco_results(image_id, preds, pred_labels, pred_scores))
        return image_id

    def merge(self, other: "InstanceSegmentationMetric") -> "InstanceSegmentationMetric":
        """Append ``other``'s images (for example another worker's), renumbering their image and
        annotation ids after this metric's; returns ``self``."""
        image_offset, annotation_offset = len(self.images), len(self.annotations)
        self.images += [{**image, "id": image["id"] + image_offset} for image in other.images]
        self.annotations += [
            {**a, "id": a["id"] + annotation_offset, "image_id": a["image_id"] + image_offset}
            for a in other.annotations
        ]
        self.results += [{**r, "image_id": r["image_id"] + image_offset} for r in other.results]
        return self

    def ground_truth(self) -> dict[str, Any]:
        """The ground truth seen so far as a COCO instances dataset (JSON-ready)."""
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}

    def compute(self, per_class: bool = True) -> dict[str, Any]:
        """COCO mask AP over every image seen since the last ``reset`` (see :func:`evaluate_coco_masks`)."""
        return evaluate_coco_masks(self.ground_truth(), self.results, per_class=per_class)
