"""SegFormer parity with the reference implementation (transformers), both checkpoint directions.

Tiny random reference models are saved with the reference's ``save_pretrained`` (weights,
config and image processor) and loaded through ``omniseg.models.auto``; every parameter and
the batch-norm statistics get seeded noise so that the comparisons see every weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from parity import relative_error

transformers = pytest.importorskip("transformers")

from omniseg.errors import CheckpointError  # noqa: E402
from omniseg.models.auto import load_model, load_processor  # noqa: E402
from omniseg.models.segformer import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from omniseg.processing.segformer import SegformerImageProcessor  # noqa: E402

# Two shapes that differ in depths, widths, heads, reduction ratios, stage count, label count,
# MLP ratios, activation and processor size (square and non-square).
TINY_SEGFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "four_stage": dict(
        model=dict(
            depths=[1, 2, 1, 1],
            hidden_sizes=[8, 16, 24, 32],
            num_attention_heads=[1, 2, 3, 4],
            sr_ratios=[8, 4, 2, 1],
            decoder_hidden_size=16,
            num_labels=5,
        ),
        processor=dict(size={"height": 64, "width": 64}),
    ),
    "three_stage": dict(
        model=dict(
            num_encoder_blocks=3,
            depths=[2, 1, 2],
            hidden_sizes=[12, 24, 36],
            num_attention_heads=[2, 2, 3],
            sr_ratios=[4, 2, 1],
            patch_sizes=[7, 3, 3],
            strides=[4, 2, 2],
            mlp_ratios=[2, 4, 3],
            decoder_hidden_size=20,
            hidden_act="gelu_new",
            num_labels=12,
            semantic_loss_ignore_index=11,
        ),
        processor=dict(size={"height": 96, "width": 128}, do_reduce_labels=True),
    ),
}


def build_reference_segformer(
    directory: Path,
    *,
    model: dict[str, Any],
    processor: dict[str, Any] | None = None,
    seed: int = 2,
    noise: float = 0.3,
) -> Path:
    """Save a seeded, perturbed reference SegFormer (and its image processor) in ``directory``."""
    torch.manual_seed(seed)
    reference = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(**model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
        norm = reference.decode_head.batch_norm
        norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=generator))
        norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) + 0.5)
    reference.save_pretrained(directory)
    reference_processor(**(processor or {})).save_pretrained(directory)
    return directory


def reference_processor(**kwargs: Any):
    """The reference's default ``SegformerImageProcessor`` (the PIL backend without torchvision)."""
    try:
        return transformers.SegformerImageProcessorPil(**kwargs)
    except AttributeError:  # older transformers: one class
        return transformers.SegformerImageProcessor(**kwargs)


def load_reference(directory: Path):
    model = transformers.SegformerForSemanticSegmentation.from_pretrained(directory).eval()
    return model, transformers.AutoImageProcessor.from_pretrained(directory)


@pytest.fixture(scope="module", params=sorted(TINY_SEGFORMER_CONFIGS))
def checkpoint(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    directory = tmp_path_factory.mktemp(f"segformer_{name}")
    return name, build_reference_segformer(directory, **TINY_SEGFORMER_CONFIGS[name])


@pytest.fixture(scope="module")
def small_street_labels(camvid_dir: Path) -> list[Image.Image]:
    """The CamVid label maps of the two ``small_street_photos``, cropped the same way."""
    paths = sorted((camvid_dir / "labels" / "val").glob("*.png"))[:2]
    first = Image.open(paths[0]).crop((17, 9, 17 + 147, 9 + 101))
    second = Image.open(paths[1]).crop((40, 30, 40 + 121, 30 + 133))
    return [first, second]


def test_logits_preprocessing_and_postprocessing_match(checkpoint, small_street_photos):
    _, directory = checkpoint
    reference, reference_proc = load_reference(directory)
    model, processor = load_model(directory), load_processor(directory)
    assert isinstance(model, SegformerForSemanticSegmentation)
    assert isinstance(processor, SegformerImageProcessor)
    assert not model.training

    expected_inputs = reference_proc(small_street_photos, return_tensors="pt")
    inputs = processor(small_street_photos, return_tensors="pt")
    assert inputs["pixel_values"].shape == expected_inputs["pixel_values"].shape
    assert inputs["pixel_values"].dtype == torch.float32
    # The reference's default processor resizes with PIL, as omniseg does for uint8 images.
    assert (inputs["pixel_values"] - expected_inputs["pixel_values"]).abs().max() < 1e-5

    with torch.no_grad():
        expected = reference(pixel_values=expected_inputs["pixel_values"])
        same_input = model(expected_inputs["pixel_values"])
        outputs = model(**inputs)
    height, width = expected_inputs["pixel_values"].shape[-2:]
    assert same_input.logits.shape == (2, model.config.num_labels, height // 4, width // 4)
    assert relative_error(same_input.logits, expected.logits) < 1e-4

    sizes = [(image.height, image.width) for image in small_street_photos]
    expected_maps = reference_proc.post_process_semantic_segmentation(expected, target_sizes=sizes)
    # Same post-processing of the same logits, of our logits, and fully end to end.
    for logits_source in (expected, same_input, outputs):
        maps = processor.post_process_semantic_segmentation(logits_source, target_sizes=sizes)
        for label_map, expected_map, size in zip(maps, expected_maps, sizes):
            assert label_map.shape == size and label_map.dtype == torch.int64
            assert torch.equal(label_map, expected_map)
    unsized = processor.post_process_semantic_segmentation(same_input)
    expected_unsized = reference_proc.post_process_semantic_segmentation(expected)
    assert all(torch.equal(a, b) for a, b in zip(unsized, expected_unsized))


def test_labels_and_loss_match(checkpoint, small_street_photos, small_street_labels):
    _, directory = checkpoint
    reference, reference_proc = load_reference(directory)
    model, processor = load_model(directory), load_processor(directory)

    expected_inputs = reference_proc(small_street_photos, small_street_labels, return_tensors="pt")
    inputs = processor(small_street_photos, segmentation_maps=small_street_labels)
    assert inputs["labels"].dtype == torch.int64
    assert torch.equal(inputs["labels"], expected_inputs["labels"])
    if processor.do_reduce_labels:
        plain = processor(small_street_photos, small_street_labels, do_reduce_labels=False)["labels"]
        assert torch.equal(inputs["labels"], torch.where(plain == 0, 255, plain - 1))

    with torch.no_grad():
        expected = reference(**expected_inputs)
        ours = model(**expected_inputs)
    assert torch.isfinite(ours.loss)
    assert ours.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)


def test_single_label_binary_loss_matches(tmp_path):
    config = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 16], num_attention_heads=[1, 1, 2, 2],
                  decoder_hidden_size=8, num_labels=1)
    directory = build_reference_segformer(tmp_path, model=config, processor={"size": {"height": 32, "width": 32}})
    reference, _ = load_reference(directory)
    model = load_model(directory)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 48, generator=generator)
    labels = torch.randint(0, 2, (2, 40, 56), generator=generator)
    labels[:, :4] = 255
    with torch.no_grad():
        expected = reference(pixel_values=pixels, labels=labels)
        ours = model(pixels, labels=labels)
    assert relative_error(ours.logits, expected.logits) < 1e-4
    assert ours.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)


def test_training_mode_matches_without_randomness(tmp_path):
    """Batch statistics in the decode head, gradients and running-stat updates as the reference."""
    config = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 16, 24], num_attention_heads=[1, 2, 2, 3],
                  decoder_hidden_size=16, num_labels=4, drop_path_rate=0.0, classifier_dropout_prob=0.0)
    directory = build_reference_segformer(tmp_path, model=config)
    reference, _ = load_reference(directory)
    model = load_model(directory)
    reference.train()
    model.train()
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 45, 61, generator=generator)
    labels = torch.randint(0, 4, (2, 45, 61), generator=generator)
    expected = reference(pixel_values=pixels, labels=labels)
    ours = model(pixels, labels=labels)
    assert relative_error(ours.logits, expected.logits) < 1e-4
    assert ours.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    expected.loss.backward()
    ours.loss.backward()
    for ours_param, ref_param in (
        (model.decode_head.linear_fuse.weight, reference.decode_head.linear_fuse.weight),
        (model.decode_head.linear_c[2].proj.weight, reference.decode_head.linear_projections[2].proj.weight),
        (model.segformer.encoder.patch_embeddings[0].proj.weight, reference.segformer.stages[0].patch_embeddings.proj.weight),
    ):
        assert relative_error(ours_param.grad, ref_param.grad) < 1e-3
    ours_bn, ref_bn = model.decode_head.batch_norm, reference.decode_head.batch_norm
    assert torch.allclose(ours_bn.running_mean, ref_bn.running_mean, atol=1e-5)
    assert torch.allclose(ours_bn.running_var, ref_bn.running_var, rtol=1e-4)


def test_stochastic_depth_only_in_training():
    config = SegformerConfig(depths=[2, 1, 1, 1], hidden_sizes=[8, 8, 16, 16], num_attention_heads=[1, 1, 2, 2],
                             decoder_hidden_size=8, drop_path_rate=0.5, classifier_dropout_prob=0.0)
    model = SegformerForSemanticSegmentation(config)
    rates = [block.drop_path for stage in model.segformer.encoder.block for block in stage]
    assert rates == pytest.approx([0.5 * i / 4 for i in range(5)])
    pixels = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, model(pixels).logits)
        model.train()
        torch.manual_seed(0)
        first = model(pixels).logits
        torch.manual_seed(1)
        assert not torch.equal(first, model(pixels).logits)


def test_omniseg_checkpoint_loads_in_reference(tmp_path, street_photo):
    config = SegformerConfig(
        id2label={0: "road", 1: "sky", 2: "car"},
        depths=[1, 1, 2, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 2, 2, 4],
        decoder_hidden_size=12,
    )
    torch.manual_seed(3)
    model = SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        model.decode_head.batch_norm.running_mean.normal_()
    processor = SegformerImageProcessor(size={"height": 64, "width": 96})
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    reference, reference_proc = load_reference(tmp_path)
    assert reference.config.id2label == {0: "road", 1: "sky", 2: "car"}
    assert reference.config.depths == [1, 1, 2, 1]
    expected_inputs = reference_proc(street_photo, return_tensors="pt")
    assert expected_inputs["pixel_values"].shape == (1, 3, 64, 96)
    with torch.no_grad():
        expected = reference(pixel_values=expected_inputs["pixel_values"]).logits
        ours = model(expected_inputs["pixel_values"]).logits
    assert relative_error(ours, expected) < 1e-5

    # And omniseg reads back what it wrote.
    reloaded = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(expected_inputs["pixel_values"]).logits, ours)
    assert load_processor(tmp_path).to_dict() == processor.to_dict()


def test_config_round_trip(checkpoint, tmp_path):
    _, directory = checkpoint
    written = json.loads((directory / "config.json").read_text())
    config = SegformerConfig.from_json_file(directory / "config.json")
    assert config.num_labels == len(written["id2label"])
    config.save(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())
    for key, value in written.items():
        assert again[key] == value, key


def test_strict_loading_names_the_broken_tensors(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, directory = checkpoint
    state = load_file(str(directory / "model.safetensors"))
    del state["decode_head.batch_norm.running_var"]
    state["decode_head.classifier.weight"] = state["decode_head.classifier.weight"][:1]
    state["segformer.encoder.block.0.0.attention.self.query.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "decode_head.batch_norm.running_var" in message
    assert "decode_head.classifier.weight" in message
    assert "attention.self.query.extra" in message


def test_processor_inputs_and_legacy_keys(tmp_path, street_photo):
    # Older hub checkpoints write an int size and the legacy "reduce_labels" key; the
    # reference reads the int as a square and ignores "reduce_labels".
    legacy = {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "SegformerFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "reduce_labels": True,
        "resample": 2,
        "size": 48,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    processor = SegformerImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"height": 48, "width": 48}
    assert not processor.do_reduce_labels
    gray = street_photo.convert("L")
    array = np.array(street_photo)
    batch = processor([street_photo, array, gray, torch.from_numpy(array).permute(2, 0, 1)])
    pixels = batch["pixel_values"]
    assert pixels.shape == (4, 3, 48, 48)
    assert torch.allclose(pixels[0], pixels[1]) and torch.allclose(pixels[0], pixels[3])
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    gray_values = pixels[2] * std + mean
    assert torch.allclose(gray_values[0], gray_values[1], atol=1e-6)
    assert torch.allclose(gray_values[0], gray_values[2], atol=1e-6)
    labels = processor(street_photo, segmentation_maps=np.array([[0, 1], [2, 255]], dtype=np.uint8),
                       do_reduce_labels=True, size={"height": 2, "width": 2})["labels"]
    assert labels.tolist() == [[[255, 0], [1, 255]]]
    with pytest.raises(ValueError, match="segmentation maps"):
        processor([street_photo], segmentation_maps=[gray, gray])
