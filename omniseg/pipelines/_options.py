"""Checks of the pipelines' numeric options, made before any image is read, so that a wrong
value is a ValueError naming the option rather than an error deep in the work (IndexError,
ZeroDivisionError, a torch comparison with a str) or a silently empty answer."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_integer(name: str, value: Any, minimum: int, note: str = "") -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) of at least ``minimum``;
    ``note`` follows the requirement in the message (e.g. ``" (or None for no limit)"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}{note}, got {value!r}")


def check_number(name: str, value: Any, *, low: float = -np.inf, high: float = np.inf) -> None:
    """Raise ValueError unless ``value`` is a finite real number (not a bool) in [low, high]."""
    real = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not real or not np.isfinite(value) or not low <= value <= high:
        bounds = "" if (low, high) == (-np.inf, np.inf) else f" between {low:g} and {high:g}"
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
