"""omniseg's DETR panoptic gives the reference implementation's answers: logits, boxes and
masks, processor outputs, every post-processing path, the pipeline on a real photo; checkpoints
move both ways, in the reference's ResNet layout and in timm's; training is refused clearly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
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
from reference_detr import TINY_DETR_CONFIGS, build_photo_detr, build_reference_detr, reference_detr_config
from test_mask2former_processing import structured_outputs

import omniseg
from omniseg.cli.main import main as omniseg_main
from omniseg.errors import UnsupportedModelError
from omniseg.models.auto import load_model, load_processor
from omniseg.models.checkpoint import read_state_dict, save_state_dict
from omniseg.models.detr import DetrForSegmentation
from omniseg.processing.detr import DetrImageProcessor

transformers = pytest.importorskip("transformers")
from transformers import DetrForSegmentation as ReferenceDetr  # noqa: E402
from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil  # noqa: E402

OUTPUTS = ("logits", "pred_boxes", "pred_masks")
pytestmark = pytest.mark.usefixtures("single_thread_per_module")


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory) -> dict[str, Path]:
    return build_reference_dirs(tmp_path_factory.mktemp("detr"), build_reference_detr, TINY_DETR_CONFIGS)


def reference_inputs(directory: Path) -> dict[str, torch.Tensor]:
    inputs = DetrImageProcessorPil.from_pretrained(directory)(two_images(), return_tensors="pt")
    assert not inputs["pixel_mask"].bool().all(), "the batch should contain padding"
    return {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"]}


def assert_outputs_match(got, expected) -> None:
    errors = {name: relative_error(getattr(got, name), getattr(expected, name)) for name in OUTPUTS}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("name", list(TINY_DETR_CONFIGS))
def test_outputs_match_reference(reference_dirs, name):
    directory = reference_dirs[name]
    config = TINY_DETR_CONFIGS[name]
    ours = load_model(directory)
    assert isinstance(ours, DetrForSegmentation) and not ours.training
    reference = ReferenceDetr.from_pretrained(directory).eval()
    inputs = reference_inputs(directory)
    with torch.inference_mode():
        got, expected = ours(**inputs), reference(**inputs)
        batch, _, height, width = inputs["pixel_values"].shape
        assert got.logits.shape == (batch, config["num_queries"], config["num_labels"] + 1)
        assert got.pred_masks.shape == expected.pred_masks.shape
        assert got.pred_masks.std() > 0.1  # perturbed weights: far from constant outputs
        assert_outputs_match(got, expected)
        # Masks decoded for chosen queries only are the same numbers as the full forward's.
        fresh = ours(**inputs)
        queries = torch.tensor([config["num_queries"] - 1, 0, 2])
        assert relative_error(fresh.masks_of(1, queries), expected.pred_masks[1, queries]) < TOLERANCE


def test_processor_outputs_identical(reference_dirs, small_street_photos, street_photo, tmp_path):
    for directory in reference_dirs.values():
        ours, reference = load_processor(directory), DetrImageProcessorPil.from_pretrained(directory)
        assert isinstance(ours, DetrImageProcessor)
        for images in (small_street_photos, [street_photo], two_images()):
            got, expected = ours(images), reference(images, return_tensors="pt")
            assert set(got) == set(expected) == {"pixel_values", "pixel_mask"}
            for key in got:
                assert got[key].shape == expected[key].shape and torch.equal(got[key], expected[key]), key
    # The hub's legacy settings (size 800 as an int, max_size default 1333) read as the
    # reference reads them, and what omniseg writes loads there with the same settings.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 800}))
    assert DetrImageProcessor.from_pretrained(tmp_path).size == {"shortest_edge": 800, "longest_edge": 1333}
    assert DetrImageProcessorPil.from_pretrained(tmp_path).size.longest_edge == 1333
    legacy = {"size": 800, "max_size": 1000, "format": "coco_panoptic", "do_normalize": True}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    ours = DetrImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"shortest_edge": 800, "longest_edge": 1000}
    ours.save_pretrained(tmp_path / "saved")
    reference = DetrImageProcessorPil.from_pretrained(tmp_path / "saved")
    assert (reference.size.shortest_edge, reference.size.longest_edge, reference.format) == (800, 1000, "coco_panoptic")
    got, expected = ours([street_photo]), reference([street_photo], return_tensors="pt")
    assert got["pixel_values"].shape == (1, 3, 750, 1000)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])


def _post_processing_cases():
    yield "semantic", {}
    for threshold in (0.0, 0.5):
        yield "instance", {"threshold": threshold}
        yield "instance", {"threshold": threshold, "return_coco_annotation": True}
    yield "instance", {"threshold": 0.99, "return_coco_annotation": True}  # nothing kept: the -1 map
    yield "panoptic", {"threshold": 0.0, "overlap_mask_area_threshold": 0.0}
    yield "panoptic", {"threshold": 0.3, "mask_threshold": 0.3, "overlap_mask_area_threshold": 0.5,
                       "label_ids_to_fuse": {0, 2, 4}}


@pytest.mark.parametrize("target_sizes", [None, [(61, 83), (133, 121)]])
def test_post_processing_matches_reference(reference_dirs, target_sizes):
    """Every post-processing path of the reference's DETR processor, on omniseg's outputs
    (masks decoded on demand) against the reference's, and on structured outputs with many
    clear segments."""
    reference = DetrImageProcessorPil.from_pretrained(reference_dirs["small"])
    ours = load_processor(reference_dirs["small"])
    pairs = []
    for directory in reference_dirs.values():
        inputs = reference_inputs(directory)
        model, reference_model = load_model(directory), ReferenceDetr.from_pretrained(directory).eval()
        pairs.append((lambda m=model, i=inputs: m(**i), reference_model(**inputs)))
    for seed in range(2):
        structured = structured_outputs(seed)
        outputs = SimpleNamespace(logits=structured.class_queries_logits, pred_masks=structured.masks_queries_logits)
        pairs.append((lambda o=outputs: o, outputs))
    segments = 0
    for run_ours, expected_outputs in pairs:
        for task, kwargs in _post_processing_cases():
            method = f"post_process_{task}_segmentation"
            with torch.inference_mode():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    expected = getattr(reference, method)(expected_outputs, target_sizes=target_sizes, **kwargs)
                got = getattr(ours, method)(run_ours(), target_sizes=target_sizes, **kwargs)
            assert len(got) == len(expected)
            segments += assert_post_processed_match(task, got, expected)
            if task == "semantic":  # the class scores test-time flip averages give the same map
                with torch.inference_mode():
                    scores = ours.semantic_scores(run_ours(), target_sizes=target_sizes)
                assert all(torch.equal(s.argmax(0), b) for s, b in zip(scores, expected))
    assert segments > 50  # real segments were compared, not empty lists


def test_panoptic_decodes_only_the_kept_queries(reference_dirs):
    directory = reference_dirs["deep"]
    model, processor = load_model(directory), load_processor(directory)
    decoded = []
    model.mask_head.register_forward_pre_hook(lambda module, args: decoded.append(args[1].shape[0]))
    with torch.inference_mode():
        outputs = model(**reference_inputs(directory))
        scores, labels = outputs.logits.softmax(-1).max(-1)
        threshold = float(scores.median())
        kept = (labels != outputs.logits.shape[-1] - 1) & (scores > threshold)
        assert 0 < int(kept.sum()) < kept.numel()
        processor.post_process_panoptic_segmentation(outputs, threshold=threshold)
    assert decoded == [int(n) for n in kept.sum(1) if n > 0]


def test_saved_by_omniseg_loads_in_reference(reference_dirs, tmp_path):
    source = reference_dirs["deep"]
    ours = load_model(source)
    ours.save_pretrained(tmp_path)
    load_processor(source).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "detr" and saved["architectures"] == ["DetrForSegmentation"]
    assert saved["backbone_config"]["model_type"] == "resnet" and saved["use_timm_backbone"] is False
    reference, info = ReferenceDetr.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = reference_inputs(tmp_path)
    with torch.inference_mode():
        got, expected = ours(**inputs), reference.eval()(**inputs)
        assert_outputs_match(got, expected)
        assert torch.equal(load_model(tmp_path)(**inputs).pred_masks, got.pred_masks)


# --------------------------------------------------------------------------- timm layout


def timm_names(depths: list[int]) -> dict[str, str]:
    """The reference ResNet's backbone tensor names -> timm's ``ResNet`` names for them,
    written from timm's definition: stem ``conv1``/``bn1``; ``layer<s>.<b>`` blocks with
    ``conv1..3``/``bn1..3``; the first block's projection ``downsample.0`` (conv) and
    ``downsample.1`` (batch norm)."""
    norm = ("weight", "bias", "running_mean", "running_var")
    names = {"embedder.embedder.convolution.weight": "conv1.weight"}
    names.update({f"embedder.embedder.normalization.{t}": f"bn1.{t}" for t in norm})
    for stage, depth in enumerate(depths):
        for block in range(depth):
            ours, theirs = f"encoder.stages.{stage}.layers.{block}.", f"layer{stage + 1}.{block}."
            for i in range(3):
                names[f"{ours}layer.{i}.convolution.weight"] = f"{theirs}conv{i + 1}.weight"
                names.update({f"{ours}layer.{i}.normalization.{t}": f"{theirs}bn{i + 1}.{t}" for t in norm})
            if block == 0:
                names[f"{ours}shortcut.convolution.weight"] = f"{theirs}downsample.0.weight"
                names.update({f"{ours}shortcut.normalization.{t}": f"{theirs}downsample.1.{t}" for t in norm})
    return names


def test_timm_layout_checkpoint_loads_and_saves(tmp_path):
    """A hub-style checkpoint (timm ResNet-50 names, ``use_timm_backbone`` with no
    backbone_config, batch-norm counters) gives the reference's outputs for the same weights,
    and omniseg writes it back in that layout."""
    from transformers import ResNetConfig

    config = reference_detr_config(d_model=32, encoder_layers=1, decoder_layers=1, num_queries=5)
    config.backbone_config = ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])  # ResNet-50
    torch.manual_seed(0)
    reference = ReferenceDetr(config).eval()
    reference_dir = tmp_path / "reference"
    reference.save_pretrained(reference_dir)

    prefix = "detr.model.backbone.conv_encoder.model."
    renames = {prefix + k: prefix + v for k, v in timm_names([3, 4, 6, 3]).items()}
    state = read_state_dict(reference_dir)
    assert set(k for k in state if k.startswith(prefix)) == set(renames)
    hub_state = {renames.get(k, k): v for k, v in state.items()}
    for stage in range(1, 5):
        hub_state[f"{prefix}layer{stage}.0.downsample.1.num_batches_tracked"] = torch.tensor(0)
    hub_dir = tmp_path / "hub"
    hub_dir.mkdir()
    save_state_dict(torch.nn.Module(), hub_dir, extra=hub_state)
    hub_config = json.loads((reference_dir / "config.json").read_text())
    hub_config.update(backbone_config=None, use_timm_backbone=True, backbone="resnet50")
    (hub_dir / "config.json").write_text(json.dumps(hub_config))

    ours = load_model(hub_dir)
    assert ours.config.timm_layout
    inputs = {"pixel_values": torch.randn(2, 3, 64, 96), "pixel_mask": torch.ones(2, 64, 96, dtype=torch.long)}
    inputs["pixel_mask"][1, 40:, 70:] = 0
    with torch.inference_mode():
        got, expected = ours(**inputs), reference(**inputs)
        assert_outputs_match(got, expected)
    ours.save_pretrained(tmp_path / "ours")
    written = read_state_dict(tmp_path / "ours")
    assert set(written) == {k for k in hub_state if not k.endswith("num_batches_tracked")}
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["use_timm_backbone"] is True
    with torch.inference_mode():
        assert torch.equal(load_model(tmp_path / "ours")(**inputs).pred_masks, got.pred_masks)


def test_timm_backbone_checkpoint_matches_reference(tmp_path):
    """With timm installed (it needs torchvision): the reference's own timm ResNet-50."""
    pytest.importorskip("timm", reason="timm (and torchvision) not installed")
    from transformers import DetrConfig

    config = DetrConfig(
        use_timm_backbone=True, backbone="resnet50", d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_attention_heads=4, num_queries=5, dropout=0.0,
        id2label={i: f"label_{i}" for i in range(3)},
    )
    torch.manual_seed(0)
    reference = ReferenceDetr(config).eval()
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    inputs = {"pixel_values": torch.randn(1, 3, 64, 96), "pixel_mask": torch.ones(1, 64, 96, dtype=torch.long)}
    with torch.inference_mode():
        assert_outputs_match(ours(**inputs), reference(**inputs))


def test_unsupported_settings_are_clear_errors(reference_dirs, tmp_path):
    config = json.loads((reference_dirs["small"] / "config.json").read_text())
    for change, message in (
        ({"backbone_config": None, "backbone": "resnet18"}, r"timm backbone 'resnet18' is not supported"),
        ({"dilation": True}, r"dilated last stage"),
        ({"position_embedding_type": "learned"}, r"'learned' position embeddings"),
        ({"model_type": "detr-v9"}, r"supported: .*detr"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, "use_timm_backbone": True, **change}))
        with pytest.raises(UnsupportedModelError, match=r"config.json: .*" + message):
            load_model(tmp_path)


# --------------------------------------------------------------------------- pipeline, CLI


@pytest.fixture(scope="module")
def photo_model_dir(camvid_dir, street_photo, tmp_path_factory) -> Path:
    """A tiny DETR with confident, distinct queries (several segments on the street photo)."""
    id2label = camvid_id2label(camvid_dir)
    return build_photo_detr(tmp_path_factory.mktemp("photo-detr"), id2label, street_photo)


@pytest.mark.parametrize(
    "subtask, kwargs, at_least",
    [
        ("panoptic", dict(threshold=0.5), 3),
        ("panoptic", dict(threshold=0.3, overlap_mask_area_threshold=0.2), 3),
        ("instance", dict(threshold=0.5), 3),
        ("instance", dict(threshold=0.2), 3),
        ("semantic", dict(), 2),
    ],
)
def test_pipeline_matches_reference_pipeline_on_a_real_photo(photo_model_dir, street_photo, subtask, kwargs, at_least):
    ours = omniseg.pipeline("image-segmentation", model=photo_model_dir)
    reference = transformers.pipeline("image-segmentation", model=str(photo_model_dir), device="cpu")
    expected = reference(street_photo, subtask=subtask, **kwargs)
    got = ours(street_photo, subtask=subtask, **kwargs)
    assert len(expected) >= at_least  # real segments, not two empty lists
    assert_pipeline_results_match(got, expected, street_photo.size, score_tolerance=1e-5)


def test_segment_cli_goes_on_past_a_broken_file_and_evaluate_runs(photo_model_dir, camvid_dir, tmp_path):
    data = tmp_path / "data"
    frames = small_camvid_val(camvid_dir, data, count=2, size=(160, 120))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for frame in frames:
        (inputs / frame.name).symlink_to(frame)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    out = tmp_path / "segments"
    status = omniseg_main(["segment", str(inputs), "--out", str(out), "--model", str(photo_model_dir),
                           "--task", "panoptic", "--threshold", "0.5"])
    assert status == 1  # one bad file
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and "broken.png" in json.dumps(errors[0])
    for frame in frames:
        result = json.loads((out / f"{frame.stem}.json").read_text())
        assert result["segments"], result
        assert (out / f"{frame.stem}_labels.png").is_file() and (out / f"{frame.stem}_overlay.png").is_file()

    report = tmp_path / "report"
    assert omniseg_main(["evaluate", "--model", str(photo_model_dir), "--data", str(data), "--out", str(report),
                         "--ignore-index", "11", "--examples", "0"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["images"] == 2 and 0.0 <= metrics["metrics"]["mean_iou"] <= 1.0


def test_train_cli_says_detr_is_not_trained(photo_model_dir, camvid_dir, tmp_path, capsys):
    status = omniseg_main(["train", "--model", str(photo_model_dir), "--data", str(camvid_dir),
                           "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert status == 1
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "training is not offered for model_type 'detr'" in message[0]
    assert str(photo_model_dir) in message[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()
