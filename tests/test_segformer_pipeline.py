"""The image-segmentation pipeline with SegFormer checkpoints gives the reference pipeline's answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import omniseg
from test_segformer_parity import TINY_SEGFORMER_CONFIGS, build_reference_segformer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=sorted(TINY_SEGFORMER_CONFIGS))
def pipelines(request, tmp_path_factory):
    directory = build_reference_segformer(
        tmp_path_factory.mktemp(f"segformer_pipe_{request.param}"), **TINY_SEGFORMER_CONFIGS[request.param]
    )
    ours = omniseg.pipeline("image-segmentation", model=directory)
    reference = transformers.pipeline("image-segmentation", model=str(directory), device="cpu")
    return ours, reference


def assert_same_annotations(ours: list[dict], reference: list[dict]) -> None:
    assert [r["label"] for r in ours] == [r["label"] for r in reference]
    for a, b in zip(ours, reference):
        assert a["score"] is None and b["score"] is None
        assert a["mask"].mode == "L" and a["mask"].size == b["mask"].size
        np.testing.assert_array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))


def test_semantic_by_default_and_identical_to_reference(pipelines, street_photo):
    ours, reference = pipelines
    assert ours.resolve_subtask(None) == "semantic"
    expected = reference(street_photo)
    got = ours(street_photo)
    assert len(got) > 1, "the tiny model should predict several classes on a real photo"
    assert_same_annotations(got, expected)
    assert all(r["mask"].size == street_photo.size for r in got)
    # One mask per class present, covering every pixel exactly once.
    coverage = sum(np.asarray(r["mask"], dtype=np.int64) // 255 for r in got)
    assert (coverage == 1).all()
    assert_same_annotations(ours(street_photo, subtask="semantic"), expected)


def test_batch_of_paths_and_crops_identical_to_reference(pipelines, street_photo_path: Path, small_street_photos):
    ours, reference = pipelines
    inputs = [str(street_photo_path), *small_street_photos]
    expected = reference(inputs)
    got = ours(inputs, batch_size=2)
    assert len(got) == len(expected) == 3
    for mine, theirs in zip(got, expected):
        assert_same_annotations(mine, theirs)


def test_other_subtasks_are_refused(pipelines, street_photo):
    ours, _ = pipelines
    with pytest.raises(ValueError, match="not supported"):
        ours(street_photo, subtask="panoptic")
