"""Argument types shared by the commands: checked numbers and devices, with argparse's
usage errors (``argparse.ArgumentTypeError``) that say what was wrong; and the check that an
output folder can be written."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path


def integer(*, minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An ``int`` type within ``[minimum, maximum]`` (either bound may be open)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        _check_range(value, minimum, maximum)
        return value

    return parse


def number(
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Callable[[str], float]:
    """A finite ``float`` type within ``[minimum, maximum]`` and, with ``above`` / ``below``,
    strictly beyond those bounds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be above {above:g}, got {text}")
        if below is not None and not value < below:
            raise argparse.ArgumentTypeError(f"must be below {below:g}, got {text}")
        _check_range(value, minimum, maximum)
        return value

    return parse


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def output_folder_problem(out: Path, option: str = "--out") -> str | None:
    """Why results cannot be written to ``out``, or ``None``; checked before the model loads.

    Without it a read-only ``out`` (or one below a file) failed with a traceback once the
    first file was written (``segment``: every image, then ``errors.jsonl`` itself). Nothing
    is created here, so a usage error leaves the disk as it was; ``os.access`` asks the
    kernel, which also answers for read-only filesystems.
    """
    target = existing = Path(os.path.abspath(out))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        if existing == target:
            return f"{option} {out} exists and is not a folder"
        return f"{option} {out}: {existing} is a file, so no folder can be created below it"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == target else f" (it would be created in {existing})"
        return f"{option} {out}: no permission to write there{where}; choose another folder"
    return None


def _check_range(value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(f"must be between {minimum:g} and {maximum:g}, got {value:g}")
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {value:g}")
