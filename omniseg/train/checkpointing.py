"""Training checkpoints: everything a resumed run needs to continue exactly.

A checkpoint ``OUT/checkpoints/step-XXXXXXXX.pt`` holds the model, optimiser, scheduler and
gradient-scaler states, the step, the data position (epoch and samples consumed in it), the
best metric so far, and the RNG states (torch, CUDA, numpy, python) of *every* rank, gathered
to rank 0, which alone writes. Files are written atomically (temporary file, fsync, rename)
and ``latest.json`` is replaced only after its checkpoint is complete, so a kill at any
moment leaves the previous checkpoint usable. Older checkpoints beyond ``keep`` are removed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniseg.errors import CheckpointError
from omniseg.io.atomic import atomic_open, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, every CUDA device, numpy, python)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / CHECKPOINT_DIR


def save_checkpoint(out: str | Path, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write ``state`` (must contain ``"step"``) atomically; point ``latest.json`` at it;
    keep the newest ``keep`` checkpoints. Call on rank 0 only."""
    directory = checkpoint_dir(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{int(state['step']):08d}.pt"
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)
    atomic_write_text(directory / LATEST, json.dumps({"step": int(state["step"]), "file": path.name}) + "\n")
    for old in sorted(directory.glob("step-*.pt"))[:-keep] if keep > 0 else []:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or ``None`` when there is none."""
    directory = checkpoint_dir(out)
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["file"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(pointer, f"unreadable checkpoint pointer ({exc})") from exc
    path = directory / name
    if not path.is_file():
        raise CheckpointError(path, f"named by {pointer} but missing")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU)."""
    try:
        # Our own files: optimizer states and RNG states need full unpickling.
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read training checkpoint ({exc})") from exc
