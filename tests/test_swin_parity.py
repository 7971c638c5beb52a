"""Parity of omniseg's Swin backbone with the reference (transformers.SwinBackbone).

Tiny seeded reference backbones are saved with the reference's own ``save_pretrained``
and loaded strictly into ours, so the checkpoint key names are tested along with the maths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from omniseg.models.checkpoint import (  # noqa: E402
    load_state_dict_strict,
    read_state_dict,
    save_state_dict,
)
from omniseg.models.swin import IGNORE_ON_LOAD, SwinBackbone, SwinConfig  # noqa: E402
from omniseg.models.swin import attention as swin_attention  # noqa: E402

CONFIGS = {
    # Window larger than the last stages' maps (3x3, 2x2): padding + shifted-window mask.
    "w7_all_stages": dict(
        embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    ),
    # Two blocks per stage (regular then shifted), a subset of stages, last one included.
    "w4_deep_subset": dict(
        embed_dim=24, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4], window_size=4,
        out_features=["stage2", "stage4"], drop_path_rate=0.2,
    ),
    # Odd window, patch 2, no qkv bias, tanh GELU, other eps and MLP ratio; selected by
    # out_indices, with the stem and without the last stage (which then need not run).
    "w5_misc": dict(
        embed_dim=32, depths=[2, 1, 3, 1], num_heads=[1, 2, 4, 8], window_size=5, patch_size=2,
        qkv_bias=False, hidden_act="gelu_new", mlp_ratio=2.0, layer_norm_eps=1e-6,
        out_indices=[0, 1, 3],
    ),
}
SIZES = [(67, 93), (128, 96)]


pytestmark = pytest.mark.usefixtures("single_thread_per_module")


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return ((expected - actual).abs().max() / expected.abs().max()).item()


def build_reference(kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A reference SwinBackbone with every parameter perturbed, so that all of them matter
    (the reference initialises bias tables to zero and LayerNorms to identity)."""
    torch.manual_seed(seed)
    model = transformers.SwinBackbone(transformers.SwinConfig(**kwargs)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def load_ours(reference: torch.nn.Module, kwargs: dict, directory: Path) -> SwinBackbone:
    reference.save_pretrained(directory)
    ours = SwinBackbone(SwinConfig(**kwargs)).eval()
    state = read_state_dict(directory)
    ignored = [name for name in state if name.endswith(IGNORE_ON_LOAD)]
    load_state_dict_strict(ours, state, source=directory, ignore_unexpected=ignored)
    return ours


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    kwargs = CONFIGS[request.param]
    reference = build_reference(kwargs)
    ours = load_ours(reference, kwargs, tmp_path_factory.mktemp(request.param))
    return kwargs, reference, ours


@pytest.fixture(params=["gather_first", "project_first"])
def window_path(request, monkeypatch):
    """Both ways of projecting windows with padding (tiny models pick the first on their own)."""
    monkeypatch.setattr(swin_attention, "_PROJECT_FIRST", 0 if request.param == "project_first" else 10**9)
    return request.param


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_feature_maps_match_reference(pair, size, window_path):
    kwargs, reference, ours = pair
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference(pixel_values).feature_maps
        actual = ours(pixel_values)
    assert len(actual) == len(expected) == len(reference.out_features)
    for name, exp, act, channels in zip(reference.out_features, expected, actual, ours.channels):
        assert act.shape == exp.shape, name
        assert act.shape[1] == channels
        assert relative_error(exp, act) < 1e-4, name


def test_reference_loads_what_we_save(tmp_path):
    kwargs = CONFIGS["w7_all_stages"]
    ours = load_ours(build_reference(kwargs, seed=3), kwargs, tmp_path / "from_reference")
    directory = tmp_path / "ours"
    directory.mkdir()
    ours.config.save(directory)
    save_state_dict(ours, directory)
    reloaded = transformers.SwinBackbone.from_pretrained(directory).eval()
    pixel_values = torch.randn(1, 3, 61, 45)
    with torch.no_grad():
        for exp, act in zip(reloaded(pixel_values).feature_maps, ours(pixel_values)):
            assert relative_error(exp, act) < 1e-4


def test_state_dict_matches_reference_checkpoint(tmp_path):
    """Every tensor the reference saves is ours (same shape) or deliberately ignored."""
    kwargs = dict(CONFIGS["w4_deep_subset"], use_absolute_embeddings=True)
    reference = build_reference(kwargs)
    reference.save_pretrained(tmp_path)
    saved = {name: t.shape for name, t in read_state_dict(tmp_path).items()}
    ours = {name: t.shape for name, t in SwinBackbone(SwinConfig(**kwargs)).state_dict().items()}
    assert {n: s for n, s in saved.items() if not n.endswith(IGNORE_ON_LOAD)} == ours


def test_training_mode_drop_path_and_gradients(tmp_path, window_path):
    """Stochastic depth draws the same random numbers as the reference; gradients agree."""
    kwargs = dict(CONFIGS["w4_deep_subset"], drop_path_rate=0.5)
    reference = build_reference(kwargs)
    ours = load_ours(reference, kwargs, tmp_path)
    reference.train()
    ours.train()
    pixel_values = torch.randn(2, 3, 40, 52)
    torch.manual_seed(7)
    expected = reference(pixel_values).feature_maps
    torch.manual_seed(7)
    actual = ours(pixel_values)
    for exp, act in zip(expected, actual):
        assert relative_error(exp.detach(), act.detach()) < 1e-4
    sum(f.square().mean() for f in expected).backward()
    sum(f.square().mean() for f in actual).backward()
    ref_params = dict(reference.named_parameters())
    pairs = {
        "embeddings.patch_embeddings.projection.weight":
            "swin.embeddings.patch_embeddings.projection.weight",
        "encoder.layers.1.blocks.1.attention.self.relative_position_bias_table":
            "swin.encoder.layers.1.blocks.1.attention.relative_position_bias."
            "relative_position_bias_table",
        "encoder.layers.0.blocks.1.attention.self.query.weight":
            "swin.encoder.layers.0.blocks.1.attention.q_proj.weight",
    }
    our_params = dict(ours.named_parameters())
    for mine, theirs in pairs.items():
        assert relative_error(ref_params[theirs].grad, our_params[mine].grad) < 1e-4, mine
    # Eval mode is deterministic.
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(pixel_values)[0], ours(pixel_values)[0])


def test_absolute_position_embeddings(tmp_path):
    kwargs = dict(CONFIGS["w7_all_stages"], use_absolute_embeddings=True, image_size=[64, 96])
    reference = build_reference(kwargs)
    ours = load_ours(reference, kwargs, tmp_path)
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for exp, act in zip(reference(pixel_values).feature_maps, ours(pixel_values)):
            assert relative_error(exp, act) < 1e-4
        with pytest.raises(ValueError, match="absolute position embeddings"):
            ours(torch.randn(1, 3, 60, 96))


def test_clamped_windows_match_reference_swin_model(tmp_path):
    """always_partition=False follows the reference SwinModel: a stage whose map is no larger
    than the window uses one unshifted window (here stage 3: 4x4 with window 4)."""
    kwargs = dict(embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=4,
                  out_features=["stage1", "stage2", "stage3"])
    reference = build_reference(kwargs)
    ours = load_ours(reference, kwargs, tmp_path)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embeddings, dims = reference.swin.embeddings(pixel_values)
        stages = reference.swin.encoder(
            embeddings, dims, always_partition=False, output_hidden_states=True,
            output_hidden_states_before_downsampling=True,
        ).reshaped_hidden_states[1:]
        expected = [
            norm(s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            for s, norm in zip(stages, reference.hidden_states_norms.values())
        ]
        actual = ours(pixel_values, always_partition=False)
        partitioned = ours(pixel_values)
    for exp, act in zip(expected, actual):
        assert relative_error(exp, act) < 1e-4
    # The clamp changes the last stage only (4x4 map, window 4: the shift is dropped).
    assert torch.equal(actual[0], partitioned[0])
    assert not torch.allclose(actual[2], partitioned[2])
    # Maps smaller than the window (where the reference SwinModel raises) use one window.
    small = ours(torch.randn(1, 3, 28, 44), always_partition=False)
    assert [tuple(m.shape[-2:]) for m in small] == [(7, 11), (4, 6), (2, 3)]


def test_config_defaults_match_reference():
    ours = SwinConfig().to_dict()
    theirs = transformers.SwinConfig().to_dict()
    for key, value in ours.items():
        if key in ("id2label", "label2id"):
            continue
        assert key in theirs, key
        expected = list(theirs[key]) if isinstance(theirs[key], tuple) else theirs[key]
        assert value == expected, key


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trip(name, tmp_path):
    kwargs = CONFIGS[name]
    config = SwinConfig(**kwargs)
    data = config.to_dict()
    reference = transformers.SwinConfig(**data)
    for key in ("out_features", "out_indices", "stage_names", "depths", "num_heads",
                "window_size", "embed_dim", "hidden_size", "num_layers"):
        assert list_or_value(getattr(reference, key)) == data[key], key
    # The reference's file reads back into the same config, unknown keys kept in `extra`.
    reference.save_pretrained(tmp_path)
    reread = SwinConfig.from_json_file(tmp_path / "config.json")
    assert reread.out_features == config.out_features
    assert reread.out_indices == config.out_indices
    assert reread.depths == config.depths
    assert reread.extra["encoder_stride"] == 32
    assert "stage_names" not in reread.extra
    assert SwinConfig.from_dict(reread.to_dict()).to_dict() == reread.to_dict()


def list_or_value(value):
    return list(value) if isinstance(value, tuple) else value


def test_config_out_features_rules():
    assert SwinConfig(depths=[1, 1], num_heads=[1, 1]).out_features == ["stage2"]
    config = SwinConfig(out_indices=[-1])
    assert config.out_features == ["stage4"]
    assert SwinConfig.from_dict({"_out_features": ["stage1"]}).out_indices == [1]
    with pytest.raises(ValueError, match="stage order"):
        SwinConfig(out_features=["stage2", "stage1"])
    with pytest.raises(ValueError, match="not stages"):
        SwinConfig(out_features=["stage9"])
    with pytest.raises(ValueError, match="different stages"):
        SwinConfig(out_features=["stage1"], out_indices=[2])
    with pytest.raises(ValueError, match="divisible"):
        SwinConfig(embed_dim=10, num_heads=[3, 6, 12, 24])


def test_inference_cache_follows_new_weights(tmp_path):
    """The stacked q/k/v weights cached for inference are rebuilt when weights change."""
    kwargs = CONFIGS["w4_deep_subset"]
    first = build_reference(kwargs, seed=1)
    second = build_reference(kwargs, seed=2)
    ours = load_ours(first, kwargs, tmp_path / "first")
    pixel_values = torch.randn(1, 3, 37, 41)
    with torch.no_grad():
        ours(pixel_values)  # fills the cache
        ours.load_state_dict(load_ours(second, kwargs, tmp_path / "second").state_dict())
        with torch.inference_mode():
            actual = ours(pixel_values)
        expected = second(pixel_values).feature_maps
    for exp, act in zip(expected, actual):
        assert relative_error(exp, act) < 1e-4


def test_training_after_inference_at_the_same_size(tmp_path):
    """Window layouts are cached by size: one first made under inference_mode must still
    serve a training forward and its backward (autograd saves the gather indices)."""
    kwargs = dict(CONFIGS["w7_all_stages"], drop_path_rate=0.0)  # training mode, no randomness
    ours = load_ours(build_reference(kwargs, seed=4), kwargs, tmp_path)
    swin_attention.window_layout.cache_clear()
    pixel_values = torch.randn(1, 3, 53, 47)
    with torch.inference_mode():
        inferred = ours(pixel_values)
    ours.train()
    trained = ours(pixel_values)
    sum(f.square().mean() for f in trained).backward()
    assert ours.encoder.layers[0].blocks[0].attention.self.relative_position_bias_table.grad is not None
    for exp, act in zip(inferred, trained):
        assert relative_error(exp, act.detach()) < 1e-6
