"""The web service: ``create_app`` builds the FastAPI app around loaded models.

Routes: ``POST /v1/segment``, ``POST /v1/mask-generation`` (Segment Anything models),
``GET /v1/models``, ``GET /healthz``, the page at ``/`` with
its files under ``/static/``, and the OpenAPI page at ``/docs``. Every error is answered as
JSON ``{"error": type, "message": text}`` with its HTTP status, never with a stack trace.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from omniseg.errors import InputError
from omniseg.serve.errors import BadParameterError, InferenceError, ServiceError
from omniseg.serve.limits import BodySizeLimit
from omniseg.serve.pool import InferencePool
from omniseg.serve.registry import ModelRegistry, ServedModel
from omniseg.serve.requests import FORMATS, TASKS, SegmentRequest, read_segment_request
from omniseg.serve.segment import segment

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Room in a request body besides the image: multipart headers and fields, and the growth of
# base64 (4 bytes for 3) in JSON bodies.
_FRAMING_BYTES = 64 * 1024

API_DESCRIPTION = """\
Segment images with the models this service has loaded.

`POST /v1/segment` takes a `multipart/form-data` upload (file field `image`) or a JSON
object with the image file base64-encoded (`image`, optionally `filename`), and optional
`task`, `threshold`, `model` and `format` (form fields or JSON keys). It answers with the
same per-image JSON as `omniseg segment` (segments with id, label_id, label, score, area,
bbox, COCO RLE), a COCO file, the label-map PNG, or the overlay PNG.

Errors are JSON `{"error": type, "message": text}`: 400 unreadable image, decompression
bomb or bad parameter; 404 unknown model; 413 image too large; 415 body neither multipart
nor JSON; 503 busy (every worker running and the queue full: retry later).
"""

_SEGMENT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "the image file"},
                    "task": {"type": "string", "enum": list(TASKS), "default": "auto"},
                    "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                                  "description": "minimum segment score (instance, panoptic); default 0.9"},
                    "model": {"type": "string", "description": "a name from GET /v1/models; default: the first"},
                    "format": {"type": "string", "enum": list(FORMATS), "default": "json"},
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "byte",
                              "description": "the image file, base64 (a data: URL is accepted)"},
                    "filename": {"type": "string"},
                    "task": {"type": "string", "enum": list(TASKS), "default": "auto"},
                    "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                    "model": {"type": "string"},
                    "format": {"type": "string", "enum": list(FORMATS), "default": "json"},
                },
            }
        },
    },
}

_ERROR_SCHEMA = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
        }
    }
}

_SEGMENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "format=json: the image document (as `omniseg segment` writes STEM.json); "
        "coco: a COCO file of this image; png: the label map (class id per pixel, 255 or "
        "65535 where no segment); overlay: the picture with segments and legend",
        "content": {"application/json": {}, "image/png": {}},
    },
    400: {"description": "not an image, decompression bomb, or bad parameter", "content": _ERROR_SCHEMA},
    404: {"description": "unknown model", "content": _ERROR_SCHEMA},
    413: {"description": "image or body too large", "content": _ERROR_SCHEMA},
    415: {"description": "body neither multipart/form-data nor JSON", "content": _ERROR_SCHEMA},
    503: {"description": "busy: every worker running and the queue full", "content": _ERROR_SCHEMA},
}


def create_app(
    registry: ModelRegistry,
    *,
    workers: int = 1,
    queue_size: int = 8,
    max_upload_bytes: int = 20 * 1024 * 1024,
) -> FastAPI:
    """The service for ``registry``'s models.

    Args:
        registry: the loaded models; requests naming none get the first.
        workers: inference threads (each runs one request at a time on the shared models).
        queue_size: admitted requests that may wait for a worker; more get 503 at once.
        max_upload_bytes: largest accepted image file (its bytes, before any base64).
    """
    from omniseg import __version__

    pool = InferencePool(workers=workers, queue_size=queue_size)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown()

    app = FastAPI(title="omniseg", version=__version__, description=API_DESCRIPTION, lifespan=lifespan)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=max_upload_bytes * 4 // 3 + _FRAMING_BYTES,
        note=f" (images up to {max_upload_bytes} bytes, {max_upload_bytes / 2**20:g} MiB)",
    )
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", summary="Liveness and load")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": [model.name for model in registry],
            "workers": pool.workers,
            "capacity": pool.capacity,
            "in_use": pool.in_use,
        }

    @app.get("/v1/models", summary="The loaded models: names, tasks, classes and their colours")
    async def models() -> dict[str, Any]:
        return {"default": registry.default.name, "models": [model.describe() for model in registry]}

    @app.post(
        "/v1/segment",
        summary="Segment one image",
        openapi_extra={"requestBody": _SEGMENT_BODY},
        responses=_SEGMENT_RESPONSES,
        response_class=Response,
    )
    async def segment_image(request: Request) -> Response:
        async with pool.slot() as slot:
            parsed = await read_segment_request(request, max_image_bytes=max_upload_bytes)
            model = registry.get(parsed.model)
            if model.kind != "image-segmentation":
                raise BadParameterError(
                    f"model {model.name!r} is a Segment Anything model (masks, not classes): "
                    "POST the image to /v1/mask-generation"
                )
            try:
                task = model.pipeline.resolve_subtask(None if parsed.task == "auto" else parsed.task)
            except ValueError as exc:
                raise BadParameterError(f"task: {exc} (model {model.name!r})") from None
            return await _answer(slot, model, parsed, task)

    @app.post(
        "/v1/mask-generation",
        summary="Every mask in one image (Segment Anything models)",
        openapi_extra={"requestBody": _SEGMENT_BODY},
        responses=_SEGMENT_RESPONSES,
        response_class=Response,
    )
    async def generate_masks(request: Request) -> Response:
        async with pool.slot() as slot:
            parsed = await read_segment_request(request, max_image_bytes=max_upload_bytes)
            model = registry.get(parsed.model, kind="mask-generation")
            if model.kind != "mask-generation":
                raise BadParameterError(
                    f"model {model.name!r} is not a Segment Anything model: POST the image to /v1/segment"
                )
            if parsed.task not in ("auto", "everything"):
                raise BadParameterError(f"task: mask generation gives every mask (task everything), not {parsed.task}")
            return await _answer(slot, model, parsed, "everything")

    async def _answer(slot: Any, model: ServedModel, parsed: SegmentRequest, task: str) -> Response:
        """Run the request's job on the slot's worker thread and wrap its bytes."""
        try:
            answer = await slot.run(segment, model, parsed, task)
        except InputError:
            raise
        except Exception as exc:
            logger.exception("segmenting %s with %s failed", parsed.filename, model.name)
            raise InferenceError(
                f"segmenting {parsed.filename} with {model.name!r} failed "
                f"({type(exc).__name__}); the server log has the details"
            ) from exc
        return Response(
            answer.body,
            media_type=answer.media_type,
            headers={"Content-Disposition": f'inline; filename="{answer.filename}"'},
        )

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _error(exc.status, type(exc).__name__, exc.message, headers)

    @app.exception_handler(InputError)
    async def input_error(_: Request, exc: InputError) -> JSONResponse:
        # Unreadable, corrupt or over-large images (decompression bombs included).
        return _error(400, type(exc).__name__, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "HTTPError", str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "BadParameterError", "; ".join(str(e.get("msg")) for e in exc.errors()))


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status, headers=headers)
