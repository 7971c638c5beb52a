"""COCO mask AP: omniseg's conversion + evaluation gives exactly what pycocotools gives when
run directly on the same predictions; perfect predictions score 1."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from omniseg.evaluation import InstanceSegmentationMetric, evaluate_coco_masks, masks_to_coco_results
from omniseg.evaluation.instance import pipeline_to_coco_results

THINGS = {8: "car", 9: "pedestrian", 10: "bicyclist"}


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode()
    return encoded


@pytest.fixture(scope="module")
def camvid_instances(camvid_dir: Path):
    """Per image: ground-truth instances (connected components of the thing classes of real
    CamVid labels) and predictions made from them with realistic errors."""
    rng = np.random.default_rng(7)
    images = []
    for path in sorted((camvid_dir / "labels" / "val").glob("*.png"))[:5]:
        label = np.array(Image.open(path))
        gt_masks, gt_labels = [], []
        for cls in THINGS:
            components, count = ndimage.label(label == cls)
            for k in range(1, count + 1):
                gt_masks.append(components == k)
                gt_labels.append(cls)
        pred_masks, pred_labels, pred_scores = [], [], []
        for i, (mask, cls) in enumerate(zip(gt_masks, gt_labels)):
            kind = i % 5
            if kind == 0:
                mask = ndimage.binary_dilation(mask, iterations=2)
            elif kind == 1:
                mask = ndimage.binary_erosion(mask, iterations=1) if mask.sum() > 40 else mask
            elif kind == 2:
                mask = np.roll(mask, (2, 3), axis=(0, 1))
            elif kind == 3:
                cls = 8 if cls != 8 else 9  # wrong class
            if kind == 4 and i % 10 == 4:
                continue  # missed
            pred_masks.append(mask)
            pred_labels.append(cls)
            pred_scores.append(float(rng.uniform(0.3, 1.0)))
        for _ in range(2):  # invented detections
            y, x = rng.integers(0, 300), rng.integers(0, 420)
            mask = np.zeros(label.shape, bool)
            mask[y : y + 40, x : x + 30] = True
            pred_masks.append(mask)
            pred_labels.append(int(rng.choice(list(THINGS))))
            pred_scores.append(float(rng.uniform(0.1, 0.9)))
        images.append((np.array(gt_masks), gt_labels, np.array(pred_masks), pred_labels, pred_scores))
    return images


def coco_gt_dataset(images) -> dict:
    dataset = {"images": [], "annotations": [], "categories": [{"id": c, "name": n} for c, n in THINGS.items()]}
    for image_id, (gt_masks, gt_labels, *_rest) in enumerate(images, start=1):
        dataset["images"].append({"id": image_id, "height": gt_masks.shape[1], "width": gt_masks.shape[2]})
        for mask, label in zip(gt_masks, gt_labels):
            encoded = rle(mask)
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id, "category_id": label,
                "segmentation": encoded, "area": float(mask.sum()),
                "bbox": list(mask_utils.toBbox(encoded)), "iscrowd": 0,
            })
    # One polygon annotation (a rectangle), as COCO instances files usually have.
    dataset["annotations"].append({
        "id": len(dataset["annotations"]) + 1, "image_id": 1, "category_id": 9,
        "segmentation": [[10.0, 10.0, 60.0, 10.0, 60.0, 50.0, 10.0, 50.0]],
        "area": 2000.0, "bbox": [10.0, 10.0, 50.0, 40.0], "iscrowd": 0,
    })
    return dataset


def pycocotools_stats(gt_path: Path, results: list[dict]) -> np.ndarray:
    """pycocotools run directly, the way its README does."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_ap_equals_pycocotools(camvid_instances, tmp_path: Path) -> None:
    gt_path = tmp_path / "instances.json"
    gt_path.write_text(json.dumps(coco_gt_dataset(camvid_instances)))
    results = []
    for image_id, (_, _, pred_masks, pred_labels, pred_scores) in enumerate(camvid_instances, start=1):
        results += masks_to_coco_results(image_id, pred_masks, pred_labels, pred_scores)
    ours = evaluate_coco_masks(gt_path, results)
    direct = pycocotools_stats(gt_path, json.loads(json.dumps(results)))
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    np.testing.assert_array_equal([ours[n] for n in names], direct)
    assert 0.05 < ours["AP"] < 0.95  # imperfect (CamVid has many tiny thing fragments)
    per_class = [v for v in ours["per_class_AP"].values() if not np.isnan(v)]
    assert np.mean(per_class) == pytest.approx(ours["AP"], abs=1e-12)  # every class has ground truth here

    # Results given as a JSON file read the same.
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    assert evaluate_coco_masks(gt_path, results_path)["AP"] == ours["AP"]


def test_streaming_metric_equals_pycocotools(camvid_instances, tmp_path: Path) -> None:
    metric = InstanceSegmentationMetric(categories=list(THINGS))
    for gt_masks, gt_labels, pred_masks, pred_labels, pred_scores in camvid_instances:
        # masks as 0/255 uint8 (as the pipeline's PIL masks are) on the prediction side
        metric.update(pred_masks.astype(np.uint8) * 255, pred_labels, pred_scores, gt_masks, gt_labels)
    ours = metric.compute()
    # Two workers' metrics merged give the same figures.
    first, second = InstanceSegmentationMetric(categories=list(THINGS)), InstanceSegmentationMetric(categories=list(THINGS))
    for index, (gt_masks, gt_labels, pred_masks, pred_labels, pred_scores) in enumerate(camvid_instances):
        (first if index < 2 else second).update(pred_masks, pred_labels, pred_scores, gt_masks, gt_labels)
    assert first.merge(second).compute() == ours
    dataset = coco_gt_dataset(camvid_instances)
    dataset["annotations"].pop()  # no polygon here
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(dataset))
    results = []
    for image_id, (_, _, pred_masks, pred_labels, pred_scores) in enumerate(camvid_instances, start=1):
        for mask, label, score in zip(pred_masks, pred_labels, pred_scores):
            results.append({"image_id": image_id, "category_id": label, "segmentation": rle(mask), "score": score})
    direct = pycocotools_stats(gt_path, results)
    np.testing.assert_array_equal([ours[n] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")], direct[:6])


def test_perfect_predictions_score_one(camvid_instances) -> None:
    metric = InstanceSegmentationMetric(categories=[{"id": c, "name": n} for c, n in THINGS.items()])
    for gt_masks, gt_labels, *_ in camvid_instances:
        metric.update(gt_masks, gt_labels, np.ones(len(gt_labels)), gt_masks, gt_labels)
    result = metric.compute()
    assert result["AP"] == 1.0 and result["AP50"] == 1.0 and result["AP75"] == 1.0
    assert all(v == 1.0 for v in result["per_class_AP"].values())


def test_empty_predictions_and_pipeline_output() -> None:
    gt = np.zeros((1, 20, 30), bool)
    gt[0, 5:15, 5:20] = True
    metric = InstanceSegmentationMetric(categories=[1, 2])
    metric.update(np.zeros((0, 20, 30), bool), [], [], gt, [1])
    result = metric.compute()
    assert result["AP"] == 0.0 and np.isnan(result["per_class_AP"][2])

    segments = [{"score": 0.9, "label": "cat", "mask": Image.fromarray(gt[0].astype(np.uint8) * 255).convert("L")}]
    results = pipeline_to_coco_results(1, segments, {"cat": 1})
    assert results[0]["category_id"] == 1 and results[0]["score"] == 0.9
    assert mask_utils.area(results[0]["segmentation"]) == 150
    dataset = {"images": [{"id": 1, "height": 20, "width": 30}], "categories": [{"id": 1}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle(gt[0]),
                                "area": 150.0, "bbox": [5, 5, 15, 10], "iscrowd": 0}]}
    assert evaluate_coco_masks(dataset, results)["AP"] == pytest.approx(1.0, abs=1e-12)
