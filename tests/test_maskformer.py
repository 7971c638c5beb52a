"""omniseg's MaskFormer gives the reference implementation's answers: logits, processor
outputs, every post-processing path, the training loss, the pipeline on a real photo, and
checkpoints move both ways in the hub layout; ``omniseg train`` fine-tunes it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from parity import (
    TOLERANCE,
    assert_pipeline_results_match,
    assert_post_processed_match,
    build_reference_dirs,
    camvid_id2label,
    relative_error,
    small_camvid_val,
    two_images,
)
from reference_maskformer import TINY_MASKFORMER_CONFIGS, build_distinct_queries_maskformer, build_reference_maskformer
from test_mask2former_processing import structured_outputs

import omniseg
from omniseg.cli.main import main as omniseg_main
from omniseg.errors import UnsupportedModelError
from omniseg.models.auto import load_model, load_processor
from omniseg.models.maskformer import MaskFormerForInstanceSegmentation
from omniseg.processing.maskformer import MaskFormerImageProcessor

transformers = pytest.importorskip("transformers")
from transformers import MaskFormerForInstanceSegmentation as ReferenceMaskFormer  # noqa: E402
from transformers.models.maskformer.image_processing_pil_maskformer import (  # noqa: E402
    MaskFormerImageProcessorPil,
)

pytestmark = pytest.mark.usefixtures("single_thread_per_module")


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("maskformer")
    return build_reference_dirs(root, build_reference_maskformer, TINY_MASKFORMER_CONFIGS)


def reference_processor(directory: Path) -> MaskFormerImageProcessorPil:
    return MaskFormerImageProcessorPil.from_pretrained(directory)


def reference_inputs(directory: Path) -> dict[str, torch.Tensor]:
    inputs = reference_processor(directory)(two_images(), return_tensors="pt")
    assert not inputs["pixel_mask"].bool().all(), "the batch should contain padding"
    return {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"]}


def label_maps(images: list[Image.Image], num_labels: int) -> list[np.ndarray]:
    """Blocky label maps with every class and some ignored (255) pixels."""
    rng = np.random.default_rng(1)
    maps = []
    for image in images:
        coarse = rng.integers(0, num_labels, (image.height // 16 + 1, image.width // 16 + 1), dtype=np.uint8)
        full = np.kron(coarse, np.ones((16, 16), dtype=np.uint8))[: image.height, : image.width]
        full[:5] = 255
        maps.append(full)
    return maps


@pytest.mark.parametrize("name", list(TINY_MASKFORMER_CONFIGS))
def test_logits_match_reference(reference_dirs, name):
    directory = reference_dirs[name]
    config = TINY_MASKFORMER_CONFIGS[name]
    ours = load_model(directory)
    assert isinstance(ours, MaskFormerForInstanceSegmentation) and not ours.training
    reference = ReferenceMaskFormer.from_pretrained(directory).eval()
    inputs = reference_inputs(directory)
    with torch.inference_mode():
        got = ours(**inputs, output_auxiliary_logits=True)
        # With use_auxiliary_loss the reference needs output_hidden_states (else it fails).
        expected = reference(**inputs, output_auxiliary_logits=True, output_hidden_states=True)
    batch, _, height, width = inputs["pixel_values"].shape
    assert got.class_queries_logits.shape == (batch, config["num_queries"], config["num_labels"] + 1)
    assert got.masks_queries_logits.shape == (batch, config["num_queries"], height // 4, width // 4)
    assert got.masks_queries_logits.std() > 0.1  # perturbed weights: far from constant outputs
    errors = {
        "class": relative_error(got.class_queries_logits, expected.class_queries_logits),
        "masks": relative_error(got.masks_queries_logits, expected.masks_queries_logits),
    }
    if config.get("use_auxiliary_loss"):
        # The decoder's input and every layer's output but the last, as the reference gives them.
        assert len(got.auxiliary_logits) == len(expected.auxiliary_logits) == config["decoder_layers"]
        errors["auxiliary"] = max(
            relative_error(a[key], b[key])
            for a, b in zip(got.auxiliary_logits, expected.auxiliary_logits)
            for key in ("class_queries_logits", "masks_queries_logits")
        )
    else:
        assert got.auxiliary_logits is None
    assert max(errors.values()) < TOLERANCE, errors


def test_decoder_normalising_between_layers_matches_reference(tmp_path):
    # DETR's auxiliary_loss setting feeds every decoder layer normalised states.
    directory = build_reference_maskformer(tmp_path / "normalised", decoder_auxiliary_loss=True, decoder_layers=3, seed=5)
    ours = load_model(directory)
    assert ours.config.decoder_config.auxiliary_loss
    reference = ReferenceMaskFormer.from_pretrained(directory).eval()
    inputs = reference_inputs(directory)
    with torch.inference_mode():
        got, expected = ours(**inputs), reference(**inputs)
    assert relative_error(got.class_queries_logits, expected.class_queries_logits) < TOLERANCE
    assert relative_error(got.masks_queries_logits, expected.masks_queries_logits) < TOLERANCE


@pytest.mark.parametrize("name", list(TINY_MASKFORMER_CONFIGS))
def test_processor_outputs_identical(reference_dirs, name, small_street_photos):
    directory = reference_dirs[name]
    ours, reference = load_processor(directory), reference_processor(directory)
    assert isinstance(ours, MaskFormerImageProcessor)
    maps = label_maps(small_street_photos, TINY_MASKFORMER_CONFIGS[name]["num_labels"])
    got = ours(small_street_photos, segmentation_maps=maps)
    expected = reference(small_street_photos, segmentation_maps=maps, return_tensors="pt")
    assert torch.equal(got["pixel_mask"], expected["pixel_mask"])
    assert got["pixel_values"].shape == expected["pixel_values"].shape
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    for a, b in zip(got["mask_labels"], expected["mask_labels"]):
        assert torch.equal(a, b)
    for a, b in zip(got["class_labels"], expected["class_labels"]):
        assert torch.equal(a, b)


def _post_processing_cases():
    yield "semantic", {}
    for extra in ({}, {"return_coco_annotation": True}, {"return_binary_maps": True}):
        yield "instance", {"threshold": 0.0, **extra}
    yield "instance", {"threshold": 0.5}
    yield "panoptic", {"threshold": 0.0, "overlap_mask_area_threshold": 0.0}
    yield "panoptic", {"threshold": 0.5, "mask_threshold": 0.3, "overlap_mask_area_threshold": 0.5,
                       "label_ids_to_fuse": {0, 2, 4}}


@pytest.mark.parametrize("target_sizes", [None, [(61, 83), (133, 121)]])
def test_post_processing_matches_reference(reference_dirs, target_sizes):
    """Every post-processing path on real model outputs (both tiny models) and on structured
    outputs with many clear segments, at the model's mask size and resized."""
    reference = reference_processor(reference_dirs["small"])
    ours = load_processor(reference_dirs["small"])
    outputs = []
    for directory in reference_dirs.values():
        with torch.inference_mode():
            model = ReferenceMaskFormer.from_pretrained(directory).eval()
            outputs.append(model(**reference_inputs(directory), output_hidden_states=True))
    outputs += [structured_outputs(seed) for seed in range(2)]
    segments = 0
    for output in outputs:
        for task, kwargs in _post_processing_cases():
            method = f"post_process_{task}_segmentation"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = getattr(reference, method)(output, target_sizes=target_sizes, **kwargs)
            got = getattr(ours, method)(output, target_sizes=target_sizes, **kwargs)
            segments += assert_post_processed_match(task, got, expected)
    assert segments > 50  # real segments were compared, not empty lists


def test_saved_by_omniseg_loads_in_reference(reference_dirs, tmp_path):
    source = reference_dirs["aux"]
    ours = load_model(source)
    ours.save_pretrained(tmp_path)
    load_processor(source).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "maskformer" and saved["architectures"] == ["MaskFormerForInstanceSegmentation"]
    assert saved["decoder_config"]["model_type"] == "detr" and saved["use_auxiliary_loss"] is True

    reference, info = ReferenceMaskFormer.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = reference_inputs(tmp_path)
    with torch.inference_mode():
        got, expected = ours(**inputs), reference.eval()(**inputs, output_hidden_states=True)
    assert relative_error(got.masks_queries_logits, expected.masks_queries_logits) < TOLERANCE
    assert relative_error(got.class_queries_logits, expected.class_queries_logits) < TOLERANCE
    # And omniseg reloads its own checkpoint to the same numbers.
    again = load_model(tmp_path)
    with torch.inference_mode():
        assert torch.equal(again(**inputs).masks_queries_logits, got.masks_queries_logits)


@pytest.mark.parametrize("name", list(TINY_MASKFORMER_CONFIGS))
def test_training_loss_equals_reference(reference_dirs, name):
    directory = reference_dirs[name]
    images = two_images()
    batch = reference_processor(directory)(
        images, segmentation_maps=label_maps(images, TINY_MASKFORMER_CONFIGS[name]["num_labels"]), return_tensors="pt"
    )
    targets = {"mask_labels": batch["mask_labels"], "class_labels": batch["class_labels"]}
    ours = load_model(directory)
    reference = ReferenceMaskFormer.from_pretrained(directory).eval()
    got = ours(batch["pixel_values"], **targets).loss
    expected = reference(pixel_values=batch["pixel_values"], output_hidden_states=True, **targets).loss
    assert got.item() > 0.1
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item(), (got.item(), expected.item())
    got.backward()  # the loss reaches the backbone
    assert ours.model.pixel_level_module.encoder.model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("costs", [(1.0, 20.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)])
def test_matcher_assigns_as_the_reference(costs):
    """Matching on its own, with weights under which every cost term decides some pairs."""
    from transformers.models.maskformer.modeling_maskformer import MaskFormerHungarianMatcher

    from omniseg.models.maskformer.criterion import FullMaskHungarianMatcher

    cost_class, cost_mask, cost_dice = costs
    ours = FullMaskHungarianMatcher(cost_class=cost_class, cost_mask=cost_mask, cost_dice=cost_dice)
    reference = MaskFormerHungarianMatcher(cost_class=cost_class, cost_mask=cost_mask, cost_dice=cost_dice)
    g = torch.Generator().manual_seed(int(sum(costs)))
    class_logits = torch.randn(2, 12, 6, generator=g) * 3
    mask_logits = torch.randn(2, 12, 12, 16, generator=g) * 2
    mask_labels = [(torch.rand(n, 48, 64, generator=g) > 0.6).float() for n in (5, 9)]
    class_labels = [torch.randint(0, 5, (n,), generator=g) for n in (5, 9)]
    got = ours(class_logits, mask_logits, mask_labels, class_labels)
    expected = reference(mask_logits, class_logits, mask_labels, class_labels)
    for (a_rows, a_cols), (b_rows, b_cols) in zip(got, expected):
        assert torch.equal(a_rows, b_rows) and torch.equal(a_cols, b_cols)


def test_unsupported_backbones_and_types_are_clear_errors(reference_dirs, tmp_path):
    config = json.loads((reference_dirs["small"] / "config.json").read_text())
    config["backbone_config"] = {"model_type": "resnet", "depths": [1, 1, 1, 1]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"config.json.*MaskFormer backbone 'resnet' is not supported"):
        MaskFormerForInstanceSegmentation.config_class.from_json_file(tmp_path / "config.json")
    config["model_type"] = "maskformer-v9"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"supported: .*maskformer"):
        load_model(tmp_path)


# --------------------------------------------------------------------------- pipeline, CLI


@pytest.fixture(scope="module")
def photo_model_dir(camvid_dir, tmp_path_factory) -> Path:
    id2label = camvid_id2label(camvid_dir)
    # Exact mask equality needs pixels where two queries' score x probability do not nearly
    # tie: the implementations' logits differ by ~1e-6 relative, which can flip such a pixel
    # (seed 0 has one of 172,800 in its panoptic map). Seed 4 has none on this photo.
    return build_distinct_queries_maskformer(tmp_path_factory.mktemp("photo-maskformer"), id2label, seed=4)


@pytest.mark.parametrize(
    "subtask, kwargs, at_least",
    [
        ("panoptic", dict(threshold=0.0), 1),
        ("panoptic", dict(threshold=0.3, overlap_mask_area_threshold=0.2), 2),
        ("instance", dict(threshold=0.0), 10),
        ("instance", dict(threshold=0.3), 10),
        ("semantic", dict(), 2),
    ],
)
def test_pipeline_matches_reference_pipeline_on_a_real_photo(photo_model_dir, street_photo, subtask, kwargs, at_least):
    ours = omniseg.pipeline("image-segmentation", model=photo_model_dir)
    reference = transformers.pipeline("image-segmentation", model=str(photo_model_dir), device="cpu")
    expected = reference(street_photo, subtask=subtask, **kwargs)
    got = ours(street_photo, subtask=subtask, **kwargs)
    assert len(expected) >= at_least  # real segments, not two empty lists
    assert_pipeline_results_match(got, expected, street_photo.size, score_tolerance=1e-4)


def test_train_cli_fine_tunes_maskformer(camvid_dir, reference_dirs, tmp_path):
    data = tmp_path / "data"
    for split, count in (("train", 4), ("val", 1)):
        for kind in ("images", "labels"):
            (data / kind / split).mkdir(parents=True)
        for image in sorted((camvid_dir / "images" / split).glob("*.png"))[:count]:
            (data / "images" / split / image.name).symlink_to(image)
            (data / "labels" / split / image.name).symlink_to(camvid_dir / "labels" / split / image.name)
    (data / "id2label.json").write_text((camvid_dir / "id2label.json").read_text())
    out = tmp_path / "run"
    status = omniseg_main([
        "train", "--model", str(reference_dirs["small"]), "--data", str(data), "--out", str(out),
        "--max-steps", "8", "--batch-size", "2", "--lr", "3e-3", "--clip-grad", "0", "--backbone-lr-mult", "1",
        "--no-color-jitter", "--eval-every", "8", "--crop-size", "64", "--scale-range", "0.2", "0.2",
        "--no-progress", "--log-every", "1", "--ignore-index", "11",
    ])
    assert status == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert any("eval_mean_iou" in r for r in log)
    # The fine-tuned model (new 11-class head) loads in omniseg and in the reference alike.
    ours = omniseg.load_model(out)
    reference = ReferenceMaskFormer.from_pretrained(out).eval()
    assert ours.config.id2label[8] == "car" == reference.config.id2label[8]
    inputs = omniseg.load_processor(out)(Image.open(sorted((data / "images" / "val").iterdir())[0]).convert("RGB"))
    with torch.inference_mode():
        got, expected = ours(inputs["pixel_values"]), reference(pixel_values=inputs["pixel_values"])
    assert got.class_queries_logits.shape[-1] == 12
    assert relative_error(got.masks_queries_logits, expected.masks_queries_logits) < TOLERANCE


def test_segment_and_evaluate_cli_run_maskformer(photo_model_dir, camvid_dir, tmp_path):
    data = tmp_path / "data"
    frames = small_camvid_val(camvid_dir, data, count=2, size=(120, 90))

    out = tmp_path / "segments"
    assert omniseg_main(["segment", str(data / "images" / "val"), "--out", str(out), "--model", str(photo_model_dir),
                         "--task", "panoptic", "--threshold", "0.3"]) == 0
    for frame in frames:
        result = json.loads((out / f"{frame.stem}.json").read_text())
        assert result["segments"], result
        assert (out / f"{frame.stem}_labels.png").is_file()

    report = tmp_path / "report"
    assert omniseg_main(["evaluate", "--model", str(photo_model_dir), "--data", str(data), "--out", str(report),
                         "--ignore-index", "11", "--examples", "0"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["images"] == 2 and 0.0 <= metrics["metrics"]["mean_iou"] <= 1.0
