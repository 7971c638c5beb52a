"""The model to train: a checkpoint to fine-tune, or a config to train from scratch."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from omniseg.errors import UnsupportedModelError
from omniseg.hub import resolve_model_dir
from omniseg.models.auto import (
    ARCHITECTURES,
    NOT_TRAINABLE,
    load_processor,
    model_class,
    model_type_of,
    processor_class,
)
from omniseg.models.base import PretrainedModel
from omniseg.models.config import read_json
from omniseg.processing.base import PROCESSOR_NAME

logger = logging.getLogger(__name__)


def with_labels(model: PretrainedModel, id2label: dict[int, str], *, seed: int = 0) -> tuple[PretrainedModel, list[str]]:
    """The model with ``id2label`` as its classes.

    When the classes differ, the model is rebuilt from its config with the new labels and
    every weight whose shape still fits is copied over; the class head (whose shape depends on
    the number of classes) keeps its fresh, seeded initialisation. Returns the model and the
    names of the re-initialised weights (empty when the labels were already the same).
    """
    if dict(model.config.id2label) == dict(id2label):
        return model, []
    config = dataclasses.replace(model.config, id2label=dict(id2label))
    torch.manual_seed(seed)
    fresh = type(model)(config)
    old = model.state_dict()
    new = fresh.state_dict()
    keep = {k: v for k, v in old.items() if k in new and new[k].shape == v.shape}
    reinitialised = sorted(k for k in new if k not in keep)
    fresh.load_state_dict(keep, strict=False)
    logger.info("new classes: re-initialised %s", ", ".join(reinitialised))
    return fresh, reinitialised


def load_for_training(
    model_or_config: str | Path, *, id2label: dict[int, str] | None = None, seed: int = 0
) -> tuple[PretrainedModel, Any, str, list[str]]:
    """Model, processor, model type and re-initialised weight names for a training run.

    Args:
        model_or_config: a checkpoint directory or hub id (fine-tuning), or a ``config.json``
            file (training from scratch, seeded initialisation; the processor comes from a
            ``preprocessor_config.json`` beside it, else the architecture's defaults).
        id2label: the dataset's classes; when they differ from the model's, the class head
            is replaced (see :func:`with_labels`).
        seed: seed of every fresh initialisation.
    """
    path = Path(model_or_config)
    if path.is_file():
        data = read_json(path)
        model_type = data.get("model_type")
        if model_type not in ARCHITECTURES:
            supported = ", ".join(sorted(ARCHITECTURES))
            raise UnsupportedModelError(path, f"model_type {model_type!r} is not supported (supported: {supported})")
        if model_type in NOT_TRAINABLE:
            raise UnsupportedModelError(path, NOT_TRAINABLE[model_type])
        cls = model_class(model_type)
        config = cls.config_class.from_dict(data)
        if id2label is not None:
            config = dataclasses.replace(config, id2label=dict(id2label))
        torch.manual_seed(seed)
        model = cls(config)
        processor_file = path.parent / PROCESSOR_NAME
        processor_cls = processor_class(model_type)
        processor = (
            processor_cls.from_dict(read_json(processor_file)) if processor_file.is_file() else processor_cls()
        )
        return model, processor, model_type, []
    directory = resolve_model_dir(model_or_config)
    model_type = model_type_of(directory)
    if model_type in NOT_TRAINABLE:
        raise UnsupportedModelError(directory / "config.json", NOT_TRAINABLE[model_type])
    model = model_class(model_type).from_pretrained(directory)
    processor = load_processor(directory)
    reinitialised: list[str] = []
    if id2label is not None:
        model, reinitialised = with_labels(model, id2label, seed=seed)
    return model, processor, model_type, reinitialised

