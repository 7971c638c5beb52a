"""Segmentation results to files: per-segment records, a JSON, a label map, an overlay, COCO.

Per image, with ``out_stem = OUT/photos/street`` for example:

- ``street.json``: ``{"image", "width", "height", "task", "model", "label_map", "segments"}``,
  and from ``omniseg segment`` also ``"options"`` (see :func:`answer_options`);
  each segment ``{"id", "label_id", "label", "score", "area", "bbox", "segmentation"}``
  with ``score`` ``null`` for semantic results, ``bbox`` ``[x, y, width, height]`` in pixels
  (COCO convention) and ``segmentation`` a COCO RLE ``{"size": [h, w], "counts": str}``
  that ``pycocotools.mask.decode`` reads back.
- ``street_labels.png``: one channel, the class id of each pixel; 8-bit when every class id
  of the model is below 255, else 16-bit. Pixels no segment covers hold 255 (8-bit) or
  65535 (16-bit). Where instance masks overlap, the higher-scoring segment's class wins.
- ``street_overlay.png``: the image with the segments blended in and a legend.

Every file is written atomically, and the JSON last: its presence means the others are
complete, which is how ``omniseg segment`` knows an image is done.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from omniseg.io.atomic import atomic_write_bytes, atomic_write_text
from omniseg.viz.overlay import draw_overlay

UNASSIGNED_8BIT = 255
UNASSIGNED_16BIT = 65535

# Options that change an image's answer (the pipeline call's, and the pipeline's quantize mode),
# recorded in its JSON by ``omniseg segment``.
ANSWER_OPTIONS = ("threshold", "tta", "quantize")

# Output kinds per image, and the file name suffix each one gets after the stem.
IMAGE_OUTPUTS = {"labels": "_labels.png", "overlay": "_overlay.png", "json": ".json"}


def label_to_id(id2label: Mapping[Any, str]) -> dict[str, int]:
    """Invert a model's ``id2label`` (keys may be ints or, from JSON, strings).

    When two ids share a name, the lowest id is used, so the answer is deterministic.
    """
    inverse: dict[str, int] = {}
    for class_id, label in sorted((int(k), str(v)) for k, v in id2label.items()):
        inverse.setdefault(label, class_id)
    return inverse


def segments_to_records(
    segments: Sequence[Mapping[str, Any]], id2label: Mapping[Any, str]
) -> list[dict[str, Any]]:
    """One JSON-ready record per segment, in the segments' order, ids numbered from 1.

    Args:
        segments: the pipeline's ``{"score", "label", "mask"}`` dicts; masks are PIL "L"
            images (0/255) or boolean arrays, all of one image's size.
        id2label: the model's ``config.id2label``, to find each label's class id.

    Raises:
        ValueError: a label that ``id2label`` does not name, or masks of different sizes.
    """
    ids = label_to_id(id2label)
    records = []
    shape = None
    for number, segment in enumerate(segments, start=1):
        label = str(segment["label"])
        if label not in ids:
            raise ValueError(f"segment label {label!r} is not in the model's id2label")
        mask = mask_to_bool(segment["mask"])
        if shape is not None and mask.shape != shape:
            raise ValueError(f"segment masks differ in size: {shape} and {mask.shape}")
        shape = mask.shape
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        score = segment.get("score")
        records.append(
            {
                "id": number,
                "label_id": ids[label],
                "label": label,
                "score": None if score is None else float(score),
                "area": int(mask.sum()),
                "bbox": [int(round(v)) for v in mask_utils.toBbox(rle).tolist()],
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            }
        )
    return records


def mask_to_bool(mask: Any) -> np.ndarray:
    """A PIL "L"/"1" mask or an array as an ``HxW`` boolean array (uint8 masks: > 127)."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a mask must be two-dimensional, got shape {array.shape}")
    return array > 127 if array.dtype == np.uint8 else array.astype(bool)


def unassigned_value(id2label: Mapping[Any, str]) -> int:
    """The label-map value of pixels no segment covers: 255 for 8-bit maps, 65535 for 16-bit."""
    largest = max((int(k) for k in id2label), default=0)
    return UNASSIGNED_8BIT if largest < UNASSIGNED_8BIT else UNASSIGNED_16BIT


def label_map(
    segments: Sequence[Mapping[str, Any]],
    id2label: Mapping[Any, str],
    size: tuple[int, int],
) -> np.ndarray:
    """The per-pixel class id map (``HxW``; uint8 or uint16, see :func:`unassigned_value`).

    Args:
        segments: pipeline segment dicts or records with ``"label_id"`` (a record's mask is
            decoded from its RLE when it has no ``"mask"``).
        id2label: the model's classes; the largest id decides 8 or 16 bits.
        size: ``(width, height)`` of the image, as PIL reports it.
    """
    width, height = size
    fill = unassigned_value(id2label)
    dtype = np.uint8 if fill == UNASSIGNED_8BIT else np.uint16
    out = np.full((height, width), fill, dtype=dtype)
    ids = label_to_id(id2label)
    # Lowest score first (stable for score None), so the most confident segment ends on top.
    ordered = sorted(
        segments, key=lambda s: -math.inf if s.get("score") is None else float(s["score"])
    )
    for segment in ordered:
        class_id = segment.get("label_id")
        if class_id is None:
            class_id = ids[str(segment["label"])]
        if "mask" in segment and segment["mask"] is not None:
            mask = mask_to_bool(segment["mask"])
        else:
            mask = decode_rle(segment["segmentation"])
        if mask.shape != out.shape:
            raise ValueError(f"mask of shape {mask.shape} does not match the image ({out.shape})")
        out[mask] = class_id
    return out


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """A record's ``segmentation`` (counts as str or bytes) back to an ``HxW`` boolean mask."""
    counts = rle["counts"]
    encoded = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(encoded).astype(bool)


def output_paths(out_stem: str | Path, formats: Iterable[str]) -> dict[str, Path]:
    """The files one image gets for ``formats``: ``"png"`` (label map + overlay),
    ``"labels"`` (the label map alone, without the costly overlay), ``"json"``."""
    out_stem = Path(out_stem)
    wanted = set(formats)
    kinds = (
        (["labels", "overlay"] if "png" in wanted else ["labels"] if "labels" in wanted else [])
        + (["json"] if "json" in wanted else [])
    )
    return {kind: out_stem.with_name(out_stem.name + IMAGE_OUTPUTS[kind]) for kind in kinds}


@dataclass
class ImageResults:
    """What :func:`write_image_results` wrote: the paths by kind, and the JSON document."""

    paths: dict[str, Path] = field(default_factory=dict)
    document: dict[str, Any] = field(default_factory=dict)


def write_image_results(
    out_stem: str | Path,
    image: Image.Image,
    segments: Sequence[Mapping[str, Any]],
    id2label: Mapping[Any, str],
    *,
    source: str | Path,
    task: str,
    model: str | None,
    formats: Iterable[str] = ("png", "json"),
    alpha: float = 0.5,
    options: Mapping[str, Any] | None = None,
) -> ImageResults:
    """Write one image's results atomically; the JSON (if asked for) is written last.

    Args:
        out_stem: path without suffix, e.g. ``OUT/street`` gives ``OUT/street.json``,
            ``OUT/street_labels.png`` and ``OUT/street_overlay.png``.
        image: the RGB image that was segmented (for the overlay and the size).
        segments: the pipeline's ``{"score", "label", "mask"}`` dicts for this image.
        id2label: the model's ``config.id2label``.
        source: the input as the user named it (recorded in the JSON).
        task: the subtask that produced the segments (``"semantic"``, ...).
        model: the model's name or path (recorded in the JSON).
        formats: any of ``"png"`` (or ``"labels"``, without the overlay) and ``"json"``.
        alpha: overlay opacity.
        options: the answer-changing call options (:func:`answer_options`), recorded in the
            JSON as ``"options"`` when given.
    """
    paths = output_paths(out_stem, formats)
    records = segments_to_records(segments, id2label)
    if "labels" in paths:
        atomic_write_bytes(paths["labels"], label_map_png(segments, id2label, image.size))
    if "overlay" in paths:
        atomic_write_bytes(paths["overlay"], overlay_png(image, segments, id2label, alpha=alpha))
    document = image_document(
        image, records, id2label, source=source, task=task, model=model,
        label_map_file=paths["labels"].name if "labels" in paths else None,
    )
    if options is not None:
        document["options"] = dict(options)
    if "json" in paths:
        atomic_write_text(paths["json"], document_json(document))
    return ImageResults(paths=paths, document=document)


def answer_options(call_options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that change the answers (a pipeline call's ``threshold`` and ``tta``, the
    pipeline's ``quantize``), as given: an absent key is the default.

    ``omniseg segment`` records them in each JSON and redoes an image on a re-run when they
    differ, as it does for another model or task; a re-run with another ``--threshold`` used
    to keep the old answers as "already done".
    """
    # "is", not "in (None, False)": a threshold of 0.0 equals False.
    return {key: value for key in ANSWER_OPTIONS if (value := call_options.get(key)) is not None and value is not False}


def image_document(
    image: Image.Image,
    records: Sequence[Mapping[str, Any]],
    id2label: Mapping[Any, str],
    *,
    source: str | Path,
    task: str,
    model: str | None,
    label_map_file: str | None,
) -> dict[str, Any]:
    """One image's JSON document (see the module docstring) around its segment ``records``
    (from :func:`segments_to_records`); ``label_map`` names ``label_map_file`` when there is one."""
    return {
        "image": str(source),
        "width": image.width,
        "height": image.height,
        "task": task,
        "model": None if model is None else str(model),
        "label_map": (
            {"file": label_map_file, "unassigned": unassigned_value(id2label)}
            if label_map_file is not None
            else None
        ),
        "segments": list(records),
    }


def label_map_png(
    segments: Sequence[Mapping[str, Any]], id2label: Mapping[Any, str], size: tuple[int, int]
) -> bytes:
    """The :func:`label_map` of ``size`` (width, height) as PNG bytes (8- or 16-bit grey)."""
    return _png_bytes(Image.fromarray(label_map(segments, id2label, size)))


def overlay_png(
    image: Image.Image,
    segments: Sequence[Mapping[str, Any]],
    id2label: Mapping[Any, str],
    *,
    alpha: float = 0.5,
) -> bytes:
    """The overlay picture (segments blended in, with a legend) as PNG bytes."""
    overlay = draw_overlay(image, segments, alpha=alpha, id2label=id2label)
    # Photographic content: zlib's fastest level writes a 12-megapixel overlay 3x faster
    # (0.8 s against 2.6 s) for a file about a quarter larger.
    return _png_bytes(overlay, compress_level=1)


def read_image_results(path: str | Path) -> dict[str, Any]:
    """Read back a per-image JSON written by :func:`write_image_results`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def coco_document(
    documents: Sequence[Mapping[str, Any]],
    id2label: Mapping[Any, str],
    *,
    file_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Gather per-image documents into one COCO-format dict (``pycocotools.coco.COCO`` loads it).

    ``{"images": [{id, file_name, width, height}], "categories": [{id, name}],
    "annotations": [{id, image_id, category_id, segmentation (RLE), area, bbox, iscrowd: 0,
    score}]}``: image ids count from 1 in the given order, category ids are the model's
    class ids, and ``score`` is left out for semantic segments (which have none). The
    ``annotations`` list is also valid input to ``COCO.loadRes`` for evaluation.
    """
    images, annotations = [], []
    for image_id, document in enumerate(documents, start=1):
        name = file_names[image_id - 1] if file_names is not None else document["image"]
        images.append(
            {"id": image_id, "file_name": str(name), "width": document["width"], "height": document["height"]}
        )
        for segment in document["segments"]:
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": segment["label_id"],
                "segmentation": segment["segmentation"],
                "area": segment["area"],
                "bbox": segment["bbox"],
                "iscrowd": 0,
            }
            if segment.get("score") is not None:
                annotation["score"] = segment["score"]
            annotations.append(annotation)
    categories = [
        {"id": class_id, "name": str(label)}
        for class_id, label in sorted((int(k), v) for k, v in id2label.items())
    ]
    return {"images": images, "categories": categories, "annotations": annotations}


def write_coco(path: str | Path, document: Mapping[str, Any]) -> None:
    """Write a :func:`coco_document` atomically."""
    atomic_write_text(path, json.dumps(document) + "\n")


def document_json(document: Mapping[str, Any]) -> str:
    """An image document as indented JSON, one segment per line: readable, diff-friendly."""
    head = json.dumps({k: v for k, v in document.items() if k != "segments"}, indent=1)
    segments = ",\n".join("  " + json.dumps(segment) for segment in document["segments"])
    body = f"[\n{segments}\n ]" if segments else "[]"
    return f'{head[:-2]},\n "segments": {body}\n}}\n'


def _png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
