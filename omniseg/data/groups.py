"""Groups of samples named by their file names: the drive, camera or site a frame comes from.

Frames of one group look alike (same street, light, camera), so a model scored on frames of
a group it trained on is scored on memory. CamVid's names start with their drive
(``0016E5_07959.png``): ``--group-by '^([^_]+)_'`` gives the drives, and a run that holds a
drive out of training measures what users meet, streets the model has never seen.

A group is the first capture group of the pattern matched against the file name (the whole
match when the pattern has no group); a name the pattern does not match is an error naming
the file, so no frame silently falls into a group of its own.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from omniseg.data.dataset import Sample
from omniseg.errors import InputError


def compile_group_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled ``--group-by`` pattern; a bad pattern is an :class:`InputError`."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InputError("--group-by", f"not a regular expression: {pattern!r} ({exc})") from None


def group_of(path: str | Path, pattern: re.Pattern[str]) -> str:
    """The group of a file: the first capture group (or the match) of ``pattern`` in its name."""
    name = Path(path).name
    match = pattern.search(name)
    if match is None:
        raise InputError(path, f"file name does not match the group pattern {pattern.pattern!r}")
    return match.group(1) if pattern.groups else match.group(0)


def group_counts(samples: Sequence[Sample], pattern: re.Pattern[str]) -> dict[str, int]:
    """Samples per group, groups sorted by name."""
    counts = Counter(group_of(s.image, pattern) for s in samples)
    return dict(sorted(counts.items()))


def select_groups(
    samples: Sequence[Sample],
    pattern: re.Pattern[str],
    *,
    keep: Iterable[str] | None = None,
    drop: Iterable[str] | None = None,
) -> list[Sample]:
    """The samples whose group is in ``keep`` (all when ``None``) and not in ``drop``.

    Raises:
        InputError: a named group has no sample (a typo would otherwise select nothing, or
            hold nothing out).
    """
    present = set(group_counts(samples, pattern))
    named = set(keep or ()) | set(drop or ())
    missing = sorted(named - present)
    if missing:
        raise InputError(
            "--group-by", f"no samples in group(s) {', '.join(missing)} (groups: {', '.join(sorted(present))})"
        )
    keep_set = None if keep is None else set(keep)
    drop_set = set(drop or ())
    chosen = [
        s for s in samples
        if (keep_set is None or group_of(s.image, pattern) in keep_set) and group_of(s.image, pattern) not in drop_set
    ]
    if not chosen:
        raise InputError("--group-by", "the group selection leaves no samples")
    return chosen


def parse_groups(text: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]``; ``None`` stays ``None``."""
    if text is None:
        return None
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if not groups:
        raise InputError("--group-by", f"no group names in {text!r}")
    return groups
