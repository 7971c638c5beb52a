"""Test-time flip (``tta=True``, ``--tta``): the class scores of an image and of its mirror
image averaged before the argmax; semantic only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import ImageOps
from test_segformer_parity import TINY_SEGFORMER_CONFIGS, build_reference_segformer

import omniseg
from omniseg.cli.main import main


@pytest.fixture(scope="module", params=["mask2former", "segformer"])
def seg(request, tmp_path_factory):
    if request.param == "mask2former":
        return omniseg.pipeline("image-segmentation")  # the bundled model: trained, so its maps vary
    directory = build_reference_segformer(tmp_path_factory.mktemp(request.param), **TINY_SEGFORMER_CONFIGS[sorted(TINY_SEGFORMER_CONFIGS)[0]])
    return omniseg.pipeline("image-segmentation", model=directory)


def _label_map(seg, image, **options) -> np.ndarray:
    return seg.predict([image], subtask="semantic", **options)[0].label_map.numpy()


def test_class_scores_give_the_semantic_maps(seg, street_photo):
    """The scores' argmax is the semantic post-processing's map (which never makes them all)."""
    inputs = seg.processor(images=[street_photo], return_tensors="pt")
    with torch.inference_mode():
        outputs = seg.model(**{k: v for k, v in inputs.items() if k in ("pixel_values", "pixel_mask")})
    size = [(street_photo.height, street_photo.width)]
    scores = seg.processor.semantic_scores(outputs, target_sizes=size)[0]
    assert scores.shape[1:] == (street_photo.height, street_photo.width)
    expected = seg.processor.post_process_semantic_segmentation(outputs, target_sizes=size)[0]
    assert torch.equal(scores.argmax(dim=0), expected)


def test_flip_averages_the_image_and_its_mirror(seg, street_photo):
    flipped = _label_map(seg, street_photo, tta=True)
    plain = _label_map(seg, street_photo)
    assert flipped.shape == plain.shape and not np.array_equal(flipped, plain)
    # Averaging a view with its mirror is symmetric: the mirror image's answer is the mirror
    # of the image's answer, to the pixel (the scores are added back in the original frame).
    mirrored = _label_map(seg, ImageOps.mirror(street_photo), tta=True)
    assert np.array_equal(mirrored, flipped[:, ::-1])
    # A batch (mixed sizes, each with its mirror) answers as image by image.
    crop = street_photo.crop((0, 0, 200, 150))
    batch = seg.predict([street_photo, crop], subtask="semantic", tta=True, batch_size=2)
    assert np.array_equal(batch[0].label_map.numpy(), flipped)
    assert np.array_equal(batch[1].label_map.numpy(), _label_map(seg, crop, tta=True))


def test_flip_is_semantic_only(seg, street_photo):
    if "panoptic" in seg.supported_subtasks():
        with pytest.raises(ValueError, match="semantic"):
            seg.predict([street_photo], subtask="panoptic", tta=True)


def test_command_line_flip(street_photo_path, camvid_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(street_photo_path), "--out", str(out), "--task", "semantic", "--tta"]) == 0
    document = json.loads((out / f"{street_photo_path.stem}.json").read_text())
    assert document["task"] == "semantic" and document["segments"]
    assert main(["segment", str(street_photo_path), "--out", str(out), "--tta"]) == 2
    assert "--tta: tta (test-time flip) averages semantic class scores" in capsys.readouterr().err
    report = tmp_path / "evaluation"
    assert main(["evaluate", "--data", str(camvid_dir), "--max-images", "2", "--tta", "--out", str(report),
                 "--examples", "0"]) == 0
    assert 0.0 < json.loads((report / "metrics.json").read_text())["metrics"]["mean_iou"] <= 1.0
