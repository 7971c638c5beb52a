"""The models a service answers with: each loaded once, shared by every request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omniseg.assets import DEFAULT_MODEL_NAME
from omniseg.cli.segment_everything import MaskSegmenter
from omniseg.pipelines.image_segmentation import ImageSegmentationPipeline
from omniseg.serve.errors import UnknownModelError
from omniseg.viz.palette import color_for


@dataclass(frozen=True)
class ServedModel:
    """A loaded pipeline and how clients name it: an image-segmentation pipeline, or for a
    Segment Anything model the mask generator that ``omniseg segment --task everything`` uses
    (its masks answer as segments ``mask_1``, ``mask_2``, ... by decreasing score)."""

    name: str
    pipeline: ImageSegmentationPipeline | MaskSegmenter

    @property
    def kind(self) -> str:
        """``image-segmentation`` or ``mask-generation``: the route that serves the model."""
        return "mask-generation" if isinstance(self.pipeline, MaskSegmenter) else "image-segmentation"

    @property
    def tasks(self) -> list[str]:
        if isinstance(self.pipeline, MaskSegmenter):
            return ["everything"]
        return self.pipeline.supported_subtasks()

    @property
    def max_pixels(self) -> int | None:
        if isinstance(self.pipeline, MaskSegmenter):
            return self.pipeline.generator.max_pixels
        return self.pipeline.max_pixels

    def segments(self, image: Any, task: str, threshold: float | None) -> list[dict[str, Any]]:
        """The ``{"score", "label", "mask"}`` segments of one decoded image; ``threshold`` is
        the minimum score (for masks: the minimum predicted IoU), ``None`` the default."""
        options = {} if threshold is None else {"threshold": threshold}
        if isinstance(self.pipeline, MaskSegmenter):
            return self.pipeline([image], **options)[0]
        return self.pipeline.to_annotations(self.pipeline.predict([image], subtask=task, **options)[0])

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about the model: its tasks, classes and colours."""
        id2label = self.pipeline.id2label
        model = self.pipeline.generator.model if isinstance(self.pipeline, MaskSegmenter) else self.pipeline.model
        return {
            "name": self.name,
            "kind": self.kind,
            "architecture": type(model).__name__,
            "tasks": self.tasks,
            "labels": {str(k): v for k, v in sorted(id2label.items())},
            # The class colours of the overlay picture, so that clients can match them.
            "colors": {str(k): list(color_for(int(k))) for k in sorted(id2label)},
        }


class ModelRegistry:
    """Models by name, in the order given; the first one answers requests that name none."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ValueError("a registry needs at least one model")
        self._models = {model.name: model for model in models}
        if len(self._models) != len(models):
            raise ValueError("model names must be distinct")

    @classmethod
    def load(
        cls,
        names: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        max_pixels: int | None,
    ) -> "ModelRegistry":
        """Load each checkpoint directory or hub id of ``names`` once (none: the bundled default).

        Raises:
            CheckpointError, ModelNotFoundError, ...: as :func:`omniseg.pipeline` does.
        """
        import omniseg
        from omniseg.hub import resolve_model_dir
        from omniseg.models.auto import model_type_of
        from omniseg.pipelines.mask_generation import SAM_MODEL_TYPES

        def load(name: str) -> ImageSegmentationPipeline | MaskSegmenter:
            if model_type_of(resolve_model_dir(name)) in SAM_MODEL_TYPES:
                segmenter = MaskSegmenter(name, device=str(device))
                segmenter.generator.max_pixels = max_pixels
                return segmenter
            return omniseg.pipeline("image-segmentation", model=name, device=device, max_pixels=max_pixels)

        names = list(dict.fromkeys(names))  # the same model twice is loaded once
        loaded = [ServedModel(name=name, pipeline=load(name)) for name in names]
        if not loaded:
            loaded = [
                ServedModel(
                    name=DEFAULT_MODEL_NAME,
                    pipeline=omniseg.pipeline("image-segmentation", model=None, device=device, max_pixels=max_pixels),
                )
            ]
        return cls(loaded)

    @property
    def default(self) -> ServedModel:
        return next(iter(self._models.values()))

    def __iter__(self):
        return iter(self._models.values())

    def get(self, name: str | None, *, kind: str = "image-segmentation") -> ServedModel:
        """The model called ``name`` (``None`` or empty: the first model of ``kind``)."""
        if not name:
            for model in self._models.values():
                if model.kind == kind:
                    return model
            raise UnknownModelError(f"this service has no {kind} model; start it with --model naming one")
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._models)
            raise UnknownModelError(f"unknown model {name!r}; this service has {known}") from None
