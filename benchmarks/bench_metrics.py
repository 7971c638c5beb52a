"""Semantic metric speed: omniseg's confusion-matrix path vs the reference implementations.

100 frames of 480x360: the real CamVid label maps (val split, beside the repository) as
references, and predictions made from them the way a model errs (shifted boundaries, a
confused class, speckle), as int64 class ids like an argmax gives. Timed in one process,
interleaved, median of ``--repeats`` runs, each the full streaming pass over the 100 frames:

* omniseg ``SemanticSegmentationMetric``: ``update`` per frame, then ``compute``;
* omniseg, the 100 frames as one (B, H, W) batch update;
* torchmetrics ``MulticlassJaccardIndex(average="none")``: ``update`` per frame, ``compute``
  (the established streaming implementation; test extra);
* ``evaluate``'s ``mean_iou`` algorithm (per-image ``np.histogram``), written out as in its
  hub script, which cannot be fetched offline.

Results are checked to agree before anything is timed.

    python benchmarks/bench_metrics.py [--repeats 7] [--frames 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"
NUM_LABELS, IGNORE = 11, 11


def load_frames(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(predictions, references): real CamVid labels when present, else smooth synthetic maps."""
    rng = np.random.default_rng(seed)
    paths = sorted((CAMVID / "labels" / "val").glob("*.png")) + sorted((CAMVID / "labels" / "train").glob("*.png"))
    refs = []
    for i in range(count):
        if paths:
            refs.append(np.array(Image.open(paths[i % len(paths)])).astype(np.uint8))
        else:
            # Blocky regions, like street scenes seen from far: upsampled coarse random labels.
            coarse = rng.integers(0, NUM_LABELS + 1, (12, 16), dtype=np.uint8)
            refs.append(np.kron(coarse, np.ones((30, 30), dtype=np.uint8)))
    preds = []
    for ref in refs:
        pred = np.roll(ref, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), axis=(0, 1)).astype(np.int64)
        pred[pred == IGNORE] = 3
        pred[pred == 7] = 4
        noise = rng.random(pred.shape) < 0.03
        pred[noise] = rng.integers(0, NUM_LABELS, int(noise.sum()))
        preds.append(pred)
    return preds, refs


def run_omniseg(preds, refs):
    from omniseg.evaluation import SemanticSegmentationMetric

    metric = SemanticSegmentationMetric(NUM_LABELS, IGNORE)
    for pred, ref in zip(preds, refs):
        metric.update(pred, ref)
    return metric.compute()["per_category_iou"]


def run_omniseg_batch(pred_batch, ref_batch):
    from omniseg.evaluation import SemanticSegmentationMetric

    metric = SemanticSegmentationMetric(NUM_LABELS, IGNORE)
    metric.update(pred_batch, ref_batch)
    return metric.compute()["per_category_iou"]


def run_torchmetrics(preds_t, refs_t):
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = MulticlassJaccardIndex(num_classes=NUM_LABELS, ignore_index=IGNORE, average="none")
    for pred, ref in zip(preds_t, refs_t):
        metric.update(pred, ref)
    return metric.compute().double().numpy()


def run_evaluate_algorithm(preds, refs):
    inter_t, pred_t, label_t = np.zeros(NUM_LABELS), np.zeros(NUM_LABELS), np.zeros(NUM_LABELS)
    for pred, label in zip(preds, refs):
        keep = label != IGNORE
        pred, label = pred[keep], label[keep]
        bins = dict(bins=NUM_LABELS, range=(0, NUM_LABELS - 1))
        inter = np.histogram(pred[pred == label], **bins)[0]
        area_pred, area_label = np.histogram(pred, **bins)[0], np.histogram(label, **bins)[0]
        inter_t += inter
        pred_t += area_pred
        label_t += area_label
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter_t / (pred_t + label_t - inter_t)


def median_time(function, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    preds, refs = load_frames(args.frames)
    preds_t = [torch.from_numpy(p) for p in preds]
    refs_t = [torch.from_numpy(r.astype(np.int64)) for r in refs]
    pred_batch, ref_batch = np.stack(preds), np.stack(refs)
    source = "CamVid label maps" if (CAMVID / "labels").is_dir() else "synthetic label maps"
    print(f"{args.frames} frames of {refs[0].shape[1]}x{refs[0].shape[0]} ({source}), "
          f"{NUM_LABELS} classes, ignore {IGNORE}; torch threads {torch.get_num_threads()}; "
          f"median of {args.repeats}")

    ours = run_omniseg(preds, refs)
    for name, other in (("batch", run_omniseg_batch(pred_batch, ref_batch)),
                        ("torchmetrics", run_torchmetrics(preds_t, refs_t)),
                        ("evaluate algorithm", run_evaluate_algorithm(preds, refs))):
        defined = ~np.isnan(ours)
        diff = float(np.max(np.abs(ours[defined] - other[defined])))
        assert diff < 1e-6, f"{name} disagrees by {diff}"
        print(f"  per-class IoU agrees with {name}: max |diff| {diff:.2e}")

    rows = []
    # Interleave the contenders round by round so machine load hits them alike.
    contenders = {
        "omniseg (per-frame update)": (run_omniseg, preds, refs),
        "omniseg (one batch update)": (run_omniseg_batch, pred_batch, ref_batch),
        "torchmetrics MulticlassJaccardIndex": (run_torchmetrics, preds_t, refs_t),
        "evaluate mean_iou algorithm (np.histogram)": (run_evaluate_algorithm, preds, refs),
    }
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, (function, *inputs) in contenders.items():
            samples[name].append(median_time(function, *inputs, repeats=1))
    baseline = statistics.median(samples["omniseg (per-frame update)"])
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append((name, median, median / baseline))
    width = max(len(name) for name, _, _ in rows)
    print(f"  {'':{width}}  {'median s':>9}  {'x omniseg':>9}")
    for name, median, ratio in rows:
        print(f"  {name:{width}}  {median:9.4f}  {ratio:9.2f}")


if __name__ == "__main__":
    main()
