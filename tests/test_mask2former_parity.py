"""omniseg's Mask2Former gives the reference implementation's logits on the same weights,
and checkpoints move both ways in the hub layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from parity import TOLERANCE, build_reference_dirs, relative_error, two_images
from reference_models import TINY_MASK2FORMER_CONFIGS, build_reference_mask2former
from safetensors.torch import load_file, save_file

from omniseg.errors import CheckpointError, UnsupportedModelError
from omniseg.models.auto import load_model
from omniseg.models.mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

transformers = pytest.importorskip("transformers")
from transformers import Mask2FormerForUniversalSegmentation as ReferenceMask2Former  # noqa: E402
from transformers.models.mask2former.image_processing_pil_mask2former import (  # noqa: E402
    Mask2FormerImageProcessorPil,
)

pytestmark = pytest.mark.usefixtures("single_thread_per_module")


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mask2former")
    return build_reference_dirs(root, build_reference_mask2former, TINY_MASK2FORMER_CONFIGS)


def reference_inputs(directory: Path) -> dict[str, torch.Tensor]:
    processor = Mask2FormerImageProcessorPil.from_pretrained(directory)
    inputs = processor(two_images(), return_tensors="pt")
    assert not inputs["pixel_mask"].bool().all(), "the batch should contain padding"
    return {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"]}


def run_both(ours, reference, inputs):
    with torch.inference_mode():
        return ours(**inputs, output_auxiliary_logits=True), reference(**inputs, output_auxiliary_logits=True)


def assert_same_logits(ours_out, ref_out, tolerance: float = TOLERANCE) -> dict[str, float]:
    errors = {
        "class": relative_error(ours_out.class_queries_logits, ref_out.class_queries_logits),
        "masks": relative_error(ours_out.masks_queries_logits, ref_out.masks_queries_logits),
    }
    assert len(ours_out.auxiliary_logits) == len(ref_out.auxiliary_logits)
    errors["auxiliary"] = max(
        relative_error(ours_aux[key], ref_aux[key])
        for ours_aux, ref_aux in zip(ours_out.auxiliary_logits, ref_out.auxiliary_logits)
        for key in ("class_queries_logits", "masks_queries_logits")
    )
    assert max(errors.values()) < tolerance, errors
    return errors


@pytest.mark.parametrize("name", list(TINY_MASK2FORMER_CONFIGS))
def test_logits_match_reference(reference_dirs, name):
    directory = reference_dirs[name]
    ours = load_model(directory)
    assert isinstance(ours, Mask2FormerForUniversalSegmentation) and not ours.training
    reference = ReferenceMask2Former.from_pretrained(directory).eval()
    inputs = reference_inputs(directory)
    ours_out, ref_out = run_both(ours, reference, inputs)

    config = TINY_MASK2FORMER_CONFIGS[name]
    batch, _, height, width = inputs["pixel_values"].shape
    queries = config["num_queries"]
    assert ours_out.class_queries_logits.shape == (batch, queries, config["num_labels"] + 1)
    assert ours_out.masks_queries_logits.shape == (batch, queries, height // 4, width // 4)
    assert len(ours_out.auxiliary_logits) == config["decoder_layers"] - 1
    # The weights are perturbed, so the outputs are far from constant: parity means something.
    assert ours_out.masks_queries_logits.std() > 0.1
    assert_same_logits(ours_out, ref_out)

    with torch.inference_mode():
        default = ours(inputs["pixel_values"])
    assert default.auxiliary_logits is None and default.loss is None
    torch.testing.assert_close(default.masks_queries_logits, ours_out.masks_queries_logits)


def test_pre_norm_and_input_projections_match_reference(tmp_path):
    # Pre-norm decoder layers; pixel decoder wider than the transformer decoder (so the
    # transformer decoder projects its inputs); mask features of yet another width.
    directory = build_reference_mask2former(
        tmp_path / "pre_norm", pre_norm=True, feature_size=64, mask_feature_size=48, seed=3
    )
    ours = load_model(directory)
    assert ours.config.pre_norm
    assert isinstance(ours.model.transformer_module.input_projections[0], torch.nn.Conv2d)
    reference = ReferenceMask2Former.from_pretrained(directory).eval()
    assert_same_logits(*run_both(ours, reference, reference_inputs(directory)))


def test_saved_by_omniseg_loads_in_reference(reference_dirs, tmp_path):
    source = reference_dirs["deep"]
    ours = load_model(source)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mask2former"
    assert saved["architectures"] == ["Mask2FormerForUniversalSegmentation"]
    assert saved["backbone_config"]["model_type"] == "swin"
    assert saved["backbone_config"]["depths"] == list(TINY_MASK2FORMER_CONFIGS["deep"]["depths"])

    reference, info = ReferenceMask2Former.from_pretrained(tmp_path, output_loading_info=True)
    # A clean load: nothing missing (not even tensors omniseg derives), nothing extra.
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["missing_keys"]
    assert torch.equal(reference.criterion.empty_weight, ours.criterion.empty_weight)
    assert reference.config.to_dict()["num_queries"] == TINY_MASK2FORMER_CONFIGS["deep"]["num_queries"]
    shutil.copy(source / "preprocessor_config.json", tmp_path)
    assert_same_logits(*run_both(ours, reference.eval(), reference_inputs(tmp_path)))
    # And back: omniseg reloads its own save exactly.
    again = load_model(tmp_path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_state_dict_keys_are_the_reference_keys(reference_dirs):
    directory = reference_dirs["small"]
    ours = load_model(directory)
    saved = set(load_file(str(directory / "model.safetensors")))
    ignored = {n for n in saved if any(n.endswith(s) for s in ours.ignore_on_load)}
    assert set(ours.state_dict()) == saved - ignored
    assert ignored <= {
        "criterion.empty_weight",
        "model.pixel_level_module.encoder.swin.layernorm.weight",
        "model.pixel_level_module.encoder.swin.layernorm.bias",
    }


def _broken_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target)
    state = load_file(str(target / "model.safetensors"))
    edit(state)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_strict_loading_names_bad_tensors(reference_dirs, tmp_path):
    source = reference_dirs["small"]
    missing = "model.transformer_module.decoder.layers.1.cross_attn.in_proj_weight"
    misshaped = "class_predictor.weight"

    def drop(state):
        del state[missing]

    def add(state):
        state["model.transformer_module.decoder.layers.9.fc1.weight"] = torch.zeros(2, 2)

    def reshape(state):
        state[misshaped] = torch.zeros(3, state[misshaped].shape[1])

    cases = [(drop, "missing", missing), (add, "unexpected", "layers.9.fc1.weight"), (reshape, "mis-shaped", misshaped)]
    for edit, kind, name in cases:
        directory = _broken_copy(source, tmp_path / kind, edit)
        with pytest.raises(CheckpointError) as excinfo:
            load_model(directory)
        message = str(excinfo.value)
        assert kind in message and name in message and str(directory) in message


def test_non_swin_backbone_is_unsupported(reference_dirs, tmp_path):
    directory = tmp_path / "resnet"
    shutil.copytree(reference_dirs["small"], directory)
    config = json.loads((directory / "config.json").read_text())
    config["backbone_config"] = {"model_type": "resnet", "depths": [1, 1, 1, 1]}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="resnet.*Swin") as excinfo:
        load_model(directory)
    assert "config.json" in str(excinfo.value)


def test_config_round_trip_keeps_reference_keys(reference_dirs):
    original = json.loads((reference_dirs["wide"] / "config.json").read_text())
    config = Mask2FormerConfig.from_dict(original)
    assert config.backbone_config.window_size == 7 and config.num_labels == 9
    written = config.to_dict()
    for key, value in original.items():
        if key not in ("backbone_config", "transformers_version"):
            assert written[key] == value, key
    for key in ("depths", "num_heads", "embed_dim", "window_size", "out_features", "model_type"):
        assert written["backbone_config"][key] == original["backbone_config"][key], key


def test_trains(reference_dirs):
    """Train mode: dropout is active and every parameter outside the backbone gets a gradient."""
    config = Mask2FormerConfig.from_json_file(reference_dirs["small"] / "config.json")
    config.dropout = 0.2
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).train()
    pixel_values = torch.randn(2, 3, 64, 96)
    first = model(pixel_values, output_auxiliary_logits=True)
    second = model(pixel_values)
    assert not torch.equal(first.class_queries_logits, second.class_queries_logits)
    total = first.class_queries_logits.square().mean() + first.masks_queries_logits.square().mean()
    total = total + sum(aux["masks_queries_logits"].square().mean() for aux in first.auxiliary_logits)
    total.backward()
    for name, param in model.named_parameters():
        if not name.startswith("model.pixel_level_module.encoder."):
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.pixel_level_module.encoder.parameters())


@pytest.fixture(params=["numba", "torch"])
def sampling_path(request, monkeypatch):
    """Run the deformable-attention sampling on the numba kernel and on the PyTorch path."""
    from omniseg.ops import _numba

    if request.param == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(_numba, "numba", None)
    return request.param


def test_training_gradients_match_reference(reference_dirs, sampling_path):
    """Backward through the whole model (the pixel decoder's deformable attention included,
    on the numba kernels' backward and on PyTorch's) gives the reference's gradients."""
    directory = reference_dirs["small"]
    ours = load_model(str(directory)).train()
    reference = ReferenceMask2Former.from_pretrained(directory).train()
    inputs = reference_inputs(directory)
    weights = torch.randn(inputs["pixel_values"].shape[0], 1, 1, 1, generator=torch.Generator().manual_seed(3))
    for model in (ours, reference):
        out = model(**inputs)
        (out.class_queries_logits.square().mean() + (out.masks_queries_logits.sigmoid() * weights).mean()).backward()
    reference_grads = {name: p.grad for name, p in reference.named_parameters()}
    checked = 0
    for name, param in ours.named_parameters():
        expected = reference_grads.get(name)  # the backbone's modules are named differently
        # Parameters followed by a normalisation have gradients of float rounding only.
        if expected is None or expected.abs().max() < 1e-6:
            continue
        assert relative_error(param.grad, expected) < 1e-3, name
        checked += "pixel_level_module.decoder.encoder" in name
    assert checked >= 10, "the deformable-attention layers' parameters should have been compared"


@pytest.fixture(scope="module")
def confident_swin_model(tmp_path_factory) -> Path:
    """A COCO-panoptic-shaped model, scaled down (Swin embed 32, depths 2-2-6-2, window 7;
    133 labels, 100 queries, 10 decoder and 6 encoder layers, hidden 64, 8 heads) whose class
    predictor and query features are scaled up so that its heads are confident, and whose
    processor resizes to 256-512 like the COCO checkpoints' proportions."""
    directory = build_reference_mask2former(
        tmp_path_factory.mktemp("confident") / "model", depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), window_size=7,
        embed_dim=32, num_queries=100, num_labels=133, decoder_layers=10, encoder_layers=6, hidden_dim=64,
        num_attention_heads=8, shortest_edge=256, longest_edge=512, perturb=0.02,
    )
    model = ReferenceMask2Former.from_pretrained(directory)
    with torch.no_grad():
        model.class_predictor.weight.mul_(20)
        model.model.transformer_module.queries_features.weight.mul_(5)
    model.save_pretrained(directory)
    return directory


def test_mixed_size_batch_matches_reference(confident_swin_model, street_photo, sampling_path):
    """A batch of two photos of other sizes and aspects (the smaller one padded by most of
    its area): the documented ``model(**processor(images))`` gives the reference's logits.

    Query by query: masked attention attends where the layer before predicted a positive
    mask logit, and a random model has some within float rounding of zero (tens per layer
    within 1e-4 here), which other summation orders can flip, moving that query's later
    logits (on an AMD Zen 3 core 2 of the 200 queries moved past the tolerance, by at most
    5e-4; none on Zen 4 / Zen 5). A batch handled wrongly moves an image's queries: half of
    them. (The padding is also where PyTorch's channels-last group norm lost precision, a
    few queries' worth here: that has its own exact test below.)"""
    from omniseg.models.auto import load_processor

    ours = load_model(confident_swin_model)
    reference = ReferenceMask2Former.from_pretrained(confident_swin_model).eval()
    inputs = load_processor(confident_swin_model)([street_photo.resize((320, 240)), street_photo.resize((201, 333))])
    assert not inputs["pixel_mask"].bool().all()
    with torch.inference_mode():
        ours_out = ours(**inputs)
        ref_out = reference(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    assert ref_out.class_queries_logits.softmax(-1).amax(-1).mean() > 0.5  # confident heads
    class_error = _per_query_error(ours_out.class_queries_logits, ref_out.class_queries_logits)
    mask_error = _per_query_error(ours_out.masks_queries_logits, ref_out.masks_queries_logits)
    query_error = torch.maximum(class_error, mask_error)  # [B, Q]
    assert (query_error < TOLERANCE).float().mean() >= 0.95, query_error
    assert query_error.max() < 1e-2


def _per_query_error(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[B, Q, ...]`` logits -> ``[B, Q]``: each query's largest absolute difference relative
    to the reference's largest absolute value over all queries."""
    return (ours - reference).abs().flatten(2).amax(-1) / reference.abs().max()


def test_group_norm_is_exact_on_channels_last_maps():
    from omniseg.ops.group_norm import GroupNorm

    torch.manual_seed(0)
    x = torch.randn(2, 64, 12, 10) * 0.5 + 3.0
    x[0, :, 6:] = 3.0 + 0.01 * torch.randn(64, 6, 10)  # near-constant, far from zero
    norm = GroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    expected = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = norm(x.contiguous(memory_format=layout))
        assert relative_error(got.double(), expected) < 1e-6, layout
    assert norm(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    norm(x.contiguous(memory_format=torch.channels_last)).square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_group_norm_statistics_of_a_large_map_match_float64():
    """A stride-4-sized map (6144 rows of 256 channels, 12 blocks of rows): channel means and
    variances within 1.5e-7 of float64 (float32 sums in one pass drift to 2e-7 and more)."""
    from omniseg.ops.group_norm import GroupNorm, channel_statistics

    torch.manual_seed(0)
    # Channels far from zero with little spread: where E[x^2] - E[x]^2 would cancel.
    x = torch.randn(2, 256, 64, 96) * 0.5 + torch.randn(1, 256, 1, 1) * 20
    flat = x.permute(0, 2, 3, 1).reshape(2, -1, 256)
    var, mean = channel_statistics(flat)
    var64, mean64 = torch.var_mean(flat.double(), dim=1, unbiased=False)
    assert ((var.double() - var64).abs() / var64).max() < 1.5e-7
    assert ((mean.double() - mean64).abs() / mean64.abs()).max() < 1.5e-7

    norm = GroupNorm(32, 256)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    expected = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    with torch.no_grad():
        got = norm(x.contiguous(memory_format=torch.channels_last))
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(got.double(), expected) < 5e-7  # PyTorch's channels-last kernel: 1.7e-6
