"""``omniseg evaluate``: run a model over a dataset split and report how well it segments."""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from omniseg.cli import argtypes
from omniseg.errors import InputError, ModelNotFoundError, OmnisegError
from omniseg.io.atomic import atomic_write_bytes, atomic_write_text

TASKS = ("semantic", "instance", "panoptic")
METRICS_FILE = "metrics.json"
ERRORS_FILE = "errors.jsonl"

DESCRIPTION = "Evaluate a model on a dataset split: a per-class table, metrics.json and pictures."
EPILOG = f"""\
dataset (--data): images/<split>/*, labels/<split>/<same stem>.png (class id per pixel),
id2label.json. The ignore index and the thing classes come from the options, else from
the dataset's README ("ignore_index 11", "Things ...: car, pedestrian."), else 255 / none.
Instance and panoptic ground truth is built from the label maps: each connected component
of a thing class is one instance, each stuff class one segment; unlabelled pixels are VOID.

model classes are matched to the dataset's by name when the names overlap (a model class
the dataset lacks counts as a wrong prediction), else by id.

tasks and metrics:
  semantic   IoU, accuracy and Dice per class; mean IoU, mean accuracy, overall (pixel)
             accuracy, mean Dice, frequency-weighted IoU (as evaluate's mean_iou computes)
  instance   COCO mask AP, AP50, AP75, APs/m/l and AP per thing class (pycocotools)
  panoptic   PQ, SQ, RQ for all / things / stuff and per class (COCO panoptic definition)

outputs in --out (default ./evaluation-SPLIT):
  {METRICS_FILE}              every figure, per class too (NaN written as null)
  per_class_iou.png         (semantic) per-class IoU bars; per_class_pq.png / per_class_ap.png
  confusion_matrix.png      (semantic) row-normalised confusion matrix heat map
  examples/STEM.png         a few images: ground truth beside prediction
  {ERRORS_FILE}             images that could not be read or segmented (skipped)
pictures need matplotlib (pip install 'omniseg[plot]'); without it they are skipped.

exit status: 0 done, 1 some images failed (the metrics cover the others), 2 usage error.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on a dataset: per-class table, metrics.json, plots",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="M", help="model directory or hub id")
    parser.add_argument("--data", required=True, type=Path, metavar="DIR", help="dataset folder")
    parser.add_argument("--split", default="val", help="dataset split(s), comma-separated (default: val)")
    parser.add_argument("--group-by", metavar="REGEX",
                        help="the group (drive, camera, site) of a file is the first capture group of REGEX in its "
                        "name, e.g. '^([^_]+)_' for CamVid's drives; with --groups, evaluate those groups only")
    parser.add_argument("--groups", metavar="G[,G]", help="with --group-by: the groups to evaluate")
    parser.add_argument("--task", choices=TASKS, default="semantic", help="what to evaluate (default: semantic)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: ./evaluation-SPLIT)")
    parser.add_argument("--batch-size", type=argtypes.integer(minimum=1), default=4, metavar="N",
                        help="images read and segmented together (default: 4); on CUDA those of equal "
                        "processed size share a forward pass, the CPU runs each image alone")
    parser.add_argument("--device", type=argtypes.device, default="cpu", metavar="{cpu,cuda}", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--ignore-index", type=argtypes.integer(minimum=0), metavar="I",
                        help="label value of unlabelled pixels (default: the README's, else 255)")
    parser.add_argument("--reduce-labels", action="store_true",
                        help="label 0 is background to ignore and class k is stored as k+1 (ADE20k style)")
    parser.add_argument("--thing-classes", metavar="A,B,...",
                        help="countable classes, names or ids (default: the README's), for instance/panoptic")
    parser.add_argument("--tta", action="store_true",
                        help="test-time flip (--task semantic): average the class scores of each image and "
                             "its mirror image")
    parser.add_argument("--threshold", type=argtypes.number(minimum=0, maximum=1), metavar="F",
                        help="minimum segment score (default: 0.05 instance, 0.8 panoptic)")
    parser.add_argument("--quantize", choices=("int8",),
                        help="evaluate the opt-in fast CPU mode (int8 linear layers), to measure what it costs")
    parser.add_argument("--max-images", type=argtypes.integer(minimum=1), metavar="N",
                        help="evaluate the first N images only")
    parser.add_argument("--examples", type=argtypes.integer(minimum=0), default=4, metavar="K",
                        help="ground truth / prediction pictures to draw (default: 4)")
    return parser


def run(args: argparse.Namespace) -> int:
    import omniseg
    from omniseg.data.dataset import folder_samples
    from omniseg.data.semantic import read_dataset_info

    out = Path(args.out) if args.out else Path(f"evaluation-{args.split}")
    problem = argtypes.output_folder_problem(out)
    if problem is not None:
        return _usage_error(problem)
    things = None if args.thing_classes is None else [t for t in args.thing_classes.split(",") if t.strip()]
    try:
        info = read_dataset_info(args.data, ignore_index=args.ignore_index, thing_classes=things)
        samples = folder_samples(args.data, args.split)
    except InputError as exc:
        return _usage_error(f"--data: {exc}")
    if args.groups and not args.group_by:
        return _usage_error("--groups needs --group-by (how a file's group is read from its name)")
    if args.group_by:
        from omniseg.data.groups import compile_group_pattern, group_counts, parse_groups, select_groups

        try:
            pattern = compile_group_pattern(args.group_by)
            samples = select_groups(samples, pattern, keep=parse_groups(args.groups))
        except InputError as exc:
            return _usage_error(str(exc))
        print(f"omniseg evaluate: groups {group_counts(samples, pattern)}", file=sys.stderr)
    if args.max_images:
        samples = samples[: args.max_images]
    if args.task != "semantic" and not info.thing_ids:
        print("omniseg evaluate: no thing classes (--thing-classes or the README): every class is stuff",
              file=sys.stderr)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return _usage_error(f"--device {args.device}: CUDA is not available on this machine")
    try:
        seg = omniseg.pipeline("image-segmentation", model=args.model, device=args.device, quantize=args.quantize)
        seg.resolve_subtask(args.task)
    except ModelNotFoundError as exc:
        return _usage_error(f"--model: {exc}" if args.model else "--model is required (no default model bundled)")
    except ValueError as exc:
        if args.quantize and "quantize" in str(exc):
            return _usage_error(f"--quantize {args.quantize}: {exc}")
        return _usage_error(f"--task {args.task}: {exc}")
    except (OmnisegError, OSError) as exc:
        return _usage_error(f"--model {args.model}: cannot load the model: {exc}")
    if args.tta:
        try:
            seg.check_tta(args.task)
        except ValueError as exc:
            return _usage_error(f"--tta: {exc}")

    lut, match_note = class_mapping(seg.id2label, info.id2label)
    print(f"omniseg evaluate: {len(samples)} images of {args.data} ({args.split}), task {args.task}, "
          f"{info.num_labels} classes, ignore index {info.ignore_index}; {match_note}", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ERRORS_FILE).unlink(missing_ok=True)
    except OSError as exc:  # output_folder_problem passed, yet the filesystem refused
        return _usage_error(f"--out {out}: cannot write there: {exc.strerror or exc}")

    evaluator = _EVALUATORS[args.task](info, lut, args.reduce_labels)
    threshold = args.threshold if args.threshold is not None else {"instance": 0.05, "panoptic": 0.8}.get(args.task)
    errors: list[dict[str, str]] = []
    examples: list[tuple[Any, Image.Image, np.ndarray, Any]] = []
    progress = tqdm(total=len(samples), desc="evaluate", unit="image", file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.1 if sys.stderr.isatty() else 10.0)

    def fail(sample: Any, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, InputError) else (str(exc) or type(exc).__name__)
        errors.append({"file": str(sample.image), "error": type(exc).__name__, "reason": reason})
        atomic_write_text(out / ERRORS_FILE, "".join(json.dumps(e) + "\n" for e in errors))
        progress.write(f"omniseg evaluate: {sample.image}: {type(exc).__name__}: {reason}", file=sys.stderr)

    try:
        for start in range(0, len(samples), args.batch_size):
            loaded = []
            for sample in samples[start : start + args.batch_size]:
                try:
                    loaded.append((sample, *_load_sample(sample)))
                except InputError as exc:
                    fail(sample, exc)
                    progress.update(1)
            for (sample, image, label), segmentation in _predict(seg, loaded, args, threshold, fail):
                if segmentation is not None:
                    try:
                        evaluator.update(label, segmentation)
                    except InputError as exc:
                        fail(sample, exc)
                    else:
                        if len(examples) < args.examples:
                            examples.append((sample, image, label, segmentation))
                progress.update(1)
    finally:
        progress.close()

    report = evaluator.report()
    report = {"task": args.task, "model": str(args.model), "quantize": args.quantize, "data": str(args.data),
              "split": args.split, "groups": args.groups,
              "images": len(samples) - len(errors), "failed": len(errors), "ignore_index": info.ignore_index,
              "reduce_labels": bool(args.reduce_labels), "class_matching": match_note, **report}
    print(evaluator.table(report))
    atomic_write_text(out / METRICS_FILE, json.dumps(_json_safe(report), indent=2) + "\n")
    written = [out / METRICS_FILE]
    try:
        written += evaluator.plots(report, out)
    except ImportError as exc:
        print(f"omniseg evaluate: plots skipped: {exc}", file=sys.stderr)
    written += _draw_examples(examples, evaluator, info, out / "examples")
    print(f"omniseg evaluate: wrote {', '.join(str(p) for p in written[:3])}"
          f"{f' and {len(written) - 3} more' if len(written) > 3 else ''}", file=sys.stderr)
    if errors:
        print(f"omniseg evaluate: {len(errors)} images failed (see {out / ERRORS_FILE})", file=sys.stderr)
    return 1 if errors else 0


# --- classes ---------------------------------------------------------------------------------


def class_mapping(model_id2label: dict[int, str], dataset_id2label: dict[int, str]) -> tuple[np.ndarray, str]:
    """A lookup table model class id -> dataset class id, and a line saying how it was made.

    By name (case-insensitive) when any name is shared: model classes the dataset lacks map
    to ``num_labels`` (out of range: a wrong prediction wherever they are predicted). Else
    by id, the usual case of a model trained on the dataset under generic names.
    """
    num_labels = max(dataset_id2label) + 1 if dataset_id2label else 0
    size = max(max(model_id2label, default=0), num_labels) + 1
    by_name = {name.lower(): class_id for class_id, name in dataset_id2label.items()}
    shared = [i for i, name in model_id2label.items() if str(name).lower() in by_name]
    lut = np.full(size, num_labels, dtype=np.int64)
    if shared:
        for model_id, name in model_id2label.items():
            lut[model_id] = by_name.get(str(name).lower(), num_labels)
        missing = len(model_id2label) - len(shared)
        note = f"classes matched by name ({len(shared)} shared" + (f", {missing} model-only)" if missing else ")")
    else:
        lut[:num_labels] = np.arange(num_labels)
        note = "classes matched by id (no class names in common)"
        if len(model_id2label) != num_labels:
            note += f"; the model has {len(model_id2label)} classes, the dataset {num_labels}"
    return lut, note


def _map_classes(lut: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    return lut[np.clip(class_ids, 0, len(lut) - 1)]


# --- evaluators ------------------------------------------------------------------------------


class _SemanticEvaluator:
    subtask = "semantic"

    def __init__(self, info: Any, lut: np.ndarray, reduce_labels: bool) -> None:
        from omniseg.evaluation import SemanticSegmentationMetric

        self.info, self.lut = info, lut
        self.metric = SemanticSegmentationMetric(info.num_labels, info.ignore_index, reduce_labels=reduce_labels)

    def update(self, label: np.ndarray, segmentation: Any) -> None:
        self.metric.update(self.prediction_map(segmentation), label)

    def prediction_map(self, segmentation: Any) -> np.ndarray:
        return _map_classes(self.lut, segmentation.label_map.numpy())

    def report(self) -> dict[str, Any]:
        metrics = self.metric.compute()
        per_class = {
            name: {"iou": metrics["per_category_iou"][i], "accuracy": metrics["per_category_accuracy"][i],
                   "dice": metrics["per_category_dice"][i], "pixels": int(area)}
            for i, (name, area) in enumerate(zip(self.info.class_names, self.metric.confusion.areas()[2]))
        }
        summary = {key: metrics[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "mean_dice",
                                                 "frequency_weighted_iou")}
        return {"metrics": summary, "per_class": per_class,
                "confusion_matrix": self.metric.confusion_matrix().astype(np.int64).tolist()}

    def table(self, report: dict[str, Any]) -> str:
        rows = [(name, [c["iou"], c["accuracy"], c["dice"]], f"{c['pixels']:,}") for name, c in report["per_class"].items()]
        lines = _table(["class", "IoU", "acc", "Dice", "pixels"], rows)
        m = report["metrics"]
        lines.append(f"mean IoU {_fmt(m['mean_iou'])}  mean acc {_fmt(m['mean_accuracy'])}  "
                     f"pixel acc {_fmt(m['overall_accuracy'])}  mean Dice {_fmt(m['mean_dice'])}  "
                     f"fwIoU {_fmt(m['frequency_weighted_iou'])}")
        return "\n".join(lines)

    def plots(self, report: dict[str, Any], out: Path) -> list[Path]:
        from omniseg.evaluation.plots import plot_confusion_matrix, plot_per_class_iou

        names = list(report["per_class"])
        ious = [report["per_class"][n]["iou"] for n in names]
        return [
            plot_per_class_iou(ious, names, out / "per_class_iou.png", mean_iou=report["metrics"]["mean_iou"]),
            plot_confusion_matrix(np.array(report["confusion_matrix"]), names, out / "confusion_matrix.png"),
        ]

    def drawable(self, label: np.ndarray, segmentation: Any) -> tuple[list[dict], list[dict]]:
        label = _reduced(label, self.metric.confusion.reduce_labels)
        ignore = self.info.ignore_index
        truth = [_segment(label == c, c, self.info) for c in np.unique(label).tolist() if c != ignore
                 and 0 <= c < self.info.num_labels]
        prediction = self.prediction_map(segmentation)
        predicted = [_segment(prediction == c, c, self.info) for c in np.unique(prediction).tolist()
                     if c < self.info.num_labels]
        return truth, predicted


class _InstanceEvaluator:
    subtask = "instance"

    def __init__(self, info: Any, lut: np.ndarray, reduce_labels: bool) -> None:
        from omniseg.evaluation import InstanceSegmentationMetric

        self.info, self.lut, self.reduce_labels = info, lut, reduce_labels
        self.metric = InstanceSegmentationMetric(
            [{"id": c, "name": info.id2label[c]} for c in info.thing_ids]
        )

    def ground_truth(self, label: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Panoptic-style ground truth: (segment ids, 0 = VOID; segments)."""
        from omniseg.data.targets import instances_from_semantic

        label = _reduced(label, self.reduce_labels)
        ignore = self.info.ignore_index
        label = np.where((label >= 0) & (label < self.info.num_labels), label, ignore)
        instance_map, classes = instances_from_semantic(label, self.info.thing_ids, ignore_index=ignore)
        ids = np.where(instance_map == ignore, 0, instance_map.astype(np.int64) + 1)
        segments = [{"id": k + 1, "category_id": c, "iscrowd": 0} for k, c in classes.items()]
        return ids, segments

    def prediction(self, segmentation: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Predicted segments renumbered 1, 2, ... (0 = none: post-processing marks "none"
        with -1 or 0 and may number segments from 0), with dataset category ids; segments of
        model classes the dataset lacks are dropped."""
        raw = segmentation.label_map.numpy()
        ids = np.zeros(raw.shape, dtype=np.int64)
        segments = []
        for s in segmentation.segments:
            category = int(_map_classes(self.lut, np.array([s["label_id"]]))[0])
            mask = raw == s["id"]
            if category >= self.info.num_labels or not mask.any():
                continue
            segment_id = len(segments) + 1
            ids[mask] = segment_id
            segments.append({"id": segment_id, "category_id": category,
                             "score": 1.0 if s["score"] is None else float(s["score"])})
        return ids, segments

    def update(self, label: np.ndarray, segmentation: Any) -> None:
        gt_ids, gt_segments = self.ground_truth(label)
        gt_things = [s for s in gt_segments if s["category_id"] in self.info.thing_ids]
        pred_ids, pred_segments = self.prediction(segmentation)
        self.metric.update(
            np.array([pred_ids == s["id"] for s in pred_segments], dtype=bool).reshape(-1, *pred_ids.shape),
            [s["category_id"] for s in pred_segments], [s["score"] for s in pred_segments],
            np.array([gt_ids == s["id"] for s in gt_things], dtype=bool).reshape(-1, *gt_ids.shape),
            [s["category_id"] for s in gt_things],
        )

    def report(self) -> dict[str, Any]:
        metrics = self.metric.compute()
        per_class = {self.info.id2label[c]: {"ap": ap} for c, ap in metrics.pop("per_class_AP").items()}
        return {"metrics": metrics, "per_class": per_class}

    def table(self, report: dict[str, Any]) -> str:
        lines = _table(["class", "AP"], [(n, [c["ap"]], "") for n, c in report["per_class"].items()])
        m = report["metrics"]
        lines.append("  ".join(f"{k} {_fmt(m[k])}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
        return "\n".join(lines)

    def plots(self, report: dict[str, Any], out: Path) -> list[Path]:
        from omniseg.evaluation.plots import plot_per_class_iou

        names = list(report["per_class"])
        values = [report["per_class"][n]["ap"] for n in names]
        return [plot_per_class_iou(values, names, out / "per_class_ap.png", mean_iou=report["metrics"]["AP"],
                                   metric_name="mask AP")] if names else []

    def drawable(self, label: np.ndarray, segmentation: Any) -> tuple[list[dict], list[dict]]:
        gt_ids, gt_segments = self.ground_truth(label)
        pred_ids, pred_segments = self.prediction(segmentation)
        keep = set(self.info.thing_ids) if self.subtask == "instance" else set(self.info.id2label)
        truth = [_segment(gt_ids == s["id"], s["category_id"], self.info) for s in gt_segments
                 if s["category_id"] in keep]
        predicted = [_segment(pred_ids == s["id"], s["category_id"], self.info, score=s["score"])
                     for s in pred_segments]
        return truth, predicted


class _PanopticEvaluator(_InstanceEvaluator):
    subtask = "panoptic"

    def __init__(self, info: Any, lut: np.ndarray, reduce_labels: bool) -> None:
        from omniseg.evaluation import PanopticQuality

        self.info, self.lut, self.reduce_labels = info, lut, reduce_labels
        self.metric = PanopticQuality({c: c in info.thing_ids for c in info.id2label})

    def update(self, label: np.ndarray, segmentation: Any) -> None:
        gt_ids, gt_segments = self.ground_truth(label)
        pred_ids, pred_segments = self.prediction(segmentation)
        self.metric.update(pred_ids, pred_segments, gt_ids, gt_segments)

    def report(self) -> dict[str, Any]:
        result = self.metric.compute()
        per_class = {self.info.id2label[c]: v for c, v in result.pop("per_class").items()}
        return {"metrics": result, "per_class": per_class}

    def table(self, report: dict[str, Any]) -> str:
        rows = [(n, [c["pq"], c["sq"], c["rq"]], f"{c['tp']}/{c['fp']}/{c['fn']}")
                for n, c in report["per_class"].items()]
        lines = _table(["class", "PQ", "SQ", "RQ", "TP/FP/FN"], rows)
        for group in ("All", "Things", "Stuff"):
            g = report["metrics"][group]
            lines.append(f"{group:<7} PQ {_fmt(g['pq'])}  SQ {_fmt(g['sq'])}  RQ {_fmt(g['rq'])}  ({g['n']} classes)")
        return "\n".join(lines)

    def plots(self, report: dict[str, Any], out: Path) -> list[Path]:
        from omniseg.evaluation.plots import plot_per_class_iou

        names = list(report["per_class"])
        values = [report["per_class"][n]["pq"] for n in names]
        return [plot_per_class_iou(values, names, out / "per_class_pq.png", mean_iou=report["metrics"]["All"]["pq"],
                                   metric_name="PQ")] if names else []


_EVALUATORS = {"semantic": _SemanticEvaluator, "instance": _InstanceEvaluator, "panoptic": _PanopticEvaluator}


def _reduced(label: np.ndarray, reduce_labels: bool) -> np.ndarray:
    """``reduce_labels`` as the metrics apply it: 0 -> 255, others minus one."""
    if not reduce_labels:
        return label
    label = np.where(label == 0, 255, label) - 1
    return np.where(label == 254, 255, label)


# --- steps -----------------------------------------------------------------------------------


def _load_sample(sample: Any) -> tuple[Image.Image, np.ndarray]:
    from omniseg.data.dataset import read_label_map
    from omniseg.io.images import load_image

    image = load_image(sample.image)
    label = read_label_map(sample.label)
    if label.shape != (image.height, image.width):
        raise InputError(sample.label, f"label map is {label.shape[1]}x{label.shape[0]} but the image is "
                                       f"{image.width}x{image.height}")
    return image, label


def _predict(seg: Any, loaded: list, args: argparse.Namespace, threshold: float | None, fail: Any):
    """Yield ``((sample, image, label), segmentation or None)``; a failing batch is retried
    image by image so that one bad image costs only itself."""
    if not loaded:
        return
    options: dict[str, Any] = {"subtask": args.task, "batch_size": args.batch_size}
    if threshold is not None:
        options["threshold"] = threshold
    if args.tta:
        options["tta"] = True
    try:
        answers = seg.predict([image for _, image, _ in loaded], **options)
    except Exception:  # noqa: BLE001 - isolated per image below
        answers = None
    if answers is not None:
        yield from zip(loaded, answers)
        return
    for item in loaded:
        try:
            answer = seg.predict([item[1]], **options)[0]
        except Exception as exc:  # noqa: BLE001 - recorded in errors.jsonl and the exit status
            fail(item[0], exc)
            answer = None
        yield item, answer


def _segment(mask: np.ndarray, class_id: int, info: Any, score: float | None = None) -> dict[str, Any]:
    return {"mask": mask, "label_id": int(class_id), "label": info.id2label.get(int(class_id), str(class_id)),
            "score": score}


def _draw_examples(examples: list, evaluator: Any, info: Any, folder: Path) -> list[Path]:
    """Ground truth beside prediction for a few images, drawn with omniseg.viz."""
    from omniseg.viz import draw_overlay

    written = []
    for sample, image, label, segmentation in examples:
        truth, predicted = evaluator.drawable(label, segmentation)
        left = draw_overlay(image, truth, id2label=info.id2label)
        right = draw_overlay(image, predicted, id2label=info.id2label)
        header = 22
        canvas = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height) + header), "white")
        canvas.paste(left, (0, header))
        canvas.paste(right, (left.width + 8, header))
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 4), f"ground truth: {Path(sample.image).name}", fill=(20, 20, 20))
        draw.text((left.width + 12, 4), "prediction", fill=(20, 20, 20))
        buffer = io.BytesIO()
        canvas.save(buffer, format="PNG")
        path = folder / f"{Path(sample.image).stem}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


# --- formatting ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return "  n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"


def _table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[float], str]]) -> list[str]:
    """Rows of (class name, figures, optional text column); ``header`` names every column."""
    width = max([len(header[0])] + [len(str(name)) for name, _, _ in rows])
    figures = len(header) - 1 if not rows else len(rows[0][1])
    tail = header[1 + figures] if len(header) > 1 + figures else None
    head = f"{header[0]:<{width}}  " + "  ".join(f"{h:>7}" for h in header[1 : 1 + figures])
    if tail:
        head += f"  {tail:>12}"
    lines = [head, "-" * len(head)]
    for name, values, text in rows:
        line = f"{name:<{width}}  " + "  ".join(f"{_fmt(v):>7}" for v in values)
        if tail:
            line += f"  {text:>12}"
        lines.append(line)
    lines.append("-" * len(head))
    return lines


def _json_safe(value: Any) -> Any:
    """NaN -> null, numpy scalars and arrays -> Python numbers and lists (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    return value


def _usage_error(message: str) -> int:
    print(f"omniseg evaluate: error: {message}", file=sys.stderr)
    return 2
