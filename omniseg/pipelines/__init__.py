"""Task pipelines: image in, segments out. ``pipeline(task, model=...)`` builds one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omniseg.errors import ModelNotFoundError

TASKS = ("image-segmentation",)


def pipeline(
    task: str,
    model: str | Path | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
):
    """Build the pipeline for ``task``.

    Args:
        task: ``"image-segmentation"``.
        model: a checkpoint directory or hub id; ``None`` picks the bundled default model.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        kwargs: passed to the pipeline class (for example ``max_pixels``).
    """
    if task == "image-segmentation":
        from omniseg.pipelines.image_segmentation import ImageSegmentationPipeline

        return ImageSegmentationPipeline.from_pretrained(
            _model_or_default(model), device=device, **kwargs
        )
    raise ValueError(f"unknown task {task!r}; supported tasks: {', '.join(TASKS)}")


def _model_or_default(model: str | Path | None) -> str | Path:
    if model is not None:
        return model
    from omniseg.assets import default_model_dir

    directory = default_model_dir()
    if directory is None:
        raise ModelNotFoundError(
            "<default model>",
            "this installation has no bundled default model; pass model= a checkpoint "
            "directory or hub id (for example a Mask2Former or SegFormer checkpoint)",
        )
    return directory
