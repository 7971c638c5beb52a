"""Shared behaviour of image processors: plain-data settings in ``preprocessor_config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from omniseg.errors import CheckpointError
from omniseg.hub import resolve_model_dir
from omniseg.io.atomic import atomic_write_text
from omniseg.models.checkpoint import saving_into
from omniseg.models.config import read_json

PROCESSOR_NAME = "preprocessor_config.json"

ProcessorT = TypeVar("ProcessorT", bound="ImageProcessor")


@dataclasses.dataclass
class ImageProcessor:
    """Base of image processors. Subclasses are dataclasses whose fields are settings.

    Keys of ``preprocessor_config.json`` that a processor does not read are kept in ``extra``
    and written back, so a saved processor loads in the reference implementation too.
    """

    processor_type: ClassVar[str] = ""

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls: type[ProcessorT], data: dict[str, Any]) -> ProcessorT:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                data[f.name] = getattr(self, f.name)
        data["image_processor_type"] = self.processor_type
        return data

    @classmethod
    def from_pretrained(cls: type[ProcessorT], name_or_path: str | Path) -> ProcessorT:
        directory = resolve_model_dir(name_or_path)
        return cls.from_settings_file(directory / PROCESSOR_NAME)

    @classmethod
    def from_settings_file(cls: type[ProcessorT], path: Path, key: str | None = None) -> ProcessorT:
        """The processor of the settings in the JSON file ``path`` (under ``key`` if given);
        a setting it cannot use is a :class:`CheckpointError` naming the file."""
        data = read_json(path)
        if key is not None:
            data = data[key]
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            # e.g. "size": "big" was a bare "ValueError: cannot read size 'big'", no file named.
            raise CheckpointError(path, f"unusable image processor settings: {exc}") from exc

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``preprocessor_config.json`` (atomically) into ``directory``.

        Raises:
            CheckpointError: ``directory`` is a file, or cannot be created or written.
        """
        with saving_into(directory) as directory:
            atomic_write_text(directory / PROCESSOR_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
