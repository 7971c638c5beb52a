"""Reading and writing model weights in the hub layout.

A model directory holds ``config.json`` and the weights as ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``), or ``pytorch_model.bin`` for older checkpoints.
Parameter names are the reference implementation's, so checkpoints move both ways.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from omniseg.errors import CheckpointError
from omniseg.io.atomic import atomic_write_bytes

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of the checkpoint in ``directory`` onto the CPU."""
    directory = Path(directory)
    single = directory / SAFETENSORS_NAME
    index = directory / SAFETENSORS_INDEX_NAME
    legacy = directory / PYTORCH_NAME
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(index, f"unreadable shard index ({exc})") from exc
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load_safetensors(directory / shard))
        return state
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise CheckpointError(legacy, f"cannot read PyTorch weights ({exc})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(legacy, "expected a state dict of tensors")
        return state
    raise CheckpointError(
        directory, f"no weights found (expected {SAFETENSORS_NAME} or {PYTORCH_NAME})"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read safetensors weights ({exc})") from exc


def load_state_dict_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str | Path,
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """Copy ``state`` into ``module``, refusing missing, unexpected or mis-shaped tensors.

    Args:
        ignore_unexpected: names in the checkpoint that are allowed to have no place in the
            module (buffers the reference saves but recomputes, for example).
    """
    expected = module.state_dict()
    ignored = set(ignore_unexpected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - ignored)
    mismatched = sorted(
        f"{name}: checkpoint {tuple(state[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(expected) & set(state)
        if state[name].shape != expected[name].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for title, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", mismatched),
        ):
            if names:
                shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
                parts.append(f"{title} tensors: {shown}")
        raise CheckpointError(source, "weights do not fit the architecture; " + "; ".join(parts))
    module.load_state_dict({name: state[name] for name in expected}, strict=True)


def save_state_dict(
    module: torch.nn.Module, directory: str | Path, *, extra: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``module``'s weights, plus ``extra`` tensors, as ``model.safetensors``."""
    path = Path(directory) / SAFETENSORS_NAME
    state = {**module.state_dict(), **(extra or {})}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))
    return path


@contextlib.contextmanager
def saving_into(directory: str | Path) -> Iterator[Path]:
    """Create ``directory`` for a ``save_pretrained`` and yield it; a place that cannot be
    written is a :class:`CheckpointError` naming it, as is any ``OSError`` while the files are
    written inside the ``with`` block.

    Without it, saving into a file's path was pathlib's bare "FileExistsError: [Errno 17]
    File exists", below a file "NotADirectoryError", with no word of a model being saved.
    """
    directory = Path(directory)
    existing = Path(os.path.abspath(directory))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        if existing == Path(os.path.abspath(directory)):
            raise CheckpointError(directory, "cannot save here: it exists and is not a folder")
        raise CheckpointError(directory, f"cannot save here: {existing} is a file, so no folder can be created below it")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(directory, f"cannot create the folder to save into ({exc.strerror or exc})") from exc
    try:
        yield directory
    except OSError as exc:
        raise CheckpointError(directory, f"cannot write there ({exc.strerror or exc})") from exc
