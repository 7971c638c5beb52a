"""The models a service answers with: each loaded once, shared by every request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omniseg.pipelines.image_segmentation import ImageSegmentationPipeline
from omniseg.serve.errors import UnknownModelError
from omniseg.viz.palette import color_for

# The name under which the bundled default model is served when no model is given.
DEFAULT_MODEL_NAME = "default"


@dataclass(frozen=True)
class ServedModel:
    """A loaded pipeline and how clients name it."""

    name: str
    pipeline: ImageSegmentationPipeline

    @property
    def tasks(self) -> list[str]:
        return self.pipeline.supported_subtasks()

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says about the model: its tasks, classes and colours."""
        id2label = self.pipeline.id2label
        return {
            "name": self.name,
            "architecture": type(self.pipeline.model).__name__,
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

        names = list(dict.fromkeys(names))  # the same model twice is loaded once
        loaded = [
            ServedModel(
                name=name,
                pipeline=omniseg.pipeline("image-segmentation", model=name, device=device, max_pixels=max_pixels),
            )
            for name in names
        ]
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

    def get(self, name: str | None) -> ServedModel:
        """The model called ``name`` (``None`` or empty: the default)."""
        if not name:
            return self.default
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._models)
            raise UnknownModelError(f"unknown model {name!r}; this service has {known}") from None
