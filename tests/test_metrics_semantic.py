"""Semantic metrics: equal to a from-definition computation, to torchmetrics, and to the
algorithm of ``evaluate``'s ``mean_iou`` (the seeds' metric), on real CamVid labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniseg.evaluation import ConfusionMatrix, SemanticSegmentationMetric, mean_iou

NUM_LABELS = 11
IGNORE = 11  # CamVid's "unlabelled"


def evaluate_mean_iou_reference(preds, refs, num_labels, ignore_index, label_map=None, reduce_labels=False):
    """``evaluate``'s mean_iou algorithm, written out (its hub script cannot be fetched offline):
    per image, references remapped, ignored pixels dropped, then ``np.histogram`` areas."""
    inter_t = np.zeros(num_labels)
    pred_t = np.zeros(num_labels)
    label_t = np.zeros(num_labels)
    for pred, label in zip(preds, refs):
        pred = np.array(pred)
        label = np.array(label)
        if label_map is not None:
            original = label.copy()
            for old, new in label_map.items():
                label[original == old] = new
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
        hist = lambda x: np.histogram(x, bins=num_labels, range=(0, num_labels - 1))[0]  # noqa: E731
        inter_t += hist(pred[pred == label])
        pred_t += hist(pred)
        label_t += hist(label)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter_t / (pred_t + label_t - inter_t)
        acc = inter_t / label_t
        return {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": inter_t.sum() / label_t.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": acc,
        }


def definition_metrics(preds, refs, num_labels, ignore_index):
    """IoU, recall, Dice and frequency-weighted IoU straight from the set definitions, per class."""
    pred = np.concatenate([np.asarray(p).ravel() for p in preds])
    ref = np.concatenate([np.asarray(r).ravel() for r in refs])
    valid = ref != ignore_index
    iou, acc, dice, freq = [], [], [], []
    for c in range(num_labels):
        p, r = (pred == c) & valid, (ref == c) & valid
        inter, union = (p & r).sum(), (p | r).sum()
        iou.append(inter / union if union else np.nan)
        acc.append(inter / r.sum() if r.sum() else np.nan)
        dice.append(2 * inter / (p.sum() + r.sum()) if p.sum() + r.sum() else np.nan)
        freq.append(r.sum() / valid.sum())
    iou, acc, dice, freq = map(np.array, (iou, acc, dice, freq))
    correct = ((pred == ref) & valid & (ref < num_labels)).sum()
    return {
        "per_category_iou": iou,
        "per_category_accuracy": acc,
        "per_category_dice": dice,
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(acc),
        "mean_dice": np.nanmean(dice),
        "overall_accuracy": correct / valid.sum(),
        "frequency_weighted_iou": np.nansum(freq * np.where(freq > 0, iou, 0)),
    }


def assert_metrics_close(ours, expected, keys=None):
    for key in keys or expected:
        np.testing.assert_allclose(np.asarray(ours[key], float), np.asarray(expected[key], float),
                                   rtol=0, atol=1e-6, equal_nan=True, err_msg=key)


@pytest.fixture(scope="module")
def camvid_pairs(camvid_dir: Path):
    """Real CamVid val labels and realistically wrong predictions: shifted boundaries, a
    relabelled class, speckle noise; bicyclist removed from both sides (absent class) and
    'sign' only ever predicted, never in the references."""
    rng = np.random.default_rng(3)
    paths = sorted((camvid_dir / "labels" / "val").glob("*.png"))[:6]
    preds, refs = [], []
    for path in paths:
        ref = np.array(Image.open(path)).astype(np.uint8)
        assert (ref == IGNORE).any()  # real ignore pixels
        ref[ref == 10] = IGNORE  # bicyclist absent from the references ...
        ref[ref == 6] = 3  # ... and sign too (turned into road)
        pred = np.roll(ref, shift=(3, -5), axis=(0, 1)).astype(np.int64)
        pred[pred == IGNORE] = 3  # a model never predicts "unlabelled"
        pred[pred == 7] = 4  # fence confused with sidewalk
        noise = rng.random(pred.shape) < 0.05
        pred[noise] = rng.integers(0, 10, noise.sum())  # never bicyclist (10); sign (6) is invented
        preds.append(pred)
        refs.append(ref)
    return preds, refs


def test_evaluate_docstring_example() -> None:
    """The figures printed in evaluate's own mean_iou documentation."""
    predicted = [np.array([[1, 2], [3, 4], [5, 255]]), np.array([[2, 7], [9, 2], [3, 6]]),
                 np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]])]
    actual = [np.array([[0, 3], [5, 4], [6, 255]]), np.array([[1, 7], [9, 2], [3, 6]]),
              np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]])]
    result = mean_iou(predicted, actual, num_labels=10, ignore_index=255, reduce_labels=False)
    assert result["mean_iou"] == pytest.approx(0.47750000000000004, abs=1e-12)
    assert result["mean_accuracy"] == pytest.approx(0.5916666666666666, abs=1e-12)
    assert result["overall_accuracy"] == pytest.approx(0.5263157894736842, abs=1e-12)
    np.testing.assert_allclose(result["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])
    np.testing.assert_allclose(result["per_category_accuracy"],
                               [0, 0, 0.75, 2 / 3, 1, 0, 0.5, 1, 1, 1])


def test_camvid_equals_definition_and_evaluate(camvid_pairs) -> None:
    preds, refs = camvid_pairs
    ours = mean_iou(preds, refs, num_labels=NUM_LABELS, ignore_index=IGNORE)
    assert np.isnan(ours["per_category_iou"][10])  # absent from both sides
    assert ours["per_category_iou"][6] == 0.0 and np.isnan(ours["per_category_accuracy"][6])
    assert_metrics_close(ours, definition_metrics(preds, refs, NUM_LABELS, IGNORE))
    assert_metrics_close(ours, evaluate_mean_iou_reference(preds, refs, NUM_LABELS, IGNORE))


def test_camvid_equals_torchmetrics(camvid_pairs) -> None:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex, MulticlassRecall

    preds, refs = camvid_pairs
    ours = mean_iou(preds, refs, num_labels=NUM_LABELS, ignore_index=IGNORE)
    kwargs = dict(num_classes=NUM_LABELS, ignore_index=IGNORE, average="none", validate_args=False)
    metrics = {
        "iou": MulticlassJaccardIndex(**kwargs),
        "recall": MulticlassRecall(**kwargs),
        "dice": MulticlassF1Score(**kwargs),
        "overall": MulticlassAccuracy(num_classes=NUM_LABELS, ignore_index=IGNORE, average="micro", validate_args=False),
    }
    for pred, ref in zip(preds, refs):  # streamed, like ours
        for metric in metrics.values():
            metric.update(torch.from_numpy(pred), torch.from_numpy(ref.astype(np.int64)))
    reference = {name: metric.compute().double().numpy() for name, metric in metrics.items()}
    # torchmetrics reports 0 where we (and evaluate) report NaN; compare where both are defined.
    for ours_key, name in (("per_category_iou", "iou"), ("per_category_accuracy", "recall"), ("per_category_dice", "dice")):
        defined = ~np.isnan(ours[ours_key])
        assert defined.sum() >= 9
        np.testing.assert_allclose(ours[ours_key][defined], reference[name][defined], atol=1e-6, err_msg=ours_key)
    assert ours["overall_accuracy"] == pytest.approx(float(reference["overall"]), abs=1e-6)


def test_reduce_labels_semantics_by_hand() -> None:
    # Reference 0 -> ignored; 1 -> 0; 2 -> 1; 255 stays ignored. Predictions untouched.
    ref = np.array([[0, 1, 1], [2, 2, 255]], dtype=np.uint8)
    pred = np.array([[1, 0, 1], [1, 0, 0]], dtype=np.uint8)
    result = mean_iou([pred], [ref], num_labels=2, ignore_index=255, reduce_labels=True)
    # valid pixels: (0,1) ref 0 pred 0; (0,2) ref 0 pred 1; (1,0) ref 1 pred 1; (1,1) ref 1 pred 0
    # class 0: I=1, P=2, R=2 -> IoU 1/3; class 1: same -> 1/3; accuracy 1/2 each; overall 2/4
    np.testing.assert_allclose(result["per_category_iou"], [1 / 3, 1 / 3])
    np.testing.assert_allclose(result["per_category_accuracy"], [0.5, 0.5])
    assert result["overall_accuracy"] == 0.5
    assert_metrics_close(result, evaluate_mean_iou_reference([pred], [ref], 2, 255, reduce_labels=True))


@pytest.mark.parametrize("reduce_labels", [False, True])
def test_label_map_reduce_labels_out_of_range_equal_evaluate(camvid_pairs, reduce_labels: bool) -> None:
    """Out-of-range predictions (255, 11, -1) and references, label_map on original labels."""
    preds, refs = camvid_pairs
    rng = np.random.default_rng(5)
    odd_preds = []
    for pred in preds:
        pred = pred.copy()
        spots = rng.random(pred.shape) < 0.01
        pred[spots] = rng.choice([255, 11, -1, 40], spots.sum())
        odd_preds.append(pred)
    label_map = {3: 5, 5: 3, 2: 0}  # a swap: every lookup must use the original labels
    for ignore in (IGNORE, 255):
        ours = mean_iou(odd_preds, refs, NUM_LABELS, ignore, reduce_labels=reduce_labels, label_map=label_map)
        expected = evaluate_mean_iou_reference(odd_preds, refs, NUM_LABELS, ignore, label_map, reduce_labels)
        assert_metrics_close(ours, expected)


def test_streaming_batches_merge_and_dtypes(camvid_pairs) -> None:
    preds, refs = camvid_pairs
    whole = mean_iou(preds, refs, NUM_LABELS, IGNORE)

    metric = SemanticSegmentationMetric(NUM_LABELS, IGNORE)
    metric.update(torch.from_numpy(np.stack(preds[:3])), torch.from_numpy(np.stack(refs[:3])))  # (B, H, W)
    other = SemanticSegmentationMetric(NUM_LABELS, IGNORE)
    for pred, ref in zip(preds[3:], refs[3:]):
        other.update(pred.astype(np.int16), Image.fromarray(ref))  # other dtypes, a PIL image
    assert_metrics_close(metric.merge(other).compute(), whole)
    assert_metrics_close(metric.all_reduce().compute(), whole)  # not distributed: a no-op

    metric.reset()
    assert np.isnan(metric.compute()["mean_iou"])
    metric.update(preds[0], refs[0])
    assert_metrics_close(metric.compute(), mean_iou(preds[:1], refs[:1], NUM_LABELS, IGNORE))


def test_torch_path_equals_numpy_path(camvid_pairs) -> None:
    """The torch code path (used for CUDA tensors) counts exactly what the numpy path counts."""
    preds, refs = camvid_pairs
    for kwargs in ({}, {"reduce_labels": True}, {"label_map": {3: 5, 5: 3}}):
        fast, torch_path = ConfusionMatrix(NUM_LABELS, IGNORE, **kwargs), ConfusionMatrix(NUM_LABELS, IGNORE, **kwargs)
        for pred, ref in zip(preds[:3], refs[:3]):
            pred, ref = pred[100:220, 100:260].copy(), ref[100:220, 100:260]  # small: torch is slow on a busy CPU
            pred[:5] = 255
            fast.update(pred, ref)
            torch_path._update_torch(torch.from_numpy(pred), torch.from_numpy(ref))
        assert torch.equal(fast.extended, torch_path.extended)


def test_confusion_matrix_counts_and_normalisation() -> None:
    ref = np.array([[0, 0, 1], [1, 2, 9]])
    pred = np.array([[0, 1, 1], [1, 2, 2]])
    metric = SemanticSegmentationMetric(num_labels=3, ignore_index=9)
    metric.update(pred, ref)
    np.testing.assert_array_equal(metric.confusion_matrix(), [[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    np.testing.assert_allclose(metric.confusion_matrix("true"), [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]])
    state = metric.confusion.state_dict()
    assert torch.equal(ConfusionMatrix.from_state_dict(state).compute(), metric.confusion.compute())


def test_nan_to_num_and_errors() -> None:
    result = mean_iou([np.zeros((2, 2), int)], [np.zeros((2, 2), int)], num_labels=3, ignore_index=255, nan_to_num=-1)
    np.testing.assert_array_equal(result["per_category_iou"], [1, -1, -1])
    assert result["mean_iou"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        mean_iou([np.zeros((2, 2), int)], [np.zeros((2, 3), int)], 3, 255)
    with pytest.raises(TypeError, match="argmax"):
        mean_iou([np.full((2, 2), 0.3)], [np.zeros((2, 2), int)], 3, 255)
    with pytest.raises(ValueError, match="1 references"):
        mean_iou([np.zeros((2, 2), int)] * 2, [np.zeros((2, 2), int)], 3, 255)


def _all_reduce_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rng = np.random.default_rng(rank)  # each rank sees different data
        metric = SemanticSegmentationMetric(num_labels=4, ignore_index=255)
        metric.update(rng.integers(0, 4, (30, 40)), rng.integers(0, 5, (30, 40)).astype(np.uint8))  # 4: out of range
        metric.all_reduce()
        np.save(Path(out_dir) / f"rank{rank}.npy", metric.confusion.extended.numpy())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sums_over_processes(tmp_path: Path) -> None:
    """Two gloo processes: after all_reduce each holds the sum of both ranks' counts."""
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = SemanticSegmentationMetric(num_labels=4, ignore_index=255)
    for rank in range(2):
        rng = np.random.default_rng(rank)
        expected.update(rng.integers(0, 4, (30, 40)), rng.integers(0, 5, (30, 40)).astype(np.uint8))  # 4: out of range
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), expected.confusion.extended.numpy())
