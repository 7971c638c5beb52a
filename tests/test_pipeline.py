"""The image-segmentation pipeline gives the reference pipeline's answers on a real photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import omniseg
from omniseg.errors import ImageReadError, ModelNotFoundError


@pytest.fixture(scope="module")
def pipelines(fitted_mask2former_dir: Path):
    import transformers

    ours = omniseg.pipeline("image-segmentation", model=fitted_mask2former_dir)
    reference = transformers.pipeline("image-segmentation", model=str(fitted_mask2former_dir), device="cpu")
    return ours, reference


def assert_same_annotations(ours: list[dict], reference: list[dict]) -> None:
    assert [r["label"] for r in ours] == [r["label"] for r in reference]
    for a, b in zip(ours, reference):
        if b["score"] is None:
            assert a["score"] is None
        else:
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["mask"].mode == "L" and a["mask"].size == b["mask"].size
        np.testing.assert_array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))


@pytest.mark.parametrize(
    "subtask, kwargs, at_least",
    [
        ("panoptic", dict(threshold=0.0), 1),
        ("panoptic", dict(threshold=0.5, overlap_mask_area_threshold=0.2), 2),
        # The fitted model's segment counts depend on the CPU's rounding during the fit
        # (4 instances on an AMD Zen 4, 2 on an Intel Sapphire Rapids).
        ("instance", dict(threshold=0.0), 2),
        ("instance", dict(threshold=0.5, mask_threshold=0.3), 1),
        ("semantic", dict(), 2),
    ],
)
def test_results_identical_to_reference_on_a_real_photo(pipelines, street_photo, subtask, kwargs, at_least):
    ours, reference = pipelines
    expected = reference(street_photo, subtask=subtask, **kwargs)
    got = ours(street_photo, subtask=subtask, **kwargs)
    assert len(expected) >= at_least  # a check on real segments, not on two empty lists
    assert_same_annotations(got, expected)
    assert all(r["mask"].size == street_photo.size for r in got)


def test_default_subtask_is_panoptic_for_mask2former(pipelines, street_photo):
    ours, reference = pipelines
    assert ours.resolve_subtask(None) == "panoptic"
    assert_same_annotations(ours(street_photo, threshold=0.1), reference(street_photo, threshold=0.1))


def test_batches_of_different_sizes_give_each_image_its_own_answer(pipelines, small_street_photos, street_photo):
    ours, _ = pipelines
    images = [small_street_photos[0], street_photo, small_street_photos[1], street_photo]
    batched = ours(images, subtask="panoptic", threshold=0.1, batch_size=4)
    assert isinstance(batched, list) and len(batched) == 4
    for image, result in zip(images, batched):
        assert_same_annotations(result, ours(image, subtask="panoptic", threshold=0.1))


def test_accepts_paths_and_arrays(pipelines, street_photo, street_photo_path):
    ours, _ = pipelines
    from_pil = ours(street_photo, subtask="semantic")
    assert_same_annotations(ours(str(street_photo_path), subtask="semantic"), from_pil)
    assert_same_annotations(ours(street_photo_path, subtask="semantic"), from_pil)
    assert_same_annotations(ours(np.asarray(street_photo), subtask="semantic"), from_pil)
    assert all(r["score"] is None for r in from_pil)


def test_semantic_masks_partition_the_image(pipelines, street_photo):
    ours, _ = pipelines
    masks = np.stack([np.asarray(r["mask"]) for r in ours(street_photo, subtask="semantic")])
    assert set(np.unique(masks)) <= {0, 255}
    np.testing.assert_array_equal((masks == 255).sum(axis=0), 1)


def test_bad_subtask_and_bad_task(pipelines, street_photo):
    ours, _ = pipelines
    with pytest.raises(ValueError, match="unknown subtask 'depth'"):
        ours(street_photo, subtask="depth")
    with pytest.raises(ValueError, match="unknown task"):
        omniseg.pipeline("depth-estimation", model="whatever")


def test_bad_image_in_a_list_names_the_file(pipelines, tmp_path, street_photo):
    ours, _ = pipelines
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="broken.png"):
        ours([street_photo, bad])


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        omniseg.pipeline("image-segmentation", model=str(tmp_path / "no-model-here"))


def test_cuda_device_without_cuda_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Used to fail inside Module.to with torch's "AssertionError: Torch not compiled with CUDA enabled".
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available on this machine"):
        omniseg.pipeline("image-segmentation", device="cuda")
    with pytest.raises(ValueError, match="device 'cuda:1': CUDA is not available"):
        omniseg.load_model("any/model", device="cuda:1")
    with pytest.raises(ValueError, match="device 'gpu'"):
        omniseg.load_model("any/model", device="gpu")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("threshold", 1.5),  # answered no segments
        ("threshold", -0.1),  # answered every query, however unlikely
        ("threshold", float("nan")),  # answered no segments
        ("threshold", "0.5"),  # TypeError from inside torch, naming no option
        ("mask_threshold", 2),
        ("overlap_mask_area_threshold", -1),
        ("threshold", True),
        ("batch_size", 0),
    ],
)
def test_option_out_of_range_is_a_value_error_naming_it(option, value):
    seg = omniseg.pipeline("image-segmentation")  # the bundled model: small, no reference needed
    # Checked before the image is read: the missing file is never reported.
    with pytest.raises(ValueError, match=f"^{option} must be"):
        seg("no-such-file.png", **{option: value})
    with pytest.raises(ValueError, match=f"^{option} must be"):
        seg.predict([], **{option: value})
    with pytest.raises(ValueError, match="unknown subtask 'depth'"):
        seg("no-such-file.png", subtask="depth")


def test_thresholds_at_the_ends_of_their_range_are_accepted():
    from PIL import Image

    seg = omniseg.pipeline("image-segmentation")
    image = Image.new("RGB", (40, 30), (90, 120, 60))
    assert seg(image, threshold=1.0) == []
    assert all(
        segment["mask"].size == (40, 30)
        for segment in seg(image, threshold=0, mask_threshold=0, overlap_mask_area_threshold=1)
    )


@pytest.mark.parametrize(("option", "value"), [("batch_size", 0), ("batch_size", 2.5), ("max_pixels", 0), ("max_pixels", -1)])
def test_pipeline_settings_out_of_range_are_value_errors_naming_them(option, value):
    # batch_size=0 was kept (the CPU then ran one image per pass anyway); max_pixels=0 refused
    # every image as "too large".
    with pytest.raises(ValueError, match=f"^{option} must be an integer of at least 1"):
        omniseg.pipeline("image-segmentation", **{option: value})


def test_config_with_gaps_in_id2label_names_unnamed_classes(fitted_mask2former_dir, tmp_path, street_photo):
    # ids 1..N for an N-class head: output 0 has no name in the config (the reference raises
    # KeyError 0 on such a config); it is LABEL_0, and output i the name the config gives i.
    import json
    import shutil

    directory = tmp_path / "gaps"
    shutil.copytree(fitted_mask2former_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    original = {int(k): v for k, v in config["id2label"].items()}
    config["id2label"] = {str(k + 1): v for k, v in original.items()}
    config.pop("label2id", None)
    (directory / "config.json").write_text(json.dumps(config))

    expected = omniseg.pipeline("image-segmentation", model=str(fitted_mask2former_dir))(street_photo, subtask="semantic")
    seg = omniseg.pipeline("image-segmentation", model=str(directory))
    assert seg.id2label[0] == "LABEL_0" and seg.id2label[1] == original[0]
    results = seg(street_photo, subtask="semantic")
    names = {0: "LABEL_0"} | {i: original[i - 1] for i in range(1, len(original))}
    assert [r["label"] for r in results] == [names[list(original.values()).index(r["label"])] for r in expected]
    assert any(r["label"] == original[0] for r in expected), "class 0 should be predicted somewhere"
