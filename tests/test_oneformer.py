"""omniseg's OneFormer gives the reference implementation's answers: logits for every task,
processor outputs and task token ids, every post-processing path, the pipeline on a real
photo, and checkpoints move both ways in the hub layout; ``omniseg train`` refuses it."""

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
from reference_models import perturb_parameters
from reference_oneformer import TINY_ONEFORMER_CONFIGS, build_reference_oneformer, save_reference_processor
from test_mask2former_processing import structured_outputs

import omniseg
from omniseg.cli.main import main as omniseg_main
from omniseg.errors import CheckpointError, UnsupportedModelError
from omniseg.models.auto import load_model, load_processor
from omniseg.models.oneformer import OneFormerForUniversalSegmentation
from omniseg.processing.oneformer import OneFormerImageProcessor

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from transformers import AutoTokenizer, OneFormerProcessor  # noqa: E402
from transformers import OneFormerForUniversalSegmentation as ReferenceOneFormer  # noqa: E402

TASKS = ("semantic", "instance", "panoptic")
pytestmark = pytest.mark.usefixtures("single_thread_per_module")


@pytest.fixture(scope="module", autouse=True)
def reference_resize():
    """The reference's OneFormer post-processing resizes masks to the target size with
    torchvision (``tvF.resize``: antialiased bilinear on float tensors), in both its image
    processors; the PIL one imports torchvision only where installed, and CI has none. This
    stands in for it with the same PyTorch call, so the reference runs at all."""
    from transformers.models.oneformer import image_processing_pil_oneformer as module

    if hasattr(module, "tvF"):
        yield
        return

    def resize(image: torch.Tensor, size, interpolation) -> torch.Tensor:
        assert interpolation == "bilinear"
        return torch.nn.functional.interpolate(
            image, size=list(size), mode="bilinear", align_corners=False, antialias=True
        )

    stand_in = SimpleNamespace(resize=resize, InterpolationMode=SimpleNamespace(BILINEAR="bilinear"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "tvF", stand_in, raising=False)
        yield


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory) -> dict[str, Path]:
    return build_reference_dirs(tmp_path_factory.mktemp("oneformer"), build_reference_oneformer, TINY_ONEFORMER_CONFIGS)


def quiet_reference(directory: Path) -> ReferenceOneFormer:
    """The reference model (its load report lists the text mapper it does not build)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ReferenceOneFormer.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def reference_outputs(reference_dirs) -> dict[tuple[str, str], tuple[dict, object]]:
    """Per (config, task): the reference processor's inputs for two images and the reference
    model's outputs on them."""
    results = {}
    for name, directory in reference_dirs.items():
        processor = OneFormerProcessor.from_pretrained(directory)
        model = quiet_reference(directory)
        for task in TASKS:
            inputs = processor(images=two_images(), task_inputs=[task, task], return_tensors="pt")
            with torch.inference_mode():
                outputs = model(
                    pixel_values=inputs["pixel_values"], task_inputs=inputs["task_inputs"], output_auxiliary_logits=True
                )
            results[name, task] = (inputs, outputs)
    return results


@pytest.mark.parametrize("name", list(TINY_ONEFORMER_CONFIGS))
def test_logits_match_reference_for_every_task(reference_dirs, reference_outputs, name):
    ours = load_model(reference_dirs[name])
    assert isinstance(ours, OneFormerForUniversalSegmentation) and not ours.training
    config = TINY_ONEFORMER_CONFIGS[name]
    tokens = set()
    for task in TASKS:
        inputs, expected = reference_outputs[name, task]
        tokens.add(tuple(inputs["task_inputs"][0].tolist()))
        with torch.inference_mode():
            got = ours(inputs["pixel_values"], inputs["task_inputs"], output_auxiliary_logits=True)
        batch, _, height, width = inputs["pixel_values"].shape
        assert got.class_queries_logits.shape == (batch, config["num_queries"], config["num_labels"] + 1)
        # No rounding of sizes to /32 here: stride 4, rounded up (the patch embedding pads).
        assert got.masks_queries_logits.shape == (batch, config["num_queries"], -(-height // 4), -(-width // 4))
        assert got.masks_queries_logits.std() > 0.1  # perturbed weights: far from constant outputs
        assert len(got.auxiliary_logits) == len(expected.auxiliary_predictions) == config["decoder_layers"] - 1
        errors = {
            "class": relative_error(got.class_queries_logits, expected.class_queries_logits),
            "masks": relative_error(got.masks_queries_logits, expected.masks_queries_logits),
            "task_token": relative_error(got.task_token, expected.task_token),
            "auxiliary": max(
                relative_error(a[key], b[key])
                for a, b in zip(got.auxiliary_logits, expected.auxiliary_predictions)
                for key in ("class_queries_logits", "masks_queries_logits")
            ),
        }
        assert max(errors.values()) < TOLERANCE, (task, errors)
        # The low-resolution path for the intermediate masks gives the same final answer.
        with torch.inference_mode():
            fast = ours(inputs["pixel_values"], inputs["task_inputs"])
        assert relative_error(fast.masks_queries_logits, expected.masks_queries_logits) < TOLERANCE
    assert len(tokens) == 3  # three different task texts reached the model


@pytest.mark.parametrize("name", list(TINY_ONEFORMER_CONFIGS))
def test_processor_outputs_identical(reference_dirs, reference_outputs, name, small_street_photos):
    directory = reference_dirs[name]
    ours = load_processor(directory)
    assert isinstance(ours, OneFormerImageProcessor)
    reference = OneFormerProcessor.from_pretrained(directory)
    for task in TASKS:
        expected = reference(images=small_street_photos, task_inputs=[task, task], return_tensors="pt")
        got = ours(small_street_photos, task_inputs=task)
        assert set(got) == {"pixel_values", "pixel_mask", "task_inputs"}
        for key in got:
            assert got[key].shape == expected[key].shape and torch.equal(got[key], expected[key]), (task, key)
    # Mixed tasks in one batch, one per image.
    mixed = ["instance", "semantic"]
    expected = reference(images=small_street_photos, task_inputs=mixed, return_tensors="pt")
    assert torch.equal(ours(small_street_photos, task_inputs=mixed)["task_inputs"], expected["task_inputs"])


@pytest.mark.parametrize("name", list(TINY_ONEFORMER_CONFIGS))
def test_pipeline_task_ids_are_the_reference_pipelines(reference_dirs, name):
    """The reference pipeline tokenizes the task itself (pad-token padding to the model's
    task_seq_len): the same ids, which differ from the processor's zero padding."""
    directory = reference_dirs[name]
    ours = load_processor(directory)
    length = load_model(directory).config.task_seq_len
    tokenizer = AutoTokenizer.from_pretrained(directory)
    for task in TASKS:
        expected = tokenizer([f"the task is {task}"], padding="max_length", max_length=length, return_tensors="pt")
        got = ours(two_images()[:1], task_inputs=task, task_padding="pad_token", task_seq_length=length)
        assert torch.equal(got["task_inputs"], expected["input_ids"])
        zero_padded = ours(two_images()[:1], task_inputs=task, task_seq_length=length)["task_inputs"]
        assert not torch.equal(zero_padded, got["task_inputs"])


def test_unknown_task_and_missing_tokenizer_are_clear_errors(reference_dirs, tmp_path):
    processor = load_processor(reference_dirs["small"])
    with pytest.raises(ValueError, match="task 'depth' is not one of semantic, instance, panoptic"):
        processor(two_images()[:1], task_inputs="depth")
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((reference_dirs["small"] / name).read_bytes())
    with pytest.raises(CheckpointError, match="no tokenizer for the task inputs"):
        load_processor(tmp_path)


def _post_processing_cases():
    yield "semantic", {}
    yield "instance", {"threshold": 0.0}
    yield "instance", {"threshold": 0.0, "return_coco_annotation": True}
    yield "instance", {"threshold": 0.5, "mask_threshold": 0.3, "overlap_mask_area_threshold": 0.5}
    yield "instance", {"task_type": "panoptic", "threshold": 0.0}
    yield "instance", {"is_demo": False}
    yield "panoptic", {"threshold": 0.0, "overlap_mask_area_threshold": 0.0}
    yield "panoptic", {"threshold": 0.5, "mask_threshold": 0.3, "overlap_mask_area_threshold": 0.5,
                       "label_ids_to_fuse": {0, 2, 4}}


@pytest.mark.parametrize("target_sizes", [None, [(61, 83), (133, 121)], [(9, 13), (11, 10)]])
def test_post_processing_matches_reference(reference_dirs, reference_outputs, target_sizes):
    """Every post-processing path on real model outputs (both tiny models, every task) and on
    structured outputs with many clear segments, at the model's mask size, enlarged and
    shrunk (where antialiased and plain bilinear resizing differ most)."""
    reference = OneFormerProcessor.from_pretrained(reference_dirs["small"])
    ours = load_processor(reference_dirs["small"])
    outputs = [output for _, output in reference_outputs.values()]
    outputs += [structured_outputs(seed, classes=5) for seed in range(2)]
    segments = 0
    for output in outputs:
        for task, kwargs in _post_processing_cases():
            method = f"post_process_{task}_segmentation"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = getattr(reference, method)(output, target_sizes=target_sizes, **kwargs)
            got = getattr(ours, method)(output, target_sizes=target_sizes, **kwargs)
            assert len(got) == len(expected) == 2
            segments += assert_post_processed_match(task, got, expected)
    assert segments > 50  # real segments were compared, not empty lists


def test_saved_by_omniseg_loads_in_reference(reference_dirs, reference_outputs, tmp_path):
    source = reference_dirs["small"]
    ours = load_model(source)
    assert hasattr(ours.model, "text_mapper")  # the hub-like checkpoint carries it
    ours.save_pretrained(tmp_path)
    load_processor(source).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "oneformer" and saved["architectures"] == ["OneFormerForUniversalSegmentation"]

    # Every tensor of the original checkpoint comes back, the training-only ones included
    # (but the Swin classifier's final norm, which no feature map uses: as for Mask2Former,
    # omniseg writes the reference's initial values there).
    from safetensors.torch import load_file

    original, written = load_file(source / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(original) == set(written)
    changed = [key for key in original if not torch.equal(original[key], written[key])]
    assert sorted(changed) == [f"model.pixel_level_module.encoder.swin.layernorm.{p}" for p in ("bias", "weight")]
    assert any(key.startswith("model.text_mapper.") for key in original) and "criterion.logit_scale" in original

    inputs, expected = reference_outputs["small", "semantic"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, info = ReferenceOneFormer.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(key.startswith("model.text_mapper.") for key in info["unexpected_keys"])
    with torch.inference_mode():
        got = reference.eval()(pixel_values=inputs["pixel_values"], task_inputs=inputs["task_inputs"])
    assert torch.equal(got.class_queries_logits, expected.class_queries_logits)
    assert torch.equal(got.masks_queries_logits, expected.masks_queries_logits)
    # The saved processor (with its tokenizer files) is the same processor.
    again = load_processor(tmp_path)(two_images(), task_inputs="instance")
    assert torch.equal(again["task_inputs"], load_processor(source)(two_images(), task_inputs="instance")["task_inputs"])


def test_unsupported_configs_are_clear_errors(reference_dirs, tmp_path):
    config = json.loads((reference_dirs["prenorm"] / "config.json").read_text())
    config["hidden_dim"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"config.json.*input projections.*does not save them"):
        OneFormerForUniversalSegmentation.config_class.from_json_file(tmp_path / "config.json")
    config["hidden_dim"] = config["conv_dim"]
    config["backbone_config"] = {"model_type": "resnet"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"OneFormer backbone 'resnet' is not supported"):
        load_model(tmp_path)
    config["model_type"] = "oneformer-v2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"supported: .*oneformer"):
        load_model(tmp_path)


# --------------------------------------------------------------------------- pipeline, CLI


def build_photo_oneformer(directory: Path, id2label: dict[int, str], *, seed: int, spread: float = 2.5) -> Path:
    """A tiny random reference OneFormer that gives several segments on a real photo in every
    task: its object queries all start from the task token, so large seeded query positions
    and class weights (N(0, spread^2)) set them apart."""
    from reference_oneformer import reference_oneformer_config

    torch.manual_seed(seed)
    model = ReferenceOneFormer(reference_oneformer_config(num_queries=12, task_seq_len=77, id2label=id2label))
    perturb_parameters(model, seed=seed, scale=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for weight in (
            model.model.transformer_module.queries_embedder.weight,
            model.model.transformer_module.decoder.class_embed.weight,
        ):
            weight.copy_(torch.randn(weight.shape, generator=generator) * spread)
    model.eval().save_pretrained(directory)
    save_reference_processor(
        directory, num_labels=len(id2label), task_seq_length=77, shortest_edge=64, longest_edge=96, tokenizer_json=False
    )
    return directory


@pytest.fixture(scope="module")
def photo_model_dir(camvid_dir, tmp_path_factory) -> Path:
    id2label = camvid_id2label(camvid_dir)
    # Exact mask equality needs pixels where two queries' score x mask value do not nearly
    # tie: the implementations' logits differ by ~3e-6 relative, which flips 1-2 of the
    # photo's 172,800 pixels for about half the seeds (instance segments compete on raw mask
    # logits, and OneFormer's queries all start from the task token, so ties are common; the
    # post-processing of the same logits is bit-identical). Seed 26 has none in any task.
    return build_photo_oneformer(tmp_path_factory.mktemp("photo-oneformer"), id2label, seed=26)


@pytest.mark.parametrize(
    "subtask, kwargs, at_least",
    [
        ("panoptic", dict(threshold=0.3, overlap_mask_area_threshold=0.2), 4),
        ("instance", dict(threshold=0.3), 4),
        ("semantic", dict(), 3),
    ],
)
def test_pipeline_matches_reference_pipeline_on_a_real_photo(photo_model_dir, street_photo, subtask, kwargs, at_least):
    ours = omniseg.pipeline("image-segmentation", model=photo_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = transformers.pipeline("image-segmentation", model=str(photo_model_dir), device="cpu")
        expected = reference(street_photo, subtask=subtask, **kwargs)
    got = ours(street_photo, subtask=subtask, **kwargs)
    assert len(expected) >= at_least  # real segments, not two empty lists
    assert_pipeline_results_match(got, expected, street_photo.size, score_tolerance=1e-4)


def test_segment_and_evaluate_cli_run_oneformer(photo_model_dir, camvid_dir, tmp_path, capsys):
    data = tmp_path / "data"
    (frame,) = small_camvid_val(camvid_dir, data, count=1, size=(120, 90))

    photos = data / "images" / "val"
    (tmp_path / "broken.png").write_bytes(b"not a PNG")
    out = tmp_path / "segments"
    status = omniseg_main(["segment", str(photos), str(tmp_path / "broken.png"), "--out", str(out),
                           "--model", str(photo_model_dir), "--task", "panoptic", "--threshold", "0.3"])
    assert status == 1  # one file failed, the other was segmented
    result = json.loads((out / f"{frame.stem}.json").read_text())
    assert result["segments"] and result["task"] == "panoptic", result
    assert (out / f"{frame.stem}_labels.png").is_file()
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(Path(e["file"]).name, e["error"]) for e in errors] == [("broken.png", "ImageReadError")]
    assert "1 failed" in capsys.readouterr().err

    report = tmp_path / "report"
    assert omniseg_main(["evaluate", "--model", str(photo_model_dir), "--data", str(data), "--out", str(report),
                         "--ignore-index", "11", "--examples", "0"]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["images"] == 1 and 0.0 <= metrics["metrics"]["mean_iou"] <= 1.0


def test_train_cli_refuses_oneformer(reference_dirs, camvid_dir, tmp_path, capsys):
    data = tmp_path / "data"
    for kind in ("images", "labels"):
        (data / kind / "train").mkdir(parents=True)
    image = sorted((camvid_dir / "images" / "train").glob("*.png"))[0]
    (data / "images" / "train" / image.name).symlink_to(image)
    (data / "labels" / "train" / image.name).symlink_to(camvid_dir / "labels" / "train" / image.name)
    (data / "id2label.json").write_text((camvid_dir / "id2label.json").read_text())
    status = omniseg_main(["train", "--model", str(reference_dirs["small"]), "--data", str(data),
                           "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training is not offered for OneFormer" in err[0], err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_task_seq_len_other_than_77_works_or_says_what_is_wrong(tmp_path):
    # The hub layout (no processor_config.json) with a model whose task_seq_len is 8, shorter
    # than the task texts' 9-11 tokens here. Both ways of running it ended in oneDNN's "could
    # not create a primitive descriptor for the inner product forward propagation primitive":
    # the processor made 77 ids (the reference's default), the pipeline's text was not cut.
    directory = build_reference_oneformer(tmp_path / "short-task", task_seq_len=8, tokenizer_json=False)
    assert not (directory / "processor_config.json").exists()
    model, processor = load_model(directory), load_processor(directory)
    assert processor.task_seq_length == 8
    images = two_images()[:1]
    with torch.inference_mode():
        for task in TASKS:
            inputs = processor(images, task_inputs=task, return_tensors="pt")
            assert inputs["task_inputs"].shape == (1, 8)
            assert model(**inputs).class_queries_logits.shape[0] == 1
        seg = omniseg.pipeline("image-segmentation", model=directory)
        for task in TASKS:
            assert isinstance(seg(images[0], subtask=task, threshold=0), list)
        # Inputs made for another length are refused with a message saying what fits.
        inputs = processor(images, task_inputs="semantic", task_seq_length=77, return_tensors="pt")
        with pytest.raises(ValueError, match=r"task_inputs must be \[batch, task_seq_len\] = \[B, 8\].*got shape \[1, 77\]"):
            model(**inputs)
