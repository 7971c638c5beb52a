"""Sample groups read from file names (``--group-by``), and comma-separated splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniseg.data.dataset import Sample, folder_samples
from omniseg.data.groups import compile_group_pattern, group_counts, group_of, parse_groups, select_groups
from omniseg.errors import InputError
from omniseg.train.semantic_aux import median_frequency_weights

DRIVE = compile_group_pattern(r"^([^_]+)_")


def samples(*names: str) -> list[Sample]:
    return [Sample(Path("images") / name, Path("labels") / name) for name in names]


def test_group_is_the_first_capture_group_or_the_match() -> None:
    assert group_of("x/0016E5_07959.png", DRIVE) == "0016E5"
    assert group_of("cam3-0001.png", compile_group_pattern(r"cam\d")) == "cam3"
    with pytest.raises(InputError, match="does not match the group pattern"):
        group_of("nodrive.png", DRIVE)
    with pytest.raises(InputError, match="not a regular expression"):
        compile_group_pattern("(")


def test_select_keeps_and_drops_groups_and_names_unknown_ones() -> None:
    items = samples("a_1.png", "a_2.png", "b_1.png", "c_1.png")
    assert group_counts(items, DRIVE) == {"a": 2, "b": 1, "c": 1}
    assert [s.image.name for s in select_groups(items, DRIVE, drop=["a"])] == ["b_1.png", "c_1.png"]
    assert [s.image.name for s in select_groups(items, DRIVE, keep=["a", "c"])] == ["a_1.png", "a_2.png", "c_1.png"]
    with pytest.raises(InputError, match=r"no samples in group\(s\) d"):
        select_groups(items, DRIVE, drop=["d"])
    with pytest.raises(InputError, match="leaves no samples"):
        select_groups(items, DRIVE, keep=["a"], drop=["a"])
    assert parse_groups(" a, b ,") == ["a", "b"] and parse_groups(None) is None


def test_comma_separated_splits_concatenate(camvid_dir: Path) -> None:
    train, val = folder_samples(camvid_dir, "train"), folder_samples(camvid_dir, "val")
    assert folder_samples(camvid_dir, "train, val") == train + val
    assert group_counts(train + val, DRIVE) == {"0001TP": 62, "0006R0": 101, "0016E5": 305}
    with pytest.raises(InputError, match="no images/test folder in the dataset; its splits: train, val"):
        folder_samples(camvid_dir, "train,test")


def test_a_missing_split_names_the_splits_there(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="images does not exist either"):
        folder_samples(tmp_path, "val")
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "images" / "validation").mkdir()
    with pytest.raises(InputError, match="no images/val folder in the dataset; its splits: training, validation"):
        folder_samples(tmp_path, "val")


def test_median_frequency_weights() -> None:
    # shares 0.8, 0.15, 0.05 -> median 0.15 -> 0.1875, 1, 3; an absent class gets the cap.
    assert median_frequency_weights([80, 15, 5, 0]) == pytest.approx([0.2, 1.0, 3.0, 5.0])
    assert median_frequency_weights([80, 15, 5], clip=(0.0, 10.0)) == pytest.approx([0.1875, 1.0, 3.0])
