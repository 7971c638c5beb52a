"""Panoptic quality on COCO panoptic files: checked by hand on a tiny case, and against an
independent from-definition PQ (per-segment boolean masks, written here) on real-format data
built from CamVid frames with shrunk, relabelled, merged, dropped and invented segments, crowd
and VOID regions. (``panopticapi``, the reference evaluator, is not on the package index.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from omniseg.errors import InputError
from omniseg.evaluation import PanopticQuality, pq_compute

CATEGORIES = [
    {"id": 1, "name": "road", "isthing": 0},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
]


def write_png(path: Path, ids: np.ndarray) -> None:
    ids = ids.astype(np.int64)
    rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def write_dataset(root: Path, name: str, images: list[tuple[np.ndarray, list[dict]]], categories: list[dict]) -> Path:
    annotations = []
    for index, (ids, segments) in enumerate(images):
        file_name = f"img{index:03d}.png"
        write_png(root / name / file_name, ids)
        annotations.append({"image_id": f"img{index}", "file_name": file_name, "segments_info": segments})
    path = root / f"{name}.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": categories,
                                "images": [{"id": a["image_id"]} for a in annotations]}))
    return path


def test_tiny_case_by_hand(tmp_path: Path) -> None:
    # Ground truth (5 x 6): road 1001 = columns 0-2 of rows 0-3 (12 px); car 2002 = rows 0-1,
    # columns 3-4 (4 px); a crowd of cars 2003 = rows 2-3, columns 3-5 (6 px); VOID = rows 0-1,
    # column 5 (2 px); sky 70000 = row 4 (6 px; a large id, so G and B channels are used).
    gt = np.array([
        [1001, 1001, 1001, 2002, 2002, 0],
        [1001, 1001, 1001, 2002, 2002, 0],
        [1001, 1001, 1001, 2003, 2003, 2003],
        [1001, 1001, 1001, 2003, 2003, 2003],
        [70000] * 6,
    ])
    gt_segments = [
        {"id": 1001, "category_id": 1, "iscrowd": 0, "area": 12},
        {"id": 2002, "category_id": 2, "iscrowd": 0, "area": 4},
        {"id": 2003, "category_id": 2, "iscrowd": 1, "area": 6},
        {"id": 70000, "category_id": 3, "iscrowd": 0, "area": 6},
    ]
    pred = np.array([
        [5, 5, 5, 6, 6, 6],
        [5, 5, 7, 6, 6, 6],
        [5, 5, 7, 8, 8, 8],
        [5, 5, 7, 8, 8, 8],
        [9, 9, 0, 0, 0, 0],
    ])
    pred_segments = [
        {"id": 5, "category_id": 1},  # road, 9 px inside the road: IoU 9/12 = 0.75 -> TP
        {"id": 6, "category_id": 2},  # car: 4 px on car 2002 + 2 on VOID: IoU 4/(6+4-4-2) = 1 -> TP
        {"id": 7, "category_id": 2},  # invented car on the road, 3 px, no VOID/crowd -> FP
        {"id": 8, "category_id": 2},  # car on the car crowd, 6/6 > 0.5 covered -> ignored
        {"id": 9, "category_id": 3},  # sky, 2 of 6 px: IoU 1/3 -> sky FN + sky FP
    ]
    gt_json = write_dataset(tmp_path, "gt", [(gt, gt_segments)], CATEGORIES)
    pred_json = write_dataset(tmp_path, "pred", [(pred, pred_segments)], CATEGORIES)
    result = pq_compute(gt_json, pred_json)  # folders default to the JSON paths without .json

    # road: TP 1, IoU sum .75 -> PQ .75, SQ .75, RQ 1.
    # car:  TP 1, FP 1, IoU sum 1 -> PQ = 1/(1 + .5) = 2/3, SQ 1, RQ 2/3.
    # sky:  FP 1, FN 1 -> PQ 0, SQ 0, RQ 0.
    expected_per_class = {1: (0.75, 0.75, 1.0), 2: (2 / 3, 1.0, 2 / 3), 3: (0.0, 0.0, 0.0)}
    for category_id, (pq, sq, rq) in expected_per_class.items():
        got = result["per_class"][category_id]
        assert (got["pq"], got["sq"], got["rq"]) == pytest.approx((pq, sq, rq), abs=1e-12)
    assert result["per_class"][2]["fp"] == 1 and result["per_class"][3]["fn"] == 1
    assert result["All"] == pytest.approx({"pq": (0.75 + 2 / 3) / 3, "sq": 1.75 / 3, "rq": (1 + 2 / 3) / 3, "n": 3})
    assert result["Things"] == pytest.approx({"pq": 2 / 3, "sq": 1.0, "rq": 2 / 3, "n": 1})
    assert result["Stuff"] == pytest.approx({"pq": 0.375, "sq": 0.375, "rq": 0.5, "n": 2})


# ---------------------------------------------------------------- realistic fixture from CamVid
CAMVID_THINGS = {8, 9, 10}  # car, pedestrian, bicyclist
CAMVID_CATEGORIES = [{"id": c + 1, "isthing": int(c in CAMVID_THINGS)} for c in range(11)]


def camvid_panoptic_gt(label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Ground truth from a CamVid label map: stuff classes one segment each, thing classes one
    segment per connected component; unlabelled (11) and a horizontal band are VOID; the
    largest thing component becomes a crowd region."""
    ids = np.zeros(label.shape, np.int64)
    segments = []
    for cls in np.unique(label):
        if cls == 11:
            continue
        if cls in CAMVID_THINGS:
            components, count = ndimage.label(label == cls)
            regions = [components == k for k in range(1, count + 1)]
        else:
            regions = [label == cls]
        for region in regions:
            segment_id = int(rng.integers(1, 1 << 24))  # random ids across all three channels
            while segment_id in {s["id"] for s in segments}:
                segment_id = int(rng.integers(1, 1 << 24))
            ids[region] = segment_id
            segments.append({"id": segment_id, "category_id": int(cls) + 1, "iscrowd": 0})
    ids[100:112] = 0  # a VOID band
    segments = [s for s in segments if (ids == s["id"]).any()]
    things = [s for s in segments if s["category_id"] - 1 in CAMVID_THINGS]
    if things:
        max(things, key=lambda s: (ids == s["id"]).sum())["iscrowd"] = 1
    for s in segments:
        s["area"] = int((ids == s["id"]).sum())
    return ids, segments


def camvid_panoptic_pred(gt: np.ndarray, gt_segments: list[dict], rng: np.random.Generator):
    """A prediction with every kind of error: segments shrunk (eroded), shifted, relabelled,
    merged (all components of a thing class in one segment), dropped, invented (rectangles,
    one of them on the VOID band and one on the crowd region)."""
    pred = np.zeros_like(gt)
    segments = []
    next_id = iter(range(7, 1 << 24, 7919))
    merged_ids: dict[int, int] = {}
    for index, segment in enumerate(gt_segments):
        mask = gt == segment["id"]
        category = segment["category_id"]
        action = index % 6
        if action == 0:  # shrink
            mask = ndimage.binary_erosion(mask, iterations=3)
        elif action == 1:  # relabel to a neighbouring class
            category = category % 11 + 1
        elif action == 2 and category - 1 in CAMVID_THINGS:  # merge all components of the class
            if category in merged_ids:
                pred[mask] = merged_ids[category]
                continue
        elif action == 3:  # drop
            continue
        elif action == 4:  # shift by a lot (IoU likely below 0.5 for small segments)
            mask = np.roll(mask, (int(rng.integers(5, 30)), int(rng.integers(5, 30))), axis=(0, 1))
        if not mask.any():
            continue
        segment_id = next(next_id)
        if action == 2 and category - 1 in CAMVID_THINGS:
            merged_ids[category] = segment_id
        pred[mask] = segment_id
        segments.append({"id": segment_id, "category_id": category})
    crowd = [s for s in gt_segments if s["iscrowd"]]
    inventions = [(slice(95, 115), slice(20, 60), 4)]  # mostly on the VOID band
    if crowd:
        ys, xs = np.nonzero(gt == crowd[0]["id"])
        y, x = int(np.median(ys)), int(np.median(xs))
        inventions.append((slice(y - 1, y + 2), slice(x - 1, x + 2), crowd[0]["category_id"]))  # on the crowd
        inventions.append((slice(y, y + 2), slice(x, x + 2), 1))  # on the crowd, another class
    inventions.append((slice(5, 25), slice(200, 230), 10))  # a pedestrian in the sky
    for rows, cols, category in inventions:
        segment_id = next(next_id)
        pred[rows, cols] = segment_id
        segments.append({"id": segment_id, "category_id": category})
    present = set(np.unique(pred).tolist())
    segments = [s for s in segments if s["id"] in present]
    return pred, segments


def definition_pq(images, categories):
    """PQ from the COCO panoptic definition with boolean masks per segment (independent code).

    images: (gt ids, gt segments, pred ids, pred segments) per image.
    """
    stats = {c["id"]: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for c in categories}
    cases = {"crowd_or_void_forgiven": 0}
    for gt, gt_segments, pred, pred_segments in images:
        void = gt == 0
        matched_gt, matched_pred = set(), set()
        for g in gt_segments:
            if g["iscrowd"]:
                continue
            g_mask = gt == g["id"]
            for p in pred_segments:
                if p["category_id"] != g["category_id"]:
                    continue
                p_mask = pred == p["id"]
                inter = np.logical_and(g_mask, p_mask).sum()
                union = np.logical_or(g_mask, p_mask).sum() - np.logical_and(p_mask, void).sum()
                if inter / union > 0.5:
                    stats[g["category_id"]]["tp"] += 1
                    stats[g["category_id"]]["iou"] += inter / union
                    matched_gt.add(g["id"])
                    matched_pred.add(p["id"])
        for g in gt_segments:
            if not g["iscrowd"] and g["id"] not in matched_gt:
                stats[g["category_id"]]["fn"] += 1
        for p in pred_segments:
            if p["id"] in matched_pred:
                continue
            p_mask = pred == p["id"]
            crowd = np.zeros_like(void)
            for g in gt_segments:
                if g["iscrowd"] and g["category_id"] == p["category_id"]:
                    crowd |= gt == g["id"]
            if np.logical_and(p_mask, void | crowd).sum() / p_mask.sum() > 0.5:
                cases["crowd_or_void_forgiven"] += 1
                continue
            stats[p["category_id"]]["fp"] += 1
    result = {}
    for name, keep in (("All", lambda c: True), ("Things", lambda c: c["isthing"] == 1), ("Stuff", lambda c: c["isthing"] == 0)):
        rows = []
        for c in categories:
            s = stats[c["id"]]
            if not keep(c) or s["tp"] + s["fp"] + s["fn"] == 0:
                continue
            rows.append((s["iou"] / (s["tp"] + s["fp"] / 2 + s["fn"] / 2),
                         s["iou"] / s["tp"] if s["tp"] else 0.0,
                         s["tp"] / (s["tp"] + s["fp"] / 2 + s["fn"] / 2), c["id"]))
        result[name] = {"pq": np.mean([r[0] for r in rows]), "sq": np.mean([r[1] for r in rows]),
                        "rq": np.mean([r[2] for r in rows]), "n": len(rows)}
        if name == "All":
            result["per_class"] = {r[3]: {"pq": r[0], "sq": r[1], "rq": r[2]} for r in rows}
    return result, stats, cases


@pytest.fixture(scope="module")
def camvid_panoptic(camvid_dir: Path, tmp_path_factory):
    rng = np.random.default_rng(11)
    images = []
    for path in sorted((camvid_dir / "labels" / "val").glob("*.png"))[:4]:
        label = np.array(Image.open(path))[::2, ::2]  # 180 x 240, nearest: still real boundaries
        gt, gt_segments = camvid_panoptic_gt(label, rng)
        pred, pred_segments = camvid_panoptic_pred(gt, gt_segments, rng)
        images.append((gt, gt_segments, pred, pred_segments))
    root = tmp_path_factory.mktemp("panoptic")
    gt_json = write_dataset(root, "gt", [(g, gs) for g, gs, _, _ in images], CAMVID_CATEGORIES)
    pred_json = write_dataset(root, "predictions", [(p, ps) for _, _, p, ps in images], CAMVID_CATEGORIES)
    return images, gt_json, pred_json


def test_camvid_fixture_equals_definition(camvid_panoptic) -> None:
    images, gt_json, pred_json = camvid_panoptic
    ours = pq_compute(gt_json, pred_json, gt_folder=gt_json.with_suffix(""), pred_folder=pred_json.with_suffix(""))
    expected, stats, cases = definition_pq(images, CAMVID_CATEGORIES)
    # The fixture exercises every case.
    assert sum(s["tp"] for s in stats.values()) >= 10
    assert sum(s["fp"] for s in stats.values()) >= 5 and sum(s["fn"] for s in stats.values()) >= 5
    assert cases["crowd_or_void_forgiven"] >= 2
    assert expected["Things"]["n"] >= 2 and expected["Stuff"]["n"] >= 5
    for group in ("All", "Things", "Stuff"):
        assert ours[group]["n"] == expected[group]["n"]
        for key in ("pq", "sq", "rq"):
            assert ours[group][key] == pytest.approx(expected[group][key], abs=1e-12), (group, key)
    assert set(ours["per_class"]) == set(expected["per_class"])
    for category_id, figures in expected["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert ours["per_class"][category_id][key] == pytest.approx(figures[key], abs=1e-12)


def test_streaming_form_equals_files(camvid_panoptic) -> None:
    images, gt_json, pred_json = camvid_panoptic
    from_files = pq_compute(gt_json, pred_json)
    first, second = PanopticQuality(CAMVID_CATEGORIES), PanopticQuality({c["id"]: c["isthing"] for c in CAMVID_CATEGORIES})
    for index, (gt, gt_segments, pred, pred_segments) in enumerate(images):
        # The pipeline's form: "label_id" instead of "category_id", -1 for unassigned pixels.
        pipeline_segments = [{"id": s["id"], "label_id": s["category_id"], "score": 0.9} for s in pred_segments]
        pred = np.where(pred == 0, -1, pred)
        (first if index % 2 else second).update(pred, pipeline_segments, gt, gt_segments)
    assert _nested_close(second.merge(first).compute(), from_files)


def _nested_close(a, b) -> bool:
    if isinstance(a, dict):
        assert set(a) == set(b)
        return all(_nested_close(a[k], b[k]) for k in a)
    assert a == pytest.approx(b, abs=1e-12)
    return True


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    ids = np.array([[1, 1], [2, 2]])
    gt_json = write_dataset(tmp_path, "gt", [(ids, [{"id": 1, "category_id": 1, "iscrowd": 0},
                                                     {"id": 2, "category_id": 3, "iscrowd": 0}])], CATEGORIES)
    bad = write_dataset(tmp_path, "pred", [(ids, [{"id": 1, "category_id": 1}])], CATEGORIES)
    with pytest.raises(InputError, match=r"img000\.png.*\[2\].*not in segments_info"):
        pq_compute(gt_json, bad)
    extra = write_dataset(tmp_path, "pred2", [(ids, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 3},
                                                     {"id": 3, "category_id": 3}])], CATEGORIES)
    with pytest.raises(InputError, match="3 is in segments_info but not in the id map"):
        pq_compute(gt_json, extra)
    (tmp_path / "pred2" / "img000.png").unlink()
    with pytest.raises(InputError, match="not found"):
        pq_compute(gt_json, extra)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"annotations": []}))
    with pytest.raises(InputError, match="no prediction for the image"):
        pq_compute(gt_json, empty)
