"""SAM image processor against the reference (``SamProcessor`` with its image processor):
pixels, sizes and rescaled prompts equal, ``post_process_masks`` identical; bad prompts
give typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_sam import reference_sam_processor

transformers = pytest.importorskip("transformers")

from omniseg.errors import PromptError  # noqa: E402
from omniseg.processing.sam import SamImageProcessor  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread_per_test")


@pytest.fixture(scope="module", params=[1024, 96])
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sam-processor")
    reference = transformers.SamProcessor(image_processor=reference_sam_processor(request.param))
    reference.image_processor.save_pretrained(directory)
    return reference, SamImageProcessor.from_pretrained(directory)


def test_saved_settings_round_trip(pair, tmp_path) -> None:
    reference, ours = pair
    ours.save_pretrained(tmp_path)
    again = transformers.SamImageProcessor.from_pretrained(tmp_path)
    for key in ("size", "pad_size", "mask_size", "mask_pad_size", "image_mean", "image_std", "rescale_factor"):
        assert dict(again.to_dict())[key] == reference.image_processor.to_dict()[key], key


def test_pixels_sizes_and_prompts_match_reference(pair, street_photo) -> None:
    reference, ours = pair
    second = street_photo.crop((10, 20, 210, 320))  # portrait, so the other side is longest
    points = [[[[100.0, 50.5], [30.0, 200.0]]], [[[150.0, 100.0], [10.0, 10.0]]]]
    labels = [[[1, 0]], [[1, 1]]]
    boxes = [[[20.0, 30.0, 200.0, 250.0]], [[0.0, 0.0, 199.0, 299.0]]]
    expected = reference(images=[street_photo, second], input_points=points, input_labels=labels,
                         input_boxes=boxes, return_tensors="pt")
    actual = ours([street_photo, second], input_points=points, input_labels=labels, input_boxes=boxes)
    torch.testing.assert_close(actual["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert actual["original_sizes"].tolist() == torch.as_tensor(expected["original_sizes"]).tolist()
    assert actual["reshaped_input_sizes"].tolist() == torch.as_tensor(expected["reshaped_input_sizes"]).tolist()
    for key in ("input_points", "input_labels", "input_boxes"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, check_dtype=False)
        assert actual[key].dtype == expected[key].dtype or key == "input_labels", key


@pytest.mark.parametrize("binarize", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_post_process_masks_identical(pair, binarize, threshold) -> None:
    reference, ours = pair
    generator = torch.Generator().manual_seed(0)
    low = ours.pad_size["height"] // 4
    masks = [torch.randn(2, 3, low, low, generator=generator) * 4, torch.randn(1, 3, low, low, generator=generator)]
    original = [(360, 480), (301, 97)]
    reshaped = [ours.target_size * np.array(s) / max(s) for s in original]
    reshaped = [(int(h + 0.5), int(w + 0.5)) for h, w in reshaped]
    expected = reference.image_processor.post_process_masks(
        [m.clone() for m in masks], original, reshaped, mask_threshold=threshold, binarize=binarize
    )
    actual = ours.post_process_masks(masks, torch.tensor(original), torch.tensor(reshaped),
                                     mask_threshold=threshold, binarize=binarize)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("prompts", "words"),
    [
        (dict(input_points=[[[[500.0, 10.0]]]]), "outside"),
        (dict(input_points=[[[[10.0, -1.0]]]]), "outside"),
        (dict(input_points=[]), "empty"),
        (dict(input_boxes=[[]]), "empty"),
        (dict(input_boxes=[[[100.0, 10.0, 50.0, 60.0]]]), "x1 < x0"),
        (dict(input_boxes=[[[10.0, 10.0, 50.0, 400.0]]]), "outside"),
        (dict(input_points=[[[[1.0, 2.0]]]], input_labels=[[[1, 1]]]), "does not match"),
        (dict(input_labels=[[[1]]]), "without input_points"),
        (dict(input_points=[[[[1.0, 2.0]], [[1.0]]]]), "nested list"),
    ],
)
def test_bad_prompts_are_typed_errors(pair, street_photo, prompts, words) -> None:
    _, ours = pair
    with pytest.raises(PromptError, match=words):
        ours(street_photo, **prompts)


def test_padding_points_may_lie_outside(pair, street_photo) -> None:
    _, ours = pair
    inputs = ours(street_photo, input_points=[[[[10.0, 10.0], [-10.0, -10.0]]]], input_labels=[[[1, -10]]])
    assert inputs["input_labels"].tolist() == [[[1, -10]]]
