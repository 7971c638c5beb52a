"""The work of one ``POST /v1/segment`` request, run on an inference thread."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePath

from omniseg.io.images import load_image_bytes
from omniseg.io.results import (
    coco_document,
    document_json,
    image_document,
    label_map_png,
    overlay_png,
    segments_to_records,
)
from omniseg.serve.registry import ServedModel
from omniseg.serve.requests import SegmentRequest


@dataclass(frozen=True)
class Answer:
    """A finished response body, its media type, and the file name to save it under."""

    body: bytes
    media_type: str
    filename: str


# File name suffix of each format, as ``omniseg segment`` names its outputs.
_SUFFIXES = {"json": ".json", "coco": "_coco.json", "png": "_labels.png", "overlay": "_overlay.png"}


def segment(model: ServedModel, request: SegmentRequest, task: str) -> Answer:
    """Decode the image, segment it with ``model`` for ``task`` (already resolved), and
    encode the answer in ``request.format``: the same bytes that ``omniseg segment`` writes.

    Raises:
        InputError: the image cannot be decoded, is too large, or cannot become RGB.
    """
    image = load_image_bytes(request.image, name=request.filename, max_pixels=model.max_pixels)
    segments = model.segments(image, task, request.threshold)
    id2label = model.pipeline.id2label
    name = _download_name(request.filename, _SUFFIXES[request.format])

    if request.format == "png":
        return Answer(label_map_png(segments, id2label, image.size), "image/png", name)
    if request.format == "overlay":
        return Answer(overlay_png(image, segments, id2label), "image/png", name)
    document = image_document(
        image, segments_to_records(segments, id2label), id2label,
        source=request.filename, task=task, model=model.name, label_map_file=None,
    )
    if request.format == "coco":
        coco = coco_document([document], id2label, file_names=[request.filename])
        return Answer(json.dumps(coco).encode("utf-8"), "application/json", name)
    return Answer(document_json(document).encode("utf-8"), "application/json", name)


def _download_name(filename: str, suffix: str) -> str:
    """``street.jpg`` -> ``street_overlay.png``: the stem, kept to characters safe in a header."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", PurePath(filename.replace("\\", "/")).stem).strip("._")
    return (stem or "image") + suffix
