"""Mask2Former image processor and post-processing against the reference implementation.

The reference (``transformers``) is a test-only dependency: it saves its settings, ours loads
them, and both process the same real photos, real CamVid label maps and structured model outputs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from parity import assert_result_match

from omniseg.ops import _numba, scored_argmax
from omniseg.processing import mask_classification
from omniseg.processing.mask2former import Mask2FormerImageProcessor

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("single_thread_per_test")


@pytest.fixture(params=["numba", "pytorch"])
def panoptic_reduction(request, monkeypatch):
    """Run a panoptic test with the compiled per-pixel reduction (the ``fast`` extra) and with
    the PyTorch path used without it."""
    if request.param == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(_numba, "numba", None)
    return request.param


def _reference(**settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Mask2FormerImageProcessor(**settings)


def _reference_from(directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Mask2FormerImageProcessor.from_pretrained(str(directory))


@pytest.fixture
def pair(tmp_path: Path):
    """``make(**settings) -> (reference, ours)``: ours loaded from what the reference saved."""

    def make(**settings):
        ref = _reference(**settings)
        directory = tmp_path / f"ref{len(list(tmp_path.iterdir()))}"
        ref.save_pretrained(str(directory))
        return ref, Mask2FormerImageProcessor.from_pretrained(directory)

    return make


def _assert_pixels_match(ref_out, ours_out) -> None:
    ref_values, ours_values = ref_out["pixel_values"], ours_out["pixel_values"]
    assert ours_values.dtype == torch.float32 and ours_out["pixel_mask"].dtype == torch.int64
    assert ours_values.shape == ref_values.shape
    assert torch.equal(ours_out["pixel_mask"], ref_out["pixel_mask"])
    assert (ours_values - ref_values).abs().mean().item() < 1e-2


# --------------------------------------------------------------------------- preprocessing


def test_defaults_match_reference(pair) -> None:
    ref, ours = pair()
    assert ours.size == {"shortest_edge": 800, "longest_edge": 1333}
    assert (ours.size_divisor, ours.resample, ours.do_reduce_labels, ours.ignore_index) == (32, 2, False, None)
    assert ours.image_mean == pytest.approx(list(ref.image_mean))
    assert ours.rescale_factor == pytest.approx(ref.rescale_factor)
    assert ours == Mask2FormerImageProcessor(extra=ours.extra)


def test_batch_of_odd_sized_photos_default_settings(pair, small_street_photos) -> None:
    ref, ours = pair()
    ref_out = ref(small_street_photos, return_tensors="pt")
    ours_out = ours(small_street_photos)
    _assert_pixels_match(ref_out, ours_out)
    # Different sizes: padding and the pixel mask matter.
    assert ours_out.original_sizes == [(101, 147), (133, 121)]
    assert ours_out.resized_sizes == [ours.resized_size(101, 147), ours.resized_size(133, 121)]
    assert ours_out.resized_sizes[0] != ours_out.resized_sizes[1]
    for i, (h, w) in enumerate(ours_out.resized_sizes):
        assert int(ours_out.pixel_mask[i].sum()) == h * w
        assert h % 32 == 0 and w % 32 == 0


def test_photo_gray_rgba_and_numpy_inputs(pair, street_photo) -> None:
    ref, ours = pair(size={"shortest_edge": 224, "longest_edge": 400}, do_convert_rgb=True)
    rgba = street_photo.copy()
    alpha = np.tile(np.linspace(40, 255, street_photo.width, dtype=np.uint8), (street_photo.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    inputs = {
        "photo": street_photo,
        "gray": street_photo.convert("L"),
        "rgba": rgba,
        "numpy_hwc": np.array(street_photo)[5:300, 7:411],
    }
    for name, image in inputs.items():
        ref_out = ref(image, return_tensors="pt")
        ours_out = ours(image)
        assert ours_out.pixel_values.shape[1] == 3, name
        _assert_pixels_match(ref_out, ours_out)
    batch = [inputs["gray"], inputs["numpy_hwc"], inputs["rgba"]]
    _assert_pixels_match(ref(batch, return_tensors="pt"), ours(batch))


def test_photo_pixels_are_the_references_bit_for_bit(pair, street_photo) -> None:
    """PIL resizing, the float64 rescale and the float32 normalisation (looked up per uint8
    level) give exactly the reference's inputs, whatever the input's form."""
    ref, ours = pair(size={"shortest_edge": 96, "longest_edge": 160}, do_convert_rgb=True)
    rgba = street_photo.convert("RGBA")
    rgba.putalpha(120)
    hwc = np.array(street_photo)
    for image in (street_photo, rgba, hwc, torch.from_numpy(hwc).permute(2, 0, 1), [street_photo, rgba]):
        expected = ref(image, return_tensors="pt")["pixel_values"]
        assert torch.equal(ours(image).pixel_values, expected)
    # Without resizing, the looked-up levels meet the pixels as they come.
    ref, ours = pair(do_resize=False)
    assert torch.equal(ours(street_photo).pixel_values, ref(street_photo, return_tensors="pt")["pixel_values"])


def test_grayscale_without_rgb_conversion_is_rejected_like_reference(pair, street_photo) -> None:
    ref, ours = pair(size={"height": 64, "width": 96})
    gray = street_photo.convert("L")
    with pytest.raises(ValueError):
        ref(gray, return_tensors="pt")
    with pytest.raises(ValueError, match="channel"):
        ours(gray)


def test_fixed_size_no_normalize_and_channels_first_numpy(pair, street_photo) -> None:
    ref, ours = pair(size={"height": 120, "width": 200}, do_normalize=False, size_divisor=0)
    chw = np.array(street_photo).transpose(2, 0, 1).copy()
    _assert_pixels_match(ref(chw, return_tensors="pt"), ours(chw))
    assert ours(chw).pixel_values.shape == (1, 3, 120, 200)


# --------------------------------------------------------------------------- targets


def _camvid_pairs(camvid_dir: Path, count: int = 2) -> list[tuple[Image.Image, np.ndarray]]:
    images = sorted((camvid_dir / "images" / "val").glob("*.png"))[:count]
    return [(Image.open(p).convert("RGB"), np.array(Image.open(camvid_dir / "labels" / "val" / p.name))) for p in images]


def _assert_targets_match(ref_out, ours_out) -> None:
    _assert_pixels_match(ref_out, ours_out)
    assert len(ours_out.mask_labels) == len(ref_out["mask_labels"])
    for ref_masks, ours_masks, ref_classes, ours_classes in zip(
        ref_out["mask_labels"], ours_out.mask_labels, ref_out["class_labels"], ours_out.class_labels
    ):
        assert ours_masks.dtype == torch.float32 and ours_classes.dtype == torch.int64
        assert ours_masks.shape == ref_masks.shape
        assert torch.equal(ours_masks, ref_masks.float())
        assert torch.equal(ours_classes, ref_classes.long())


def test_targets_camvid_resized_with_ignore_index(pair, camvid_dir) -> None:
    data = _camvid_pairs(camvid_dir)
    ref, ours = pair(size={"shortest_edge": 160, "longest_edge": 640}, ignore_index=11)
    images, maps = [d[0] for d in data], [d[1] for d in data]
    ref_out = ref(images, segmentation_maps=maps, return_tensors="pt")
    ours_out = ours(images, segmentation_maps=maps)
    _assert_targets_match(ref_out, ours_out)
    assert all(11 not in c.tolist() for c in ours_out.class_labels)
    assert ours_out.mask_labels[0].shape[-2:] == (160, 224)


def test_targets_camvid_odd_crops_padding_and_reduce_labels(pair, camvid_dir) -> None:
    data = _camvid_pairs(camvid_dir)
    boxes = [(17, 9, 17 + 147, 9 + 101), (40, 30, 40 + 121, 30 + 133)]
    images = [img.crop(box) for (img, _), box in zip(data, boxes)]
    maps = [lab[box[1] : box[3], box[0] : box[2]] for (_, lab), box in zip(data, boxes)]
    for settings in (
        {"do_resize": False, "ignore_index": 11},
        {"do_resize": False, "ignore_index": 255, "do_reduce_labels": True},
    ):
        ref, ours = pair(**settings)
        _assert_targets_match(ref(images, segmentation_maps=maps, return_tensors="pt"), ours(images, segmentation_maps=maps))
    # The call arguments override the saved settings, as in the reference.
    ref, ours = pair(do_resize=False)
    kwargs = {"ignore_index": 255, "do_reduce_labels": True}
    _assert_targets_match(
        ref(images, segmentation_maps=maps, return_tensors="pt", **kwargs), ours(images, segmentation_maps=maps, **kwargs)
    )


def test_targets_with_instance_ids(pair, camvid_dir) -> None:
    data = _camvid_pairs(camvid_dir)
    images = [d[0] for d in data]
    # Instance ids: class * 2 + (right half), a stand-in for connected components.
    instance_maps, mappings = [], []
    for _, labels in data:
        half = (np.arange(labels.shape[1]) >= labels.shape[1] // 2).astype(np.uint8)[None, :]
        inst = labels * 2 + half
        instance_maps.append(inst.astype(np.uint8))
        mappings.append({int(v): int(v) // 2 for v in np.unique(inst)})
    shared = {k: v for m in mappings for k, v in m.items()}
    ref, ours = pair(size={"shortest_edge": 160, "longest_edge": 640}, ignore_index=22)
    for mapping in (mappings, shared):
        ref_out = ref(images, segmentation_maps=instance_maps, instance_id_to_semantic_id=mapping, return_tensors="pt")
        ours_out = ours(images, segmentation_maps=instance_maps, instance_id_to_semantic_id=mapping)
        _assert_targets_match(ref_out, ours_out)
    # With label reduction the mapping is looked up with the original ids.
    ref, ours = pair(do_resize=False, ignore_index=255, do_reduce_labels=True)
    ref_out = ref(images, segmentation_maps=instance_maps, instance_id_to_semantic_id=shared, return_tensors="pt")
    _assert_targets_match(ref_out, ours(images, segmentation_maps=instance_maps, instance_id_to_semantic_id=shared))


# --------------------------------------------------------------------------- post-processing


def structured_outputs(seed: int, batch: int = 2, queries: int = 16, classes: int = 7, height: int = 24, width: int = 32):
    """Mask logits of clear rectangles (+-8), confident classes, some null-class queries and
    overlapping near-duplicates (same class, shrunk mask, different confidence)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.full((batch, queries, height, width), -8.0)
    logits = torch.randn(batch, queries, classes + 1, generator=g) * 0.3
    for b in range(batch):
        for q in range(queries):
            if q >= 2 and q % 5 == 0:  # near-duplicate of the previous query, partly covered by it
                masks[b, q] = -8.0
                y0, y1, x0, x1 = prev
                masks[b, q, y0 : max(y0 + 2, y1 - 3), x0 : max(x0 + 2, x1 - 2)] = 7.0
                masks[b, q, y0 + (y1 - y0) // 2 : y1, x0:x1] = 9.0
                logits[b, q, prev_class] = float(torch.empty(1).uniform_(3.0, 9.0, generator=g))
                continue
            y0 = int(torch.randint(0, height - 6, (1,), generator=g))
            x0 = int(torch.randint(0, width - 6, (1,), generator=g))
            y1 = y0 + int(torch.randint(4, height - y0 + 1, (1,), generator=g))
            x1 = x0 + int(torch.randint(4, width - x0 + 1, (1,), generator=g))
            masks[b, q, y0:y1, x0:x1] = float(torch.empty(1).uniform_(5.0, 10.0, generator=g))
            cls = classes if q % 7 == 3 else int(torch.randint(0, classes, (1,), generator=g))
            logits[b, q, cls] = float(torch.empty(1).uniform_(2.0, 9.0, generator=g))
            prev, prev_class = (y0, y1, x0, x1), cls
    return SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)


TARGETS = [None, [(61, 83), (400, 300)]]


@pytest.mark.parametrize("target_sizes", TARGETS)
def test_semantic_post_processing_matches_reference(target_sizes) -> None:
    ref = _reference()
    for seed in range(2):
        outputs = structured_outputs(seed)
        ours = mask_classification.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        expected = ref.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        for a, b in zip(ours, expected):
            assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("target_sizes", TARGETS)
def test_instance_post_processing_matches_reference(target_sizes) -> None:
    ref = _reference()
    processor = Mask2FormerImageProcessor()
    cases = [(0.0, {}), (0.0, {"return_coco_annotation": True}), (0.0, {"return_binary_maps": True}), (0.7, {})]
    for seed in range(2):
        outputs = structured_outputs(seed)
        for threshold, extra in cases:
            kwargs = {"threshold": threshold, "target_sizes": target_sizes, **extra}
            ours = processor.post_process_instance_segmentation(outputs, **kwargs)
            expected = ref.post_process_instance_segmentation(outputs, **kwargs)
            for a, b in zip(ours, expected):
                assert_result_match(a, b)
    # Nothing above the threshold: -1 map and no segments.
    empty = processor.post_process_instance_segmentation(structured_outputs(0), threshold=1.1, target_sizes=target_sizes)
    assert all(r["segments_info"] == [] and bool((r["segmentation"] == -1).all()) for r in empty)


@pytest.mark.parametrize("target_sizes", TARGETS)
def test_panoptic_post_processing_matches_reference(target_sizes, panoptic_reduction) -> None:
    ref = _reference()
    processor = Mask2FormerImageProcessor()
    seen_fused = seen_dropped = 0
    settings = [(0.5, 0.5, 0.8, {0, 2, 4}), (0.0, 0.9, 0.95, None), (0.8, 0.3, 0.5, {0, 2, 4}), (0.0, 0.5, 0.8, {1, 3, 5})]
    for seed in range(3):
        outputs = structured_outputs(seed)
        for threshold, mask_threshold, overlap, fuse in settings[seed % 2 :: 2] + settings[2 - seed % 2 : 3 - seed % 2]:
            kwargs = {
                "threshold": threshold,
                "mask_threshold": mask_threshold,
                "overlap_mask_area_threshold": overlap,
                "label_ids_to_fuse": fuse,
                "target_sizes": target_sizes,
            }
            ours = processor.post_process_panoptic_segmentation(outputs, **kwargs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = ref.post_process_panoptic_segmentation(outputs, **kwargs)
            for a, b in zip(ours, expected):
                assert_result_match(a, b)
                ids = [s["id"] for s in a["segments_info"]]
                seen_fused += len(ids) - len(set(ids))
                seen_dropped += threshold == 0.0 and len(ids) < outputs.class_queries_logits.shape[1]
    assert seen_fused > 0 and seen_dropped > 0  # fusing and the overlap filter were exercised


def test_rle_format_matches_reference() -> None:
    from transformers.models.mask2former import image_processing_pil_mask2former as reference_module

    g = torch.Generator().manual_seed(0)
    segmentation = torch.randint(-1, 4, (9, 13), generator=g).float()
    segmentation[:3] = 2.0
    assert mask_classification.convert_segmentation_to_rle(segmentation) == [
        list(map(int, r)) for r in reference_module.convert_segmentation_to_rle(segmentation)
    ]
    mask = segmentation == 2
    assert mask_classification.binary_mask_to_rle(mask.long()) == [
        int(v) for v in reference_module.binary_mask_to_rle(mask.long())
    ]


# --------------------------------------------------------------------------- settings round trip


def test_save_pretrained_round_trip_loads_in_reference(tmp_path: Path, street_photo) -> None:
    ours = Mask2FormerImageProcessor(
        size={"shortest_edge": 256, "longest_edge": 512},
        size_divisor=16,
        ignore_index=11,
        do_reduce_labels=False,
        num_labels=11,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        extra={"some_future_key": 1},
    )
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Mask2FormerImageProcessor"
    assert saved["some_future_key"] == 1
    ref = _reference_from(tmp_path)
    assert dict(ref.size) == ours.size
    assert (ref.size_divisor, ref.ignore_index, ref.num_labels, ref.do_reduce_labels) == (16, 11, 11, False)
    assert list(ref.image_mean) == ours.image_mean and list(ref.image_std) == ours.image_std
    assert int(ref.resample) == ours.resample
    _assert_pixels_match(ref(street_photo, return_tensors="pt"), ours(street_photo))
    assert Mask2FormerImageProcessor.from_pretrained(tmp_path) == ours


def test_legacy_size_and_max_size_keys(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 384, "max_size": 640}))
    ours = Mask2FormerImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"shortest_edge": 384, "longest_edge": 640}
    assert "max_size" not in ours.to_dict()
    assert dict(_reference_from(tmp_path).size) == ours.size


def _first_argmax(values: torch.Tensor, may_be_nan: bool = True) -> torch.Tensor:
    return mask_classification._chunked_first_argmax(lambda a, b: values[a:b], len(values), may_be_nan=may_be_nan)


def test_fast_argmax_equals_torch_argmax_with_ties_and_nan() -> None:
    g = torch.Generator().manual_seed(1)
    values = torch.randint(0, 3, (21, 5, 6), generator=g).float()  # many ties, several chunks
    values[2, 0, 0] = float("nan")
    values[[12, 19], 1, 1] = float("nan")  # NaN in later chunks only
    values[:, 4, 5] = float("nan")
    assert torch.equal(_first_argmax(values), values.argmax(dim=0))
    finite = values.nan_to_num(0.0)
    assert torch.equal(_first_argmax(finite, may_be_nan=False), finite.argmax(dim=0))
    many = torch.randint(0, 4, (300, 3, 4), generator=g).float()  # beyond the uint8 fast path
    assert torch.equal(_first_argmax(many), many.argmax(dim=0))


def test_scored_argmax_kernel_matches_pytorch() -> None:
    pytest.importorskip("numba")
    g = torch.Generator().manual_seed(2)
    maps = torch.randint(0, 4, (21, 5, 6), generator=g).float() / 3  # many ties, three chunks
    maps[2, 0, 0] = float("nan")
    maps[[12, 19], 1, 1] = float("nan")  # NaN in later chunks only
    maps[:, 4, 5] = float("nan")
    maps[5:9, 2] = 0.7  # float32(0.7) < 0.7: at the threshold only when compared in float32
    scores = torch.ones(21)
    scores[::3] = torch.rand(7, generator=g)
    scaled = maps * scores.view(-1, 1, 1)
    best = torch.empty(5, 6)
    owner = torch.empty(5, 6, dtype=torch.long)
    areas = torch.empty(21, dtype=torch.long)
    for start in range(0, 21, 8):
        scored_argmax.update(maps[start : start + 8], scores[start : start + 8], start, 0.7, best, owner, areas)
    assert torch.equal(owner, scaled.argmax(dim=0))
    assert torch.equal(areas, (scaled >= 0.7).sum(dim=(1, 2)))
    assert int(areas[5]) >= 6


@pytest.mark.parametrize("in_size, out_size", [((13, 17), (29, 23)), ((96, 128), (480, 640)), ((384, 384), (61, 83))])
def test_scored_argmax_resizes_like_pytorch(in_size, out_size) -> None:
    pytest.importorskip("numba")
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(11, *in_size, generator=g)
    maps[4, 1, 2] = float("nan")
    scores = torch.rand(11, generator=g)
    scores[7] = scores[2]  # a later map tying an earlier one wherever their values tie
    maps[7] = maps[2]
    best = torch.empty(out_size)
    owner = torch.empty(out_size, dtype=torch.long)
    areas = torch.empty(11, dtype=torch.long)
    for start in range(0, 11, 8):
        scored_argmax.update(maps[start : start + 8], scores[start : start + 8], start, 0.3, best, owner, areas)
    resized = F.interpolate(maps[None], size=out_size, mode="bilinear", align_corners=False)[0]
    scaled = resized * scores.view(-1, 1, 1)
    assert torch.equal(owner, scaled.argmax(dim=0))
    assert torch.equal(areas, (scaled >= 0.3).sum(dim=(1, 2)))


def test_panoptic_fused_id_reuse_matches_reference_counter(panoptic_reduction) -> None:
    # Four side-by-side queries: classes A (fused), B, A, C. The reference reuses A's id for the
    # second A and continues counting from it, so C gets B's id; we reproduce that exactly.
    masks = torch.full((1, 4, 8, 16), -9.0)
    for q in range(4):
        masks[0, q, :, 4 * q : 4 * q + 4] = 9.0
    logits = torch.full((1, 4, 4), -5.0)
    for q, cls in enumerate([0, 1, 0, 2]):
        logits[0, q, cls] = 5.0 + q * 0.1
    outputs = SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)
    ours = mask_classification.post_process_panoptic_segmentation(outputs, label_ids_to_fuse={0})
    expected = _reference().post_process_panoptic_segmentation(outputs, label_ids_to_fuse={0})
    assert_result_match(ours[0], expected[0])
    assert [s["id"] for s in ours[0]["segments_info"]] == [1, 2, 1, 2]


def test_panoptic_ties_and_nan_across_query_chunks(panoptic_reduction) -> None:
    # More queries than one chunk of the running argmax: identical masks and scores tie
    # everywhere (the first query must win), and a query with NaN logits in a later chunk
    # takes the pixels where it is NaN (argmax ranks NaN first), as in the reference.
    queries = 21
    masks = torch.full((1, queries, 12, 16), 2.0)
    masks[0, 13, 3:6, 4:9] = float("nan")
    masks[0, 17, 7:, 10:] = float("inf")
    logits = torch.full((1, queries, 4), -5.0)
    logits[0, :, 1] = 5.0
    outputs = SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)
    for target_sizes in (None, [(25, 31)]):
        kwargs = {"threshold": 0.5, "overlap_mask_area_threshold": 0.0, "target_sizes": target_sizes}
        ours = mask_classification.post_process_panoptic_segmentation(outputs, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = _reference().post_process_panoptic_segmentation(outputs, **kwargs)
        assert_result_match(ours[0], expected[0])
        assert len(ours[0]["segments_info"]) >= 2


def test_semantic_ties_and_nan_across_class_chunks() -> None:
    # 20 classes (more than one chunk of the running argmax): classes 3 and 12 score the
    # same everywhere (the first must win), and NaN / inf logits make NaN scores (of every
    # class at a pixel: argmax gives class 0 there).
    queries, classes = 5, 20
    masks = torch.randn(1, queries, 12, 16, generator=torch.Generator().manual_seed(0)) * 3
    masks[0, 1, 3:6, 4:9] = float("nan")
    masks[0, 2, 7:, 10:] = float("inf")
    logits = torch.full((1, queries, classes + 1), -5.0)
    logits[0, :, 3] = logits[0, :, 12] = 4.0
    logits[0, 4, 15] = 6.0
    outputs = SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)
    for target_sizes in (None, [(25, 31)]):
        ours = mask_classification.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        expected = _reference().post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        assert torch.equal(ours[0], expected[0])
        assert {3, 15} <= set(ours[0].unique().tolist())


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_semantic_leaders_and_boundaries_match_reference(scale) -> None:
    # Smooth masks of a few classes at Mask2Former's 1/4 resolution (96x128 for 384x512
    # inputs): large areas where one class clearly leads (answered without resizing the class
    # maps), boundaries and near ties where the exact path decides; mild and saturated logits.
    # The second image has one class leading everywhere.
    g = torch.Generator().manual_seed(3)
    queries, classes = 10, 6
    masks = torch.nn.functional.interpolate(
        torch.randn(2, queries, 6, 8, generator=g), size=(96, 128), mode="bilinear", align_corners=False
    ) * scale
    logits = torch.randn(2, queries, classes + 1, generator=g) * 3
    logits[1, :, 4] += 15.0
    outputs = SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)
    for target_sizes in (None, [(480, 640), (61, 83)]):
        ours = mask_classification.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        expected = _reference().post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        for a, b in zip(ours, expected):
            assert torch.equal(a, b)
        assert len(ours[0].unique()) >= 3 and ours[1].unique().tolist() == [4]


def test_semantic_many_classes_few_winners_match_reference() -> None:
    # A trained COCO-like head: 133 classes, 100 queries each confident in one of 8 classes,
    # so where segments meet only a few classes can win and only those are scored exactly.
    g = torch.Generator().manual_seed(5)
    queries, classes = 100, 133
    masks = torch.nn.functional.interpolate(
        torch.randn(1, queries, 6, 8, generator=g), size=(96, 128), mode="bilinear", align_corners=False
    ) * 20
    logits = torch.randn(1, queries, classes + 1, generator=g)
    logits[0, torch.arange(queries), torch.randint(0, 8, (queries,), generator=g)] += 12
    outputs = SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks)
    for target_sizes in (None, [(480, 640)]):
        ours = mask_classification.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        expected = _reference().post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        assert torch.equal(ours[0], expected[0])
        assert len(ours[0].unique()) >= 4


def test_read_only_arrays_raise_no_torch_warning(tmp_path) -> None:
    """``processor(np.asarray(pil_image))``, the usual way to hand over an array, used to print
    torch's "The given NumPy array is not writable ... undefined behavior" warning. torch warns
    once per process, so the check runs in a fresh one."""
    code = (
        "import numpy as np\n"
        "from PIL import Image\n"
        "from omniseg.processing.mask2former import Mask2FormerImageProcessor\n"
        "image = np.asarray(Image.new('RGB', (40, 30), (10, 200, 30)))\n"
        "label = np.asarray(Image.new('L', (40, 30), 1))\n"
        "assert not image.flags.writeable and not label.flags.writeable\n"
        "processor = Mask2FormerImageProcessor(size={'height': 32, 'width': 32})\n"
        "processor([image, image], segmentation_maps=[label, label], return_tensors='pt')\n"
    )
    assert "not writable" not in _run_with_warnings_as_errors(code)


def test_outputs_with_grad_raise_no_torch_warning() -> None:
    """``outputs = model(**inputs)`` outside ``torch.no_grad`` (the README's example) gives
    logits that require grad; every post-processing used to print torch's "Converting a
    tensor with requires_grad=True to a scalar may lead to unexpected results" warning.
    torch warns once per process, so the check runs in a fresh one."""
    code = (
        "import torch\n"
        "from types import SimpleNamespace\n"
        "from omniseg.processing.mask2former import Mask2FormerImageProcessor\n"
        "torch.manual_seed(0)\n"
        "outputs = SimpleNamespace(class_queries_logits=torch.randn(1, 5, 4, requires_grad=True),\n"
        "                          masks_queries_logits=torch.randn(1, 5, 24, 32, requires_grad=True))\n"
        "processor = Mask2FormerImageProcessor(size={'height': 32, 'width': 32})\n"
        "processor.post_process_semantic_segmentation(outputs, target_sizes=[(30, 40)])\n"
        "processor.post_process_instance_segmentation(outputs, threshold=0.0)\n"
        "processor.post_process_panoptic_segmentation(outputs, threshold=0.0)\n"
    )
    assert "requires_grad" not in _run_with_warnings_as_errors(code)


def _run_with_warnings_as_errors(code: str) -> str:
    """Run ``code`` in a fresh Python (torch warns once per process) with every warning an
    error; assert it succeeds and return its stderr."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "processor_path",
    [
        "omniseg.processing.mask2former:Mask2FormerImageProcessor",
        "omniseg.processing.maskformer:MaskFormerImageProcessor",
        "omniseg.processing.segformer:SegformerImageProcessor",
        "omniseg.processing.detr:DetrImageProcessor",
        "omniseg.processing.sam:SamImageProcessor",
    ],
)
def test_an_empty_list_of_images_is_a_clear_error(processor_path) -> None:
    import importlib

    module, name = processor_path.split(":")
    processor = getattr(importlib.import_module(module), name)()
    # Was "ValueError: max() arg is an empty sequence" (SAM: torch's "stack expects a
    # non-empty TensorList"), from the middle of preprocessing.
    for empty in ([], ()):
        with pytest.raises(ValueError, match="^images: got an empty list"):
            processor(empty, return_tensors="pt")
