"""Load any supported checkpoint by the ``model_type`` in its ``config.json``."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from omniseg.errors import CheckpointError, UnsupportedModelError
from omniseg.hub import resolve_model_dir
from omniseg.models.base import PretrainedModel
from omniseg.models.config import CONFIG_NAME, read_json
from omniseg.processing.base import ImageProcessor

# model_type -> (module, model class, processor module, processor class).
# Imported lazily so that ``import omniseg`` stays fast.
ARCHITECTURES: dict[str, tuple[str, str, str, str]] = {
    "mask2former": (
        "omniseg.models.mask2former",
        "Mask2FormerForUniversalSegmentation",
        "omniseg.processing.mask2former",
        "Mask2FormerImageProcessor",
    ),
    "maskformer": (
        "omniseg.models.maskformer",
        "MaskFormerForInstanceSegmentation",
        "omniseg.processing.maskformer",
        "MaskFormerImageProcessor",
    ),
    "oneformer": (
        "omniseg.models.oneformer",
        "OneFormerForUniversalSegmentation",
        "omniseg.processing.oneformer",
        "OneFormerImageProcessor",
    ),
    "detr": (
        "omniseg.models.detr",
        "DetrForSegmentation",
        "omniseg.processing.detr",
        "DetrImageProcessor",
    ),
    "segformer": (
        "omniseg.models.segformer",
        "SegformerForSemanticSegmentation",
        "omniseg.processing.segformer",
        "SegformerImageProcessor",
    ),
    "sam": (
        "omniseg.models.sam",
        "SamModel",
        "omniseg.processing.sam",
        "SamImageProcessor",
    ),
}

# Architectures that classify masks (queries with class and mask logits, trained on binary
# mask targets) rather than pixels.
MASK_CLASSIFICATION_TYPES = frozenset({"mask2former", "maskformer"})

# Architectures omniseg runs for inference only: model_type -> why ``omniseg train`` refuses it.
NOT_TRAINABLE: dict[str, str] = {
    "oneformer": "training is not offered for OneFormer (omniseg runs it for inference only: "
    "its task-conditioned targets and contrastive text loss are not implemented)",
    "detr": "training is not offered for model_type 'detr': omniseg runs it for inference only "
    "(segment, evaluate, serve, the Python API)",
    "sam": "training is not offered for Segment Anything (model_type 'sam'): it predicts masks from "
    "prompts, not classes; use it with `omniseg segment --task everything`, `--points` or `--box`",
}


def model_type_of(directory: Path) -> str:
    config = read_json(directory / CONFIG_NAME)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        what = "no model_type" if model_type is None else f"model_type {model_type!r} is not supported"
        raise UnsupportedModelError(directory / CONFIG_NAME, f"{what} (supported: {supported})")
    return model_type


def model_class(model_type: str) -> type[PretrainedModel]:
    module, name, _, _ = ARCHITECTURES[model_type]
    return getattr(importlib.import_module(module), name)


def processor_class(model_type: str) -> type[ImageProcessor]:
    _, _, module, name = ARCHITECTURES[model_type]
    return getattr(importlib.import_module(module), name)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or a ``ValueError`` saying why it cannot be used here.

    Without this check a CUDA device on a machine without CUDA failed only once the weights
    moved, with PyTorch's bare ``AssertionError: Torch not compiled with CUDA enabled``.
    """
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r}: {exc}") from None
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use device='cpu'")
    return checked


def load_model(name_or_path: str | Path, *, device: str | torch.device = "cpu") -> PretrainedModel:
    """Load a checkpoint directory or hub id as a ``torch.nn.Module`` in eval mode.

    Raises:
        ValueError: ``device`` does not exist on this machine (checked before any loading).
    """
    check_device(device)
    directory = resolve_model_dir(name_or_path)
    return model_class(model_type_of(directory)).from_pretrained(directory, device=device)


def load_processor(name_or_path: str | Path) -> ImageProcessor:
    """Load the image processor that goes with a checkpoint directory or hub id."""
    directory = resolve_model_dir(name_or_path)
    model_type = model_type_of(directory)
    # OneFormer checkpoints saved by recent references nest the image processor's settings
    # in processor_config.json instead (its processor reads either).
    nested = model_type == "oneformer" and (directory / "processor_config.json").is_file()
    if not (directory / "preprocessor_config.json").is_file() and not nested:
        raise CheckpointError(directory, "no preprocessor_config.json in the model directory")
    return processor_class(model_type).from_pretrained(directory)
