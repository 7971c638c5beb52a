"""Typed errors. Every error that concerns a file names it and says why."""

from __future__ import annotations

from pathlib import Path


class OmnisegError(Exception):
    """Base class of every error omniseg raises on purpose."""


class InputError(OmnisegError):
    """An input (image, annotation, dataset) cannot be used.

    Attributes:
        source: the file path, URL or a short description of the in-memory input.
        reason: why it cannot be used, in plain words.
    """

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rebuilt from (source, reason), not from the message: the default, from ``args``,
        # calls ``__init__(message)`` and fails, so these errors could not cross a process
        # boundary (a Ray actor's error reached the user as "UnserializableException").
        return type(self), (self.source, self.reason)


class ImageReadError(InputError):
    """The file is missing, empty, truncated, corrupt, or not an image."""


class ImageTooLargeError(InputError):
    """The image has more pixels than the configured limit."""


class UnsupportedImageError(InputError):
    """The image decodes, but its mode or shape is one omniseg cannot convert to RGB."""


class CheckpointError(OmnisegError):
    """A model directory is missing files, its weights or settings do not fit the architecture,
    or it cannot be written (``save_pretrained``)."""

    def __init__(self, source: str | Path, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rebuilt from (source, reason), not from the message: the default, from ``args``,
        # calls ``__init__(message)`` and fails, so these errors could not cross a process
        # boundary (a Ray actor's error reached the user as "UnserializableException").
        return type(self), (self.source, self.reason)


class ModelNotFoundError(CheckpointError):
    """Neither a local directory nor a reachable (or cached) hub repository."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's architecture (``model_type``) is not one omniseg implements."""


class PromptError(InputError):
    """A point or box prompt cannot be used: empty, malformed, outside the image, or a box
    whose corners are swapped."""


def failure_reason(exc: BaseException) -> str:
    """What to tell the user about a failed file: an input error's own reason, else the message."""
    return exc.reason if isinstance(exc, InputError) else (str(exc) or type(exc).__name__)
