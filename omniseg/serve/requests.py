"""Reading a ``POST /v1/segment`` request: a multipart upload or JSON with a base64 image."""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from omniseg.serve.errors import BadParameterError, PayloadTooLargeError, UnsupportedMediaTypeError

# "everything": every mask of a Segment Anything model (POST /v1/mask-generation).
TASKS = ("auto", "panoptic", "instance", "semantic", "everything")
# json: the per-image document of ``omniseg segment``; coco: that image as a COCO file;
# png: the label map (class id per pixel); overlay: the picture with segments and legend.
FORMATS = ("json", "coco", "png", "overlay")
# Form fields / JSON keys besides the image.
PARAMETERS = ("task", "threshold", "model", "format")
# The name an image gets in answers and errors when the client gives none.
UNNAMED_IMAGE = "upload"


@dataclass(frozen=True)
class SegmentRequest:
    """A checked segmentation request.

    Attributes:
        image: the encoded image file's bytes (not decoded yet).
        filename: the client's name for it (the multipart file name, or JSON ``filename``).
        task: one of :data:`TASKS`.
        threshold: minimum score of kept segments, or ``None`` for the pipeline's default.
        model: the model's name, or ``None`` for the service's default model.
        format: one of :data:`FORMATS`.
    """

    image: bytes
    filename: str
    task: str = "auto"
    threshold: float | None = None
    model: str | None = None
    format: str = "json"


async def read_segment_request(request: Request, *, max_image_bytes: int) -> SegmentRequest:
    """Parse and check the request's body.

    Raises:
        UnsupportedMediaTypeError: neither ``multipart/form-data`` nor ``application/json``.
        BadParameterError: no image, bad base64 or JSON, or a parameter out of its range.
        PayloadTooLargeError: the image is larger than ``max_image_bytes``.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        image, filename, fields = await _read_multipart(request)
    elif content_type == "application/json" or content_type.endswith("+json"):
        image, filename, fields = await _read_json(request)
    else:
        raise UnsupportedMediaTypeError(
            f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data "
            "with an 'image' file, or application/json with a base64 'image'"
        )
    if len(image) > max_image_bytes:
        raise PayloadTooLargeError(
            f"image {filename} of {len(image)} bytes exceeds the limit of {max_image_bytes} bytes"
        )
    if not image:
        raise BadParameterError(f"image {filename} is empty (0 bytes)")
    return SegmentRequest(
        image=image,
        filename=filename,
        task=_choice("task", fields.get("task"), TASKS, "auto"),
        threshold=_threshold(fields.get("threshold")),
        model=_text("model", fields.get("model")),
        format=_choice("format", fields.get("format"), FORMATS, "json"),
    )


async def _read_multipart(request: Request) -> tuple[bytes, str, dict[str, Any]]:
    async with request.form(max_files=1, max_fields=len(PARAMETERS) + 1) as form:
        unknown = sorted(set(form.keys()) - {"image", *PARAMETERS})
        if unknown:
            raise BadParameterError(f"unknown field(s) {', '.join(unknown)}; expected image, {', '.join(PARAMETERS)}")
        upload = form.get("image")
        if upload is None:
            raise BadParameterError("no 'image' field: attach the image file as the 'image' form field")
        if not isinstance(upload, UploadFile):
            raise BadParameterError("the 'image' field must be a file upload, not a text field")
        data = await upload.read()
        fields = {name: form.get(name) for name in PARAMETERS}
        for name, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise BadParameterError(f"{name!r} must be a text field, not a file")
        return data, upload.filename or UNNAMED_IMAGE, fields


async def _read_json(request: Request) -> tuple[bytes, str, dict[str, Any]]:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadParameterError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadParameterError("the JSON body must be an object with an 'image' key")
    unknown = sorted(set(body) - {"image", "filename", *PARAMETERS})
    if unknown:
        raise BadParameterError(f"unknown key(s) {', '.join(unknown)}; expected image, filename, {', '.join(PARAMETERS)}")
    encoded = body.get("image")
    if not isinstance(encoded, str) or not encoded:
        raise BadParameterError("'image' must be the image file encoded as a base64 string")
    if encoded.startswith("data:"):  # a data URL, as browsers make them
        _, _, encoded = encoded.partition(",")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadParameterError(f"'image' is not valid base64: {exc}") from None
    filename = _text("filename", body.get("filename")) or UNNAMED_IMAGE
    return data, filename, {name: body.get(name) for name in PARAMETERS}


def _choice(name: str, value: Any, choices: tuple[str, ...], default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value.lower() not in choices:
        raise BadParameterError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _threshold(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadParameterError(f"threshold must be a number between 0 and 1, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadParameterError(f"threshold must be a number between 0 and 1, got {value!r}") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise BadParameterError(f"threshold must be between 0 and 1, got {value!r}")
    return number


def _text(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadParameterError(f"{name} must be a string, got {value!r}")
    return value
