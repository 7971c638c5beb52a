"""The ``mask-generation`` pipeline and its pieces against the reference.

The whole pipeline is compared with the reference pipeline on a real CamVid photo (the
whole image, and with one layer of crops): the same number of masks in the same order,
the same boxes, scores within float rounding, and the same masks except for isolated
pixels whose logit lies within float rounding of the threshold (omniseg computes the
encoder and decoder in another order, 1e-6 relative; a mask logit that close to 0 may
land on either side). The reference needs torchvision's ``batched_nms``,
which is provided from its definition (``reference_sam.reference_batched_nms``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_sam import (
    TINY_SAM_CONFIGS,
    build_reference_sam,
    reference_nms,
    torchvision_nms_for_reference,
)

transformers = pytest.importorskip("transformers")

import omniseg  # noqa: E402
from omniseg.errors import UnsupportedModelError  # noqa: E402
from omniseg.processing import mask_generation as amg  # noqa: E402
from transformers.models.sam import image_processing_pil_sam as reference_amg  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread_per_test")


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    # Perturbed enough that the random model's masks differ from point to point.
    return build_reference_sam(tmp_path_factory.mktemp("sam-amg"), perturb=0.3, **TINY_SAM_CONFIGS["deep"])


# The random model's confident masks are whole-image ones; a stability filter without the
# IoU filter and a permissive NMS keep many different masks to compare.
@pytest.mark.parametrize(
    ("options", "min_masks"),
    [
        (dict(points_per_crop=16, pred_iou_thresh=0, stability_score_thresh=0.3, crops_nms_thresh=0.99,
              points_per_batch=100), 30),
        (dict(points_per_crop=8, crops_n_layers=1, pred_iou_thresh=0, stability_score_thresh=0.3,
              crops_nms_thresh=0.99), 10),
        (dict(points_per_crop=16, pred_iou_thresh=0.5), 1),
    ],
    ids=["whole-image", "crops_n_layers=1", "iou-filter"],
)
def test_pipeline_matches_reference_on_a_photo(sam_dir, street_photo, options, min_masks) -> None:
    reference = transformers.pipeline("mask-generation", model=str(sam_dir), device="cpu")
    with torchvision_nms_for_reference():
        expected = reference(street_photo, output_rle_mask=True, output_bboxes_mask=True, **options)
    ours = omniseg.pipeline("mask-generation", model=sam_dir)
    actual = ours(street_photo, output_rle_mask=True, output_bboxes_mask=True, **options)
    assert set(actual) == {"masks", "scores", "rle_mask", "bounding_boxes"}
    assert len(expected["masks"]) >= min_masks, "the test model should give several masks"
    assert len(actual["masks"]) == len(expected["masks"])
    pixels = street_photo.height * street_photo.width
    differing = []
    for ours_mask, reference_mask in zip(actual["masks"], expected["masks"]):
        assert ours_mask.shape == (street_photo.height, street_photo.width)
        differing.append(int((ours_mask != reference_mask).sum()))
    assert max(differing) <= 1e-4 * pixels, differing
    assert sum(count > 0 for count in differing) <= len(differing) // 4, differing
    for ours_rle, reference_rle, count in zip(actual["rle_mask"], expected["rle_mask"], differing):
        if count == 0:
            assert ours_rle == reference_rle
    assert torch.equal(actual["bounding_boxes"], expected["bounding_boxes"])
    torch.testing.assert_close(actual["scores"], expected["scores"], rtol=1e-5, atol=1e-5)


def test_pipeline_default_outputs_and_list_input(sam_dir, street_photo) -> None:
    ours = omniseg.pipeline("mask-generation", model=sam_dir)
    results = ours([street_photo, np.asarray(street_photo)], points_per_crop=4, pred_iou_thresh=0)
    assert len(results) == 2 and all(set(r) == {"masks", "scores"} for r in results)
    assert all(np.array_equal(a, b) for a, b in zip(results[0]["masks"], results[1]["masks"]))


def test_wrong_model_for_each_task_is_a_typed_error(sam_dir, tmp_path) -> None:
    from reference_models import build_reference_mask2former

    with pytest.raises(UnsupportedModelError, match="mask-generation"):
        omniseg.pipeline("image-segmentation", model=sam_dir)
    other = build_reference_mask2former(tmp_path / "m2f")
    with pytest.raises(UnsupportedModelError, match="not a mask-generation model"):
        omniseg.pipeline("mask-generation", model=other)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("crops_n_layers", -1),  # was IndexError
        ("points_per_crop", 0),  # was ZeroDivisionError
        ("crop_n_points_downscale_factor", 0),  # was ZeroDivisionError with crops_n_layers 1
        ("points_per_batch", "64"),  # was TypeError comparing a str with an int
        ("points_per_batch", 0),
        ("mask_threshold", "x"),  # was TypeError adding a str to an int
        ("pred_iou_thresh", float("nan")),
        ("crop_overlap_ratio", 1.5),  # was accepted: tiles larger than the image
        ("crop_overlap_ratio", -0.1),
    ],
)
def test_bad_option_values_are_value_errors_naming_the_option(sam_dir, option, value) -> None:
    ours = omniseg.pipeline("mask-generation", model=sam_dir)
    with pytest.raises(ValueError, match=f"^{option} must be"):
        ours("no-such-file.png", **{"crops_n_layers": 1, option: value})  # checked before the image


@pytest.mark.parametrize("value", [0, -5, 1.5])
def test_max_pixels_below_one_is_a_value_error(sam_dir, value) -> None:
    with pytest.raises(ValueError, match=r"^max_pixels must be an integer of at least 1 \(or None for no limit\)"):
        omniseg.pipeline("mask-generation", model=sam_dir, max_pixels=value)


def _rss_kib(field: str) -> int:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_peak_memory_does_not_grow_with_the_masks_kept(sam_dir, street_photo) -> None:
    """Every mask passing the IoU filter (192 per batch here) used to be upsampled to full
    size at once as float logits, and every stable one kept at full size until NMS: 3.6 GB
    for a 3-megapixel photo, over 13 GB for 12 megapixels (a 9000 x 9000 image was killed
    for memory). Now UPSAMPLE_CHUNK masks exist at full size at a time, and masks wait for
    NMS at low resolution (measured: 2913 MiB before, 182 MiB after)."""
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    ours = omniseg.pipeline("mask-generation", model=sam_dir)
    photo = street_photo.resize((1200, 900))  # 1.08 megapixels: 4.3 MB per float map
    options = dict(points_per_crop=16, pred_iou_thresh=0, stability_score_thresh=0.3)
    ours(photo.resize((120, 90)), **options)  # warm up (first-call allocations)
    before = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS through /proc/self/clear_refs: {exc}")
    result = ours(photo, **options)
    growth_mib = (_rss_kib("VmHWM") - before) / 1024
    assert len(result["masks"]) >= 1
    assert growth_mib < 400, f"peak memory grew by {growth_mib:.0f} MiB"


# --- the pieces, against the reference's own functions -------------------------------------


def _random_masks(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    blobs = torch.rand(count, height // 4 + 1, width // 4 + 1, generator=generator) > 0.6
    masks = torch.nn.functional.interpolate(blobs[:, None].float(), size=(height, width))[:, 0] > 0.5
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2, 0, 0] = True  # starts with a one
    return masks


def test_rle_and_boxes_match_reference() -> None:
    masks = _random_masks(12, 37, 53, seed=0)
    assert amg.masks_to_rle(masks) == reference_amg._mask_to_rle(masks)
    assert torch.equal(amg.mask_boxes(masks), reference_amg._batched_mask_to_box(masks))
    for rle, mask in zip(amg.masks_to_rle(masks), masks):
        assert np.array_equal(amg.rle_to_mask(rle), mask.numpy())


def test_stability_scores_match_reference() -> None:
    logits = torch.randn(9, 31, 40, generator=torch.Generator().manual_seed(1)) * 3
    for threshold, offset in ((0.0, 1.0), (0.5, 0.25)):
        torch.testing.assert_close(
            amg.stability_scores(logits, threshold, offset),
            reference_amg._compute_stability_score(logits, threshold, offset),
            rtol=0, atol=0,
        )


def test_crop_boxes_and_edge_filter_match_reference() -> None:
    for layers, ratio, size in ((0, 512 / 1500, (360, 480)), (2, 0.3, (301, 97))):
        expected_boxes, expected_layers = reference_amg._generate_per_layer_crops(layers, ratio, size)
        assert amg.crop_boxes(layers, ratio, size) == list(zip(expected_boxes, expected_layers))
    boxes = amg.mask_boxes(_random_masks(20, 60, 80, seed=2))
    crop, image = [100, 40, 180, 100], (360, 480)
    assert torch.equal(
        amg.near_crop_edge(boxes, crop, image),
        reference_amg._is_box_near_crop_edge(boxes, crop, [0, 0, image[1], image[0]]),
    )


def test_nms_matches_the_definition() -> None:
    generator = torch.Generator().manual_seed(3)
    corners = torch.randint(0, 60, (80, 2, 2), generator=generator).float()
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values + 1], dim=1)
    scores = torch.randint(0, 10, (80,), generator=generator).float()  # many ties
    for threshold in (0.0, 0.3, 0.7, 1.0):
        assert amg.nms(boxes, scores, threshold).tolist() == reference_nms(boxes, scores, threshold).tolist()
    assert amg.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_kept_masks_upsample_to_the_references_numbers(sam_dir) -> None:
    """The pipeline upsamples only the masks that passed the IoU filter; PyTorch's bilinear
    kernel rounds differently with 3 channels (the reference's ``[prompts, 3]``) than with
    any other count, so the kept masks go in groups of three: bit-identical logits."""
    from reference_sam import reference_sam_processor

    ours = omniseg.pipeline("mask-generation", model=sam_dir)
    size = ours.processor.target_size
    low_res = torch.randn(6, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(7)) * 20
    original, reshaped = (61, 83), [size * 61 // 83, size]
    expected = reference_sam_processor(size).post_process_masks(
        [low_res.clone()], [original], [reshaped], binarize=False
    )[0].flatten(0, 1)
    for kept in ([0, 4, 5, 9, 17], [3], list(range(18))):
        actual = ours._upsample(low_res.flatten(0, 1)[kept], original, reshaped)
        assert torch.equal(actual, expected[kept]), kept


@pytest.mark.parametrize("size", [(4000, 10), (10, 4000), (1, 1)])
def test_very_thin_and_one_pixel_images_give_masks_at_their_size(sam_dir, size) -> None:
    from PIL import Image

    width, height = size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    ours = omniseg.pipeline("mask-generation", model=sam_dir)
    # 4000x10 resized to the tiny model's 96 pixels has a short side of 0.24: it was rounded
    # to 0, and PIL's resize failed with "ValueError: height and width must be > 0".
    result = ours(image, points_per_crop=4, crops_n_layers=1, pred_iou_thresh=0, stability_score_thresh=0)
    assert len(result["masks"]) > 0
    assert all(mask.shape == (height, width) for mask in result["masks"])
