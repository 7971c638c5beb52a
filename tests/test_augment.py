"""Training augmentation and instance targets: image and labels stay aligned."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from omniseg.data.augment import (
    ColorJitter,
    TrainAugmentation,
    hsv_to_rgb,
    random_crop,
    resize_pair,
    rgb_to_hsv,
    sample_generator,
)
from omniseg.data.targets import instances_from_semantic


def _coded_pair(height: int = 37, width: int = 53, classes: int = 6):
    """An image whose red channel encodes the label (label * 40), so alignment is checkable."""
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, classes, (height, width), generator=g)
    image = torch.stack([label * 40, torch.full_like(label, 7), label * 3]).to(torch.uint8)
    return image, label


def test_crop_and_flip_keep_image_and_labels_aligned_and_pad_with_ignore() -> None:
    image, label = _coded_pair()
    aug = TrainAugmentation(crop_size=(48, 48), scale_range=None, flip_prob=0.5, color_jitter=None, ignore_index=255)
    flipped = 0
    for seed in range(12):
        out_image, out_label = aug(image, label, torch.Generator().manual_seed(seed))
        assert out_image.shape == (3, 48, 48) and out_label.shape == (48, 48)
        valid = out_label != 255
        # 37 rows < 48: at least 11 rows of padding, labelled ignore, black in the image.
        assert (~valid).sum() >= 11 * 48
        assert torch.equal(out_image[0][valid].long(), out_label[valid] * 40)
        assert (out_image[:, ~valid] == 0).all()
        flipped += int(torch.equal(out_label[0, :5], label[0, -5:].flip(0)))
    assert 0 < flipped < 12


def test_random_scale_uses_nearest_for_labels() -> None:
    label = torch.zeros(40, 60, dtype=torch.int64)
    label[10:30, 20:50] = 3
    image = (label * 60).to(torch.uint8)[None].expand(3, -1, -1).contiguous()
    aug = TrainAugmentation(crop_size=None, scale_range=(0.5, 2.0), flip_prob=0.0, color_jitter=None)
    for seed in range(5):
        out_image, out_label = aug(image, label, torch.Generator().manual_seed(seed))
        assert set(out_label.unique().tolist()) <= {0, 3}
        h, w = out_label.shape
        assert abs(h / w - 40 / 60) < 0.05
        # Well inside the rectangle the bilinear image agrees with the nearest label.
        ys, xs = (out_label == 3).nonzero(as_tuple=True)
        centre = (ys.float().mean().round().long(), xs.float().mean().round().long())
        assert out_image[0][centre] == 180


def test_resize_pair_is_identity_at_same_size() -> None:
    image, label = _coded_pair()
    out_image, out_label = resize_pair(image, label, (37, 53))
    assert out_image is image and out_label is label


def test_crop_is_seeded_and_random() -> None:
    image, label = _coded_pair(64, 64)
    a = random_crop(image, label, (16, 16), sample_generator(0, 0, 3))
    b = random_crop(image, label, (16, 16), sample_generator(0, 0, 3))
    c = random_crop(image, label, (16, 16), sample_generator(0, 1, 3))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_hsv_round_trip_matches_colorsys() -> None:
    rgb = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(1))
    hsv = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (4, 7), (8, 10)]:
        expected = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
        assert np.allclose(hsv[:, y, x].tolist(), expected, atol=1e-6)
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, atol=1e-5, rtol=0)


def test_brightness_and_saturation_match_pillow() -> None:
    array = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    g = torch.Generator().manual_seed(0)
    jitter = ColorJitter(brightness=0.25, contrast=0, saturation=0, hue=0)
    torch.randperm(4, generator=g)
    factor = 0.75 + 0.5 * float(torch.rand((), generator=g))
    out = jitter(image, torch.Generator().manual_seed(0)).permute(1, 2, 0).numpy().astype(int)
    expected = np.asarray(ImageEnhance.Brightness(Image.fromarray(array)).enhance(factor)).astype(int)
    assert np.abs(out - expected).max() <= 1


def test_colour_jitter_changes_colours_but_not_shape() -> None:
    image, _ = _coded_pair()
    out = ColorJitter()(image, torch.Generator().manual_seed(3))
    assert out.shape == image.shape and out.dtype == torch.uint8 and not torch.equal(out, image)


def test_mismatched_sizes_raise() -> None:
    image, label = _coded_pair()
    with pytest.raises(ValueError, match="differ in size"):
        TrainAugmentation()(image, label[:-1], torch.Generator())


def test_instances_from_semantic_splits_things_by_connected_components() -> None:
    label = np.full((8, 10), 0, dtype=np.uint8)  # 0: road (stuff)
    label[1:3, 1:3] = 8  # car 1
    label[5:7, 6:9] = 8  # car 2
    label[3, 3] = 8  # touches car 1 diagonally: same instance with 8-connectivity
    label[0, 9] = 11  # ignored
    label[4:8, 0:2] = 5  # tree (stuff), split in space but one segment
    label[0, 5] = 5
    instances, mapping = instances_from_semantic(label, {8, 9}, ignore_index=11)
    assert instances[0, 9] == 11
    assert sorted(mapping.values()) == [0, 5, 8, 8]
    assert 11 not in mapping
    car_ids = [k for k, v in mapping.items() if v == 8]
    assert len({instances[1, 1], instances[3, 3]}) == 1 and instances[1, 1] in car_ids
    assert instances[5, 6] in car_ids and instances[5, 6] != instances[1, 1]
    tree = [k for k, v in mapping.items() if v == 5]
    assert instances[0, 5] == instances[7, 0] == tree[0]
    four, four_map = instances_from_semantic(label, {8}, ignore_index=11, connectivity=4)
    assert sum(v == 8 for v in four_map.values()) == 3


def test_instance_ids_skip_the_ignore_value() -> None:
    label = np.zeros((3, 40), dtype=np.int64)
    label[1, ::2] = 1  # 20 separate "thing" pixels
    instances, mapping = instances_from_semantic(label, {1}, ignore_index=5, connectivity=4)
    assert 5 not in mapping and len(mapping) == 21 and 5 not in np.unique(instances)


def test_instances_feed_the_mask2former_processor_encoding() -> None:
    processing = pytest.importorskip("omniseg.processing.mask2former")
    label = np.zeros((32, 32), dtype=np.int64)
    label[2:8, 2:8] = 3
    label[20:30, 20:30] = 3
    label[0, :] = 255
    instances, mapping = instances_from_semantic(label, {3}, ignore_index=255)
    masks, classes = processing.convert_segmentation_map_to_binary_masks(
        torch.from_numpy(instances), mapping, ignore_index=255
    )
    assert classes.tolist() == [0, 3, 3]
    assert masks.sum().item() == (label != 255).sum()


def test_dataset_maps_ignore_index_and_reduce_labels_to_training_labels(tmp_path) -> None:
    from omniseg.data.dataset import IGNORE, Sample, SegmentationDataset

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(image)
    label = tmp_path / "a_label.png"
    Image.fromarray(np.array([[0, 1, 2, 3, 11, 11]] * 4, dtype=np.uint8)).save(label)
    plain = SegmentationDataset([Sample(image, label)], num_labels=4, ignore_index=11)[0]["label"]
    assert plain[0].tolist() == [0, 1, 2, 3, IGNORE, IGNORE]
    reduced = SegmentationDataset([Sample(image, label)], num_labels=3, ignore_index=11, reduce_labels=True)[0]
    assert reduced["label"][0].tolist() == [IGNORE, 0, 1, 2, IGNORE, IGNORE]
    assert reduced["image"].shape == (3, 4, 6) and reduced["image"].dtype == torch.uint8


def test_photometric_augmentation_is_seeded_and_changes_the_image() -> None:
    from omniseg.data.augment import PhotometricAugmentation, gaussian_blur, jpeg_roundtrip

    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    every = PhotometricAugmentation(gamma_prob=1, blur_prob=1, noise_prob=1, jpeg_prob=1)
    first = every(image, torch.Generator().manual_seed(3))
    assert torch.equal(first, every(image, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, every(image, torch.Generator().manual_seed(4)))
    assert first.dtype == torch.uint8 and first.shape == image.shape
    assert (first.float() - image.float()).abs().mean() > 5
    none = PhotometricAugmentation(gamma_prob=0, blur_prob=0, noise_prob=0, jpeg_prob=0)
    assert torch.equal(none(image, torch.Generator().manual_seed(3)), image)
    flat = torch.full((3, 20, 20), 0.5)
    torch.testing.assert_close(gaussian_blur(flat, 1.2), flat)
    step = torch.zeros(3, 20, 20)
    step[:, :, 10:] = 1.0
    blurred = gaussian_blur(step, 1.0)
    assert 0.0 < blurred[0, 5, 9] < 0.5 < blurred[0, 5, 10] < 1.0
    assert (jpeg_roundtrip(image, 90).float() - image.float()).abs().mean() > 0


def test_copy_paste_replaces_pixels_of_the_chosen_classes_only() -> None:
    from omniseg.data.augment import CopyPaste

    image, label = _coded_pair()
    donor_image, donor_label = _coded_pair()
    donor_label = donor_label.flip(0)
    donor_image = donor_image.flip(1) + 1  # differs from the sample everywhere
    pasted_image, pasted_label = CopyPaste(class_ids=(2, 4))(image, label, donor_image, donor_label)
    chosen = (donor_label == 2) | (donor_label == 4)
    assert chosen.any() and (~chosen).any()
    assert torch.equal(pasted_label[chosen], donor_label[chosen])
    assert torch.equal(pasted_image[:, chosen], donor_image[:, chosen])
    assert torch.equal(pasted_label[~chosen], label[~chosen])
    assert torch.equal(pasted_image[:, ~chosen], image[:, ~chosen])
    # A donor of another size is brought to the sample's size first.
    big_image, big_label = resize_pair(donor_image, donor_label, (74, 106))
    resized_image, resized_label = CopyPaste(class_ids=(2, 4))(image, label, big_image, big_label)
    assert resized_image.shape == image.shape and resized_label.shape == label.shape


def test_dataset_pastes_from_another_seeded_donor_and_recounts_instances(tmp_path) -> None:
    from omniseg.data.augment import CopyPaste
    from omniseg.data.dataset import Sample, SegmentationDataset

    samples = []
    for name, with_person in (("empty", False), ("person", True), ("other", False)):
        pixels = np.zeros((8, 12, 3), dtype=np.uint8)
        classes = np.zeros((8, 12), dtype=np.uint8)
        if with_person:  # one person, class 1, in a block of value 200
            pixels[2:6, 3:5] = 200
            classes[2:6, 3:5] = 1
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        Image.fromarray(classes).save(tmp_path / f"{name}_label.png")
        samples.append(Sample(tmp_path / f"{name}.png", tmp_path / f"{name}_label.png"))
    still = TrainAugmentation(crop_size=None, scale_range=None, flip_prob=0.0, color_jitter=None)

    def dataset(prob: float, seed: int = 0) -> SegmentationDataset:
        return SegmentationDataset(samples, num_labels=2, augment=still, seed=seed, thing_ids=(1,),
                                   copy_paste=CopyPaste(class_ids=(1,), prob=prob))

    assert dataset(0.0)[0]["label"].sum() == 0
    # Sample 0's donor is sample 1 or 2; over a few seeds both are drawn, never sample 0 itself.
    items = [dataset(1.0, seed)[0] for seed in range(8)]
    received = [item for item in items if item["label"].any()]
    assert 0 < len(received) < len(items)
    for item in received:
        assert item["label"][2:6, 3:5].eq(1).all() and item["label"].sum() == 8
        assert item["image"][:, 2:6, 3:5].eq(200).all()
        assert item["instances"][2:6, 3:5].unique().numel() == 1 and item["instance_id_to_semantic_id"]
    # With one other sample, that one is always the donor.
    pair = SegmentationDataset(samples[:2], num_labels=2, augment=still, copy_paste=CopyPaste(class_ids=(1,), prob=1.0))
    for seed in range(4):
        pair.seed = seed
        assert pair[0]["label"].sum() == 8
    # Seeded: the same (seed, epoch, index) draws the same donor.
    assert torch.equal(dataset(1.0, 3)[0]["label"], dataset(1.0, 3)[0]["label"])
    # The person's own frame keeps its person whatever it receives.
    assert dataset(1.0)[1]["label"][2:6, 3:5].eq(1).all()
