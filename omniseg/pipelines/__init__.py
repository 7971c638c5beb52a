"""Task pipelines: image in, segments out. ``pipeline(task, model=...)`` builds one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omniseg.errors import ModelNotFoundError

TASKS = ("image-segmentation", "mask-generation")


def pipeline(
    task: str,
    model: str | Path | None = None,
    device: str | torch.device = "cpu",
    **kwargs: Any,
):
    """Build the pipeline for ``task``.

    Args:
        task: ``"image-segmentation"`` or ``"mask-generation"`` (Segment Anything).
        model: a checkpoint directory or hub id; ``None`` picks the bundled default model
            (``image-segmentation`` only).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        kwargs: passed to the pipeline class (for example ``max_pixels``).
    """
    if task == "image-segmentation":
        from omniseg.pipelines.image_segmentation import ImageSegmentationPipeline

        model = _model_or_default(model)
        _reject_mask_generation_model(model)
        return ImageSegmentationPipeline.from_pretrained(model, device=device, **kwargs)
    if task == "mask-generation":
        from omniseg.pipelines.mask_generation import MaskGenerationPipeline

        if model is None:
            raise ModelNotFoundError(
                "<default model>", "mask-generation has no bundled model; pass model= a SAM checkpoint"
            )
        return MaskGenerationPipeline.from_pretrained(model, device=device, **kwargs)
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


def _reject_mask_generation_model(model: str | Path) -> None:
    """A Segment Anything checkpoint has no classes to segment by: say so up front."""
    from omniseg.errors import UnsupportedModelError
    from omniseg.hub import resolve_model_dir
    from omniseg.models.auto import model_type_of

    directory = resolve_model_dir(model)
    if model_type_of(directory) == "sam":
        raise UnsupportedModelError(
            directory / "config.json",
            "model_type 'sam' (Segment Anything) is a mask-generation model; use "
            "pipeline('mask-generation', ...) or omniseg segment --task everything",
        )
