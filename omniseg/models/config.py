"""Model configurations as plain data.

A config is a dataclass whose fields are the keys of the checkpoint's ``config.json`` that
omniseg reads. Keys it does not read are kept in ``extra`` and written back unchanged, so a
checkpoint saved by omniseg carries everything the reference implementation expects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omniseg.errors import CheckpointError
from omniseg.io.atomic import atomic_write_text

CONFIG_NAME = "config.json"

ConfigT = TypeVar("ConfigT", bound="ModelConfig")


@dataclasses.dataclass
class ModelConfig:
    """Base of all model configs. Subclasses add fields and set ``model_type``."""

    model_type: ClassVar[str] = ""

    id2label: dict[int, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: idx for idx, name in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        if "id2label" in known and known["id2label"] is not None:
            known["id2label"] = _id2label(known["id2label"])
        hints = _field_types(cls)
        for name, value in known.items():
            expected = _expected_type(hints[name], value)
            if expected is not None:
                # A wrong type used to fail deep in the model's construction, e.g. torch's
                # "empty(): argument 'size' must be tuple of ints" for "num_queries": "many".
                raise CheckpointError(CONFIG_NAME, f"{name} must be {expected}, got {value!r}")
        # label2id is derived from id2label; a stale copy must not be written back.
        extra.pop("label2id", None)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, ModelConfig):
                value = value.to_dict()
            data[f.name] = value
        data["id2label"] = {str(k): v for k, v in sorted(self.id2label.items())}
        data["label2id"] = {v: k for k, v in sorted(self.id2label.items())}
        data["model_type"] = self.model_type
        return data

    @classmethod
    def from_json_file(cls: type[ConfigT], path: str | Path) -> ConfigT:
        """Read a ``config.json``; a :class:`CheckpointError` raised while parsing it (a value
        of the wrong type, an :class:`UnsupportedModelError`) names the file."""
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except CheckpointError as exc:  # UnsupportedModelError included: the type is kept
            raise type(exc)(path, exc.reason) from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


def _id2label(value: Any) -> dict[int, str]:
    """``config.json``'s ``id2label`` (string keys) as ``{class id: name}``."""
    if not isinstance(value, dict):
        raise CheckpointError(CONFIG_NAME, f"id2label must map class ids to names, got {value!r}")
    try:
        return {int(k): str(v) for k, v in value.items()}
    except ValueError:
        raise CheckpointError(CONFIG_NAME, f"id2label keys must be class ids (integers), got {list(value)!r}") from None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _expected_type(hint: Any, value: Any) -> str | None:
    """``None`` if ``value`` (from JSON) fits the field type ``hint``, else what was expected.

    Lenient where published configs may be: an int is a float, and 0 / 1 a bool.
    Types it does not know (nested configs, ``Any``) are left to their own parsing.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_expected_type(arg, value) for arg in args if arg is not type(None)]
        if any(problem is None for problem in problems):
            return None
        return " or ".join(problem for problem in problems if problem)
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is bool:
        return None if isinstance(value, bool) or value in (0, 1) else "true or false"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return "a list"
        item = args[0] if args else Any
        if any(_expected_type(item, element) is not None for element in value):
            return f"a list of {'integers' if item is int else 'strings' if item is str else 'values'}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else "an object"
    return None


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from ``path``, raising :class:`CheckpointError` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(path, "expected a JSON object at the top level")
    return data
