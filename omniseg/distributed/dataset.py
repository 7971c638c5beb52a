"""``segment_dataset``: a Ray Data dataset of images to a dataset of segments.

The images are segmented by a pool of Ray actors, each loading the omniseg pipeline once
and calling it exactly as the local engine does (``pipeline(images, subtask=...,
threshold=..., batch_size=...)``), so each image gets the local engine's answer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniseg.errors import failure_reason
from omniseg.io.images import load_image, load_image_bytes
from omniseg.io.results import answer_options, segments_to_records, write_image_results

# Columns that segment_dataset adds to each row; one entry per segment in the list columns,
# in the order of the pipeline's answer (the order of the per-image JSON's "segments").
SEGMENT_COLUMNS = (
    "width",      # int32: image width in pixels
    "height",     # int32: image height in pixels
    "label_ids",  # list<int64>: class id per segment
    "labels",     # list<string>: class name per segment
    "scores",     # list<float64>: score per segment, null for semantic segments
    "areas",      # list<int64>: pixels per segment
    "boxes",      # list<fixed_size_list<int64, 4>>: [x, y, width, height] per segment
    "rles",       # list<string>: COCO RLE counts per segment (size: [height, width])
    "error_type",  # string: the exception's type name when the image failed, else null
    "error",      # string: why the image failed (a bad file, a model failure), else null
)  # fmt: skip


@dataclass(frozen=True)
class OutputFiles:
    """Tells the actors to write each image's files as ``omniseg segment`` does.

    Rows must then carry the output stem (``OUT/<folders>/<stem>``) in ``stem_column``.
    """

    formats: tuple[str, ...]
    model_name: str | None  # the model as the user named it, recorded in each JSON
    stem_column: str = "stem"


def segment_dataset(
    ds: Any,
    *,
    model: str | Path | None = None,
    task: str | None = None,
    image_column: str = "image",
    source_column: str | None = "path",
    threshold: float = 0.9,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.5,
    batch_size: int = 1,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    quantize: str | None = None,
) -> Any:
    """Segment every image of a ``ray.data.Dataset``; one output row per input row.

    Args:
        ds: a dataset whose ``image_column`` holds, per row, an ``HxWxC`` uint8 array (as
            ``ray.data.read_images`` gives), an encoded image file's bytes (as
            ``ray.data.read_binary_files`` gives), or a string: a local path, an http(s)
            URL, or a URI of any filesystem pyarrow supports (``s3://bucket/a.jpg``).
        model: a checkpoint directory or hub id, reachable from every node; ``None``: the
            bundled default model.
        task: ``"panoptic"``, ``"instance"``, ``"semantic"`` or ``None`` (the first of them
            the model supports).
        source_column: a column naming each image in error messages (``read_binary_files``'
            and ``read_images``' ``include_paths=True`` give ``"path"``); used if present.
        threshold, mask_threshold, overlap_mask_area_threshold: as the pipeline's.
        batch_size: images per actor call and per forward pass.
        actors: size of the actor pool (each holds one copy of the model).
        cpus_per_actor: CPUs Ray reserves per actor; also its PyTorch thread count.
        gpus_per_actor: GPUs per actor; above 0 the model runs on CUDA.
        quantize: ``"int8"``: each actor's pipeline in the opt-in fast CPU mode (see
            :func:`omniseg.pipeline`).

    Returns:
        The input dataset with :data:`SEGMENT_COLUMNS` added (Arrow columns). A row whose
        image cannot be read or segmented gets ``error_type`` and ``error`` and empty lists;
        the rest of the dataset goes on.
    """
    return map_with_actors(
        ds,
        model=model,
        task=task,
        image_column=image_column,
        source_column=source_column,
        call_options={
            "subtask": task,
            "threshold": threshold,
            "mask_threshold": mask_threshold,
            "overlap_mask_area_threshold": overlap_mask_area_threshold,
        },
        batch_size=batch_size,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        quantize=quantize,
        output_files=None,
    )


def map_with_actors(
    ds: Any,
    *,
    model: str | Path | None,
    task: str | None,
    image_column: str,
    source_column: str | None,
    call_options: Mapping[str, Any],
    batch_size: int,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    output_files: OutputFiles | None,
    quantize: str | None = None,
    mask_generation: Mapping[str, Any] | None = None,
) -> Any:
    """The actor-pool map behind :func:`segment_dataset` and the ``--engine ray`` command.

    With ``output_files`` each actor writes the image's files and the rows get only the
    ``error_type`` / ``error`` columns (``SEGMENT_COLUMNS`` otherwise). ``quantize``: as the
    pipeline's, for image-segmentation models. ``mask_generation``:
    the model is a Segment Anything one, run as ``omniseg segment --task everything`` runs
    it (``{"points": ..., "box": ...}``, each ``None`` for every mask in the image).
    """
    from omniseg.distributed.runtime import require_ray

    ray = require_ray()
    return ds.map_batches(
        SegmentImages,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        fn_constructor_kwargs={
            "model": _reachable(model),
            "task": task,
            "image_column": image_column,
            "source_column": source_column,
            "call_options": {**call_options, "batch_size": batch_size},
            "device": "cuda" if gpus_per_actor > 0 else "cpu",
            "threads": max(1, int(cpus_per_actor)),
            "output_files": output_files,
            "quantize": quantize,
            "mask_generation": None if mask_generation is None else dict(mask_generation),
        },
        # Fault tolerance is Ray Data's default for actor pools: a dead actor (killed, out
        # of memory, node lost) is restarted and the batch it held is done again.
    )


class SegmentImages:
    """A Ray Data actor: holds one pipeline and segments Arrow batches of image rows."""

    def __init__(
        self,
        *,
        model: str | None,
        task: str | None,
        image_column: str,
        source_column: str | None,
        call_options: dict[str, Any],
        device: str,
        threads: int,
        output_files: OutputFiles | None,
        quantize: str | None = None,
        mask_generation: dict[str, Any] | None = None,
    ) -> None:
        import torch

        import omniseg

        torch.set_num_threads(threads)
        if mask_generation is None:
            self.pipeline = omniseg.pipeline("image-segmentation", model=model, device=device, quantize=quantize)
        else:
            from omniseg.cli.segment_everything import MaskSegmenter

            self.pipeline = MaskSegmenter(model, device=device, **mask_generation)
        self.task = self.pipeline.resolve_subtask(task)
        self.quantize = quantize
        self.image_column = image_column
        self.source_column = source_column
        self.call_options = {**call_options, "subtask": self.task}
        self.output_files = output_files

    def __call__(self, batch: Any) -> Any:
        """``batch``: a ``pyarrow.Table`` of rows; returns it with the result columns added."""
        sources = self._sources(batch)
        images: list[Any] = [None] * batch.num_rows
        failures: list[BaseException | None] = [None] * batch.num_rows
        for row, (value, source) in enumerate(zip(_column_values(batch[self.image_column]), sources)):
            try:
                images[row] = _to_image(value, source)
            except Exception as exc:  # noqa: BLE001 - a bad image is that row's answer
                failures[row] = exc
        answers = self._segment(images, failures)
        if self.output_files is None:
            return _with_segment_columns(batch, images, answers, failures, self.pipeline.id2label)
        self._write(batch, sources, images, answers, failures)
        return _with_error_columns(batch, failures)

    def _sources(self, batch: Any) -> list[str]:
        """A name per row for errors and JSONs: the source column, the string itself, or the row."""
        if self.source_column is not None and self.source_column in batch.column_names:
            return [str(value) for value in batch[self.source_column].to_pylist()]
        if _is_string(batch[self.image_column].type):
            return [str(value) for value in batch[self.image_column].to_pylist()]
        return [f"<row {row} of a batch>" for row in range(batch.num_rows)]

    def _segment(self, images: list[Any], failures: list[BaseException | None]) -> list[Any]:
        """The pipeline's answer per row (None where it failed): the batch in one call, and
        image by image if that call fails, so a bad image costs only itself."""
        rows = [row for row, image in enumerate(images) if image is not None]
        answers: list[Any] = [None] * len(images)
        if not rows:
            return answers
        try:
            for row, answer in zip(rows, self.pipeline([images[r] for r in rows], **self.call_options)):
                answers[row] = answer
            return answers
        except Exception:  # noqa: BLE001 - isolated per image below
            pass
        for row in rows:
            try:
                answers[row] = self.pipeline([images[row]], **self.call_options)[0]
            except Exception as exc:  # noqa: BLE001 - that image's error
                failures[row] = exc
        return answers

    def _write(self, batch: Any, sources: list[str], images: list[Any], answers: list[Any],
               failures: list[BaseException | None]) -> None:
        spec = self.output_files
        stems = batch[spec.stem_column].to_pylist()
        for row, answer in enumerate(answers):
            if answer is None:
                continue
            try:
                write_image_results(
                    Path(stems[row]), images[row], answer, self.pipeline.id2label,
                    source=sources[row], task=self.task, model=spec.model_name, formats=spec.formats,
                    options=answer_options({**self.call_options, "quantize": self.quantize}),
                )
            except (OSError, ValueError) as exc:
                failures[row] = exc


def _reachable(model: str | Path | None) -> str | None:
    """A local model directory as an absolute path (actors may run elsewhere in the tree)."""
    if model is None:
        return None
    return os.path.abspath(model) if os.path.isdir(model) else str(model)


def _to_image(value: Any, source: str):
    import numpy as np

    from omniseg.distributed.sources import is_uri, read_uri

    if isinstance(value, (bytes, bytearray, memoryview)):
        return load_image_bytes(bytes(value), name=source)
    if isinstance(value, str):
        return load_image_bytes(read_uri(value), name=value) if is_uri(value) else load_image(value)
    if isinstance(value, np.ndarray):
        return load_image(value)
    raise TypeError(f"{source}: expected image bytes, an array or a path, got {type(value).__name__}")


def _column_values(column: Any) -> list[Any]:
    """Python values of an Arrow column: arrays for Ray's tensor columns, else ``to_pylist``."""
    values: list[Any] = []
    for chunk in column.chunks:
        if hasattr(chunk, "to_numpy") and type(chunk).__module__.startswith("ray."):
            values.extend(list(chunk.to_numpy()))  # one HxWxC array per row
        else:
            values.extend(chunk.to_pylist())
    return values


def _is_string(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _segment_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("label_ids", pa.list_(pa.int64())),
            ("labels", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float64())),
            ("areas", pa.list_(pa.int64())),
            ("boxes", pa.list_(pa.list_(pa.int64(), 4))),
            ("rles", pa.list_(pa.string())),
        ]
    )


def _with_segment_columns(batch, images, answers, failures, id2label) -> Any:
    import pyarrow as pa

    columns: dict[str, list[Any]] = {name: [] for name in _segment_schema().names}
    for row, answer in enumerate(answers):
        records = []
        if answer is not None:
            try:
                records = segments_to_records(answer, id2label)
            except ValueError as exc:
                failures[row] = exc
        image = images[row] if failures[row] is None else None
        columns["width"].append(None if image is None else image.width)
        columns["height"].append(None if image is None else image.height)
        columns["label_ids"].append([r["label_id"] for r in records])
        columns["labels"].append([r["label"] for r in records])
        columns["scores"].append([r["score"] for r in records])
        columns["areas"].append([r["area"] for r in records])
        columns["boxes"].append([r["bbox"] for r in records])
        columns["rles"].append([r["segmentation"]["counts"] for r in records])
    for field in _segment_schema():
        batch = batch.append_column(field, pa.array(columns[field.name], type=field.type))
    return _with_error_columns(batch, failures)


def _with_error_columns(batch, failures) -> Any:
    import pyarrow as pa

    types = [None if f is None else type(f).__name__ for f in failures]
    reasons = [None if f is None else failure_reason(f) for f in failures]
    batch = batch.append_column(pa.field("error_type", pa.string()), pa.array(types, type=pa.string()))
    return batch.append_column(pa.field("error", pa.string()), pa.array(reasons, type=pa.string()))
