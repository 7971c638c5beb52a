"""What a semantic dataset folder says about itself: class names, ignore index, thing classes.

The folder layout is PRODUCT.md §4: ``images/<split>/*``, ``labels/<split>/*.png``,
``id2label.json`` (see :func:`omniseg.data.dataset.folder_samples` for the files). The
conventions that are not in the files come from, in order: what the caller passes (command
line options), the dataset's ``README.md``, the defaults (ignore index 255, no thing classes).

From the README, two phrasings are understood (CamVid's README uses both)::

    ... must be ignored in losses and metrics (ignore_index 11).
    Things (countable objects): car, pedestrian, bicyclist.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from omniseg.errors import InputError

DEFAULT_IGNORE_INDEX = 255

_IGNORE_PATTERN = re.compile(r"ignore[_ ]index\W{0,3}(?:is\W{0,3})?(\d+)", re.IGNORECASE)
_THINGS_PATTERN = re.compile(r"^\s*things\b[^:\n]*:\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class SemanticDatasetInfo:
    """A semantic dataset's conventions.

    Attributes:
        root: the dataset folder.
        id2label: class id -> name (``id2label.json``).
        ignore_index: label value of unlabelled pixels.
        thing_ids: ids of countable classes (instances = connected components of them).
    """

    root: Path
    id2label: dict[int, str]
    ignore_index: int
    thing_ids: tuple[int, ...]

    @property
    def num_labels(self) -> int:
        """Number of classes: one more than the largest class id."""
        return max(self.id2label) + 1 if self.id2label else 0

    @property
    def class_names(self) -> list[str]:
        """Names of classes ``0 .. num_labels - 1`` (ids missing from id2label are named by number)."""
        return [self.id2label.get(i, str(i)) for i in range(self.num_labels)]


def readme_ignore_index(root: str | Path) -> int | None:
    """The ignore index a dataset's README states (``ignore_index 11``), or ``None``."""
    text = _readme(Path(root))
    match = _IGNORE_PATTERN.search(text) if text else None
    return int(match.group(1)) if match else None


def readme_thing_names(root: str | Path) -> list[str]:
    """The class names of a README's ``Things ...: a, b, c.`` line, or ``[]``."""
    text = _readme(Path(root))
    match = _THINGS_PATTERN.search(text) if text else None
    if not match:
        return []
    # The list ends at the end of its sentence ("...: car, pedestrian, bicyclist. Everything else").
    listed = re.split(r"\.(?:\s|$)", match.group(1) + " ", maxsplit=1)[0]
    return [name.strip() for name in listed.split(",") if name.strip()]


def resolve_classes(names_or_ids: Iterable[str | int], id2label: dict[int, str], source: str) -> tuple[int, ...]:
    """Class ids from names (case-insensitive) or ids; an unknown one is an error naming it."""
    by_name = {name.lower(): class_id for class_id, name in id2label.items()}
    ids = []
    for item in names_or_ids:
        text = str(item).strip()
        if text.lower() in by_name:
            ids.append(by_name[text.lower()])
        elif text.isdigit() and int(text) in id2label:
            ids.append(int(text))
        else:
            raise InputError(source, f"unknown class {text!r} (classes: {', '.join(id2label.values())})")
    return tuple(sorted(set(ids)))


def read_dataset_info(
    root: str | Path,
    *,
    ignore_index: int | None = None,
    thing_classes: Iterable[str | int] | None = None,
) -> SemanticDatasetInfo:
    """Read a dataset folder's conventions (explicit arguments win over the README).

    Raises:
        InputError: no folder, a missing or malformed ``id2label.json``, an unknown thing class.
    """
    from omniseg.data.dataset import read_id2label

    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    id2label = read_id2label(root)
    if ignore_index is None:
        ignore_index = readme_ignore_index(root)
    if ignore_index is None:
        ignore_index = DEFAULT_IGNORE_INDEX
    if thing_classes is None:
        # Prose is a hint, not a contract: names that are not classes are left out.
        known = {name.lower() for name in id2label.values()}
        names = [name for name in readme_thing_names(root) if name.lower() in known]
        thing_ids = resolve_classes(names, id2label, "README")
    else:
        thing_ids = resolve_classes(thing_classes, id2label, "thing classes")
    return SemanticDatasetInfo(root=root, id2label=id2label, ignore_index=int(ignore_index), thing_ids=thing_ids)


def _readme(root: Path) -> str:
    for name in ("README.md", "README.txt", "README"):
        path = root / name
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return ""
    return ""
