"""Files shipped inside the package, such as the bundled default model."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
# How results, logs and the web service name the bundled model.
DEFAULT_MODEL_NAME = "default"


def default_model_dir() -> Path | None:
    """The bundled default model's directory, or ``None`` when it is not installed."""
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return DEFAULT_MODEL_DIR
    return None
