"""The one way to build, load and save a model: from a config, in the hub layout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from omniseg.errors import CheckpointError
from omniseg.hub import resolve_model_dir
from omniseg.models.checkpoint import load_state_dict_strict, read_state_dict, save_state_dict, saving_into
from omniseg.models.config import CONFIG_NAME, ModelConfig


class PretrainedModel(nn.Module):
    """Base of omniseg's top-level models.

    Subclasses set ``config_class`` and ``architecture`` (the reference implementation's
    class name, written to ``config.json`` so the reference can load what omniseg saves),
    and build their layers from ``config`` in ``__init__``.
    """

    config_class: ClassVar[type[ModelConfig]]
    architecture: ClassVar[str]
    # Checkpoint tensors the reference stores but omniseg derives (e.g. index buffers).
    ignore_on_load: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, device: str | torch.device = "cpu"
    ) -> "PretrainedModel":
        """Build the model from ``config.json`` and load its weights strictly; eval mode."""
        directory = resolve_model_dir(name_or_path)
        config = cls.config_class.from_json_file(directory / CONFIG_NAME)
        state = read_state_dict(directory)
        # The strict load below overwrites every parameter and persistent buffer, so the
        # random initialisation would be thrown away (it is most of the load time).
        try:
            with _skip_weight_init():
                model = cls.for_checkpoint(config, state)
        except (TypeError, ValueError, AssertionError, IndexError, KeyError, ZeroDivisionError, RuntimeError) as exc:
            # Values of the right type that no model can have (hidden_dim not a multiple of
            # num_attention_heads, say) fail inside torch's layers, with torch's words only.
            raise CheckpointError(
                directory / CONFIG_NAME,
                f"cannot build {cls.__name__} from this config ({type(exc).__name__}: {exc})",
            ) from exc
        ignored = [name for name in state if any(name.endswith(s) for s in cls.ignore_on_load)]
        load_state_dict_strict(model, state, source=directory, ignore_unexpected=ignored)
        return model.to(device).eval()

    @classmethod
    def for_checkpoint(cls, config: ModelConfig, state: Mapping[str, torch.Tensor]) -> "PretrainedModel":
        """The model that ``state`` (a checkpoint's tensors) will be loaded into: ``cls(config)``,
        unless an architecture's optional parts depend on what the checkpoint carries."""
        return cls(config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (atomically) into ``directory``.

        Raises:
            CheckpointError: ``directory`` is a file, or cannot be created or written.
        """
        with saving_into(directory) as directory:
            self.config.extra["architectures"] = [self.architecture]
            self.config.save(directory)
            save_state_dict(self, directory, extra=self.reference_only_tensors())

    def reference_only_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the reference implementation expects in a checkpoint that omniseg derives
        or does not use; ``save_pretrained`` writes them so the reference loads our
        checkpoints without "missing weights" reports. Names must match ``ignore_on_load``."""
        return {}


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s in-place initialisers no-ops while a model is built whose
    weights are all about to be loaded (layers then hold uninitialised memory until the
    load). Process-wide while active: do not build other models in other threads meanwhile.
    """
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}

    def keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    try:
        for name in names:
            setattr(nn.init, name, keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)
