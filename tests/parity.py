"""Checks shared by the tests that compare omniseg with the reference implementation.

A helper module for tests, not a test file (tests/ is on sys.path under pytest)::

    from parity import TOLERANCE, relative_error, two_images
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

TOLERANCE = 1e-4  # max abs difference / max abs value


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest absolute difference, relative to the reference's largest absolute value."""
    assert ours.shape == reference.shape
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def two_images() -> list[Image.Image]:
    """Two smooth images of different odd sizes (so the batch is padded)."""
    rng = np.random.default_rng(0)
    images = []
    for height, width in ((101, 147), (133, 121)):
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        noise = rng.integers(-20, 21, (height, width, 3))
        images.append(Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8)))
    return images


def build_reference_dirs(
    root: Path, build: Callable[..., Path], configs: Mapping[str, dict[str, Any]]
) -> dict[str, Path]:
    """One reference model directory per entry of ``configs`` (a ``TINY_*_CONFIGS`` table),
    built by ``build`` under ``root`` with the entry's position as its seed."""
    return {name: build(root / name, seed=index, **kwargs) for index, (name, kwargs) in enumerate(configs.items())}


def camvid_id2label(camvid_dir: Path) -> dict[int, str]:
    """CamVid's class names by id."""
    return {int(k): v for k, v in json.loads((camvid_dir / "id2label.json").read_text()).items()}


def small_camvid_val(camvid_dir: Path, data: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """A semantic dataset folder ``data`` of CamVid's first ``count`` val frames and their
    labels resized to ``size`` (width, height; bilinear, nearest for labels), with CamVid's
    ``id2label.json``. Returns the written images."""
    for kind in ("images", "labels"):
        (data / kind / "val").mkdir(parents=True)
    images = []
    for frame in sorted((camvid_dir / "images" / "val").glob("*.png"))[:count]:
        image = data / "images" / "val" / frame.name
        Image.open(frame).convert("RGB").resize(size, Image.BILINEAR).save(image)
        label = Image.open(camvid_dir / "labels" / "val" / frame.name).resize(size, Image.NEAREST)
        label.save(data / "labels" / "val" / frame.name)
        images.append(image)
    (data / "id2label.json").write_text((camvid_dir / "id2label.json").read_text())
    return images


def assert_segments_match(ours: list[dict], ref: list[dict]) -> None:
    """Same segment ids, labels and fusing, in the same order; scores to 1e-4."""
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in ours] == [
        (s["id"], s["label_id"], s["was_fused"]) for s in ref
    ]
    assert np.allclose([s["score"] for s in ours], [s["score"] for s in ref], atol=1e-4, rtol=0)


def assert_result_match(ours: dict, ref: dict) -> None:
    """One image's instance or panoptic result: its segments and an identical ``segmentation``
    (a tensor, or the RLE / binary maps of ``return_coco_annotation`` / ``return_binary_maps``)."""
    assert_segments_match(ours["segments_info"], ref["segments_info"])
    a, b = ours["segmentation"], ref["segmentation"]
    if isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    else:
        assert [list(map(int, r)) for r in a] == [list(map(int, r)) for r in b]


def assert_post_processed_match(task: str, got: Sequence[Any], expected: Sequence[Any]) -> int:
    """Per image, an identical semantic map ``[H, W]`` or matching instance / panoptic result
    (:func:`assert_result_match`); returns how many segments were compared."""
    segments = 0
    for a, b in zip(got, expected):
        if task == "semantic":
            assert a.shape == b.shape and torch.equal(a, b)
        else:
            assert_result_match(a, b)
            segments += len(b["segments_info"])
    return segments


def assert_pipeline_results_match(
    got: list[dict], expected: list[dict], image_size: tuple[int, int], score_tolerance: float
) -> None:
    """The image-segmentation pipeline's segments: the same labels in the same order, scores
    to ``score_tolerance`` (``None`` for both in semantic results), masks at ``image_size``
    (width, height) that differ in at most :data:`TIE_PIXELS` of their pixels."""
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    for a, b in zip(got, expected):
        assert (a["score"] is None) == (b["score"] is None)
        if b["score"] is not None:
            assert a["score"] == pytest.approx(b["score"], abs=score_tolerance)
        assert a["mask"].size == image_size
        ours, reference = np.asarray(a["mask"]), np.asarray(b["mask"])
        differing = int((ours != reference).sum())
        assert differing <= TIE_PIXELS * reference.size, (
            f"{a['label']}: {differing} of {reference.size} mask pixels differ from the reference"
        )


# A full pipeline compares forwards that sum in different orders (the reference's MKL products
# against ours; the order also depends on the CPU's vector width), so a pixel whose two
# best scores are within float rounding of each other may go either way: 1 pixel of 172,800
# did on an AMD Zen 3 core, none on Zen 4 / Zen 5. A real mistake moves far more: one
# misplaced row or column of a 480x360 image is 2.8e-3 of it.
TIE_PIXELS = 1e-4
