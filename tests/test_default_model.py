"""The bundled default model (``omniseg/assets/default_model``): it is what
``omniseg.pipeline("image-segmentation")`` loads with no model argument, it segments a real
street frame sensibly, and the reference implementation loads it with identical logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import omniseg
from omniseg.assets import DEFAULT_MODEL_DIR, default_model_dir

# The dataset's id2label.json, written out so the check runs without the data.
CAMVID_CLASSES = {
    0: "sky", 1: "building", 2: "pole", 3: "road", 4: "sidewalk", 5: "tree",
    6: "sign", 7: "fence", 8: "car", 9: "pedestrian", 10: "bicyclist",
}
IGNORE = 11
# An honest floor, well below what the shipped model measures on this frame (see
# omniseg/assets/default_model/TRAINING.md): it catches a broken or mis-wired model
# (wrong classes, wrong normalisation, a random head), not small accuracy changes.
PIXEL_ACCURACY_FLOOR = 0.80  # the shipped model: 0.923 on this frame
FRAME = "0016E5_07959.png"

pytestmark = pytest.mark.skipif(default_model_dir() is None, reason="no bundled default model")


@pytest.fixture(scope="module")
def default_pipeline():
    return omniseg.pipeline("image-segmentation")  # no model argument: the bundled one


@pytest.fixture(scope="module")
def val_frame(camvid_dir):
    path = camvid_dir / "images" / "val" / FRAME
    if not path.is_file():
        path = sorted((camvid_dir / "images" / "val").glob("*.png"))[0]
    label = np.array(Image.open(camvid_dir / "labels" / "val" / path.name))
    return Image.open(path).convert("RGB"), label


def test_files_and_size() -> None:
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= 30 * 1024 * 1024
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "mask2former"
    assert {int(k): v for k, v in config["id2label"].items()} == CAMVID_CLASSES


def test_class_names_match_the_dataset(camvid_dir) -> None:
    dataset = json.loads((camvid_dir / "id2label.json").read_text())
    assert {int(k): v for k, v in dataset.items()} == CAMVID_CLASSES


def test_pipeline_without_model_segments_a_street_frame(default_pipeline, val_frame) -> None:
    image, label = val_frame
    results = default_pipeline(image, subtask="semantic")
    names = {r["label"] for r in results}
    assert {"road", "sky"} <= names, names
    assert all(r["score"] is None and r["mask"].size == image.size for r in results)
    # Rebuild the label map from the masks and compare with the ground truth.
    label2id = {v: k for k, v in CAMVID_CLASSES.items()}
    predicted = np.full(label.shape, -1, dtype=np.int64)
    for result in results:
        predicted[np.array(result["mask"]) > 0] = label2id[result["label"]]
    valid = label != IGNORE
    accuracy = float((predicted[valid] == label[valid]).mean())
    assert accuracy >= PIXEL_ACCURACY_FLOOR, accuracy
    # The road is where the road is: most ground-truth road pixels are predicted road.
    road = label == label2id["road"]
    assert (predicted[road] == label2id["road"]).mean() > 0.8


def test_pipeline_without_model_gives_panoptic_segments(default_pipeline, val_frame) -> None:
    image, _ = val_frame
    results = default_pipeline(image)  # auto: panoptic for a Mask2Former
    assert results and all(r["label"] in CAMVID_CLASSES.values() for r in results)
    assert all(r["score"] is not None and r["mask"].mode == "L" for r in results)
    stuff = [r["label"] for r in results if r["label"] not in ("car", "pedestrian", "bicyclist")]
    assert len(stuff) == len(set(stuff)), "a stuff class should be one segment"


def test_loads_in_reference_with_identical_logits(val_frame) -> None:
    transformers = pytest.importorskip("transformers")
    image, _ = val_frame
    ours = omniseg.load_model(DEFAULT_MODEL_DIR)
    reference = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(DEFAULT_MODEL_DIR).eval()
    assert reference.config.id2label == ours.config.id2label
    inputs = omniseg.load_processor(DEFAULT_MODEL_DIR)(image)
    with torch.no_grad():
        got = ours(inputs["pixel_values"])
        expected = reference(pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(got.class_queries_logits, expected.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.masks_queries_logits, expected.masks_queries_logits, atol=1e-4, rtol=1e-4)


def test_cli_without_model_records_the_bundled_model(val_frame, tmp_path) -> None:
    from omniseg.cli.main import main

    image, _ = val_frame
    image.save(tmp_path / "street.png")
    assert main(["segment", str(tmp_path / "street.png"), "--out", str(tmp_path / "out")]) == 0
    document = json.loads((tmp_path / "out" / "street.json").read_text())
    assert document["model"] == "default" and document["task"] == "panoptic"
    assert document["segments"], "the bundled model found nothing on a street frame"
