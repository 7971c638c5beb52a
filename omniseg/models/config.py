"""Model configurations as plain data.

A config is a dataclass whose fields are the keys of the checkpoint's ``config.json`` that
omniseg reads. Keys it does not read are kept in ``extra`` and written back unchanged, so a
checkpoint saved by omniseg carries everything the reference implementation expects.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omniseg.errors import CheckpointError, UnsupportedModelError
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
            known["id2label"] = {int(k): str(v) for k, v in known["id2label"].items()}
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
        """Read a ``config.json``; an :class:`UnsupportedModelError` raised while parsing it
        names the file instead of the offending key."""
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(path, exc.reason) from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path


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
