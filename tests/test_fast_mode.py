"""The opt-in int8 fast CPU mode: linear layers quantized, answers close to float32's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import omniseg
from omniseg.pipelines.image_segmentation import int8_engine


@pytest.fixture(scope="module", params=[False, True], ids=["default-engine", "amx-onednn-engine"])
def pipelines(request, fitted_mask2former_dir: Path):
    """The float32 and int8 pipelines, the int8 weights packed for the default quantization
    engine and for oneDNN's (chosen on CPUs with AMX; its kernels run on any x86 CPU)."""
    engine = torch.backends.quantized.engine
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: request.param, raising=False)
        if request.param and "onednn" in torch.backends.quantized.supported_engines:
            assert int8_engine() == "onednn"
        float32 = omniseg.pipeline("image-segmentation", model=fitted_mask2former_dir)
        int8 = omniseg.pipeline("image-segmentation", model=fitted_mask2former_dir, quantize="int8")
    assert torch.backends.quantized.engine == engine, "the global engine is switched only while packing"
    return float32, int8


def test_int8_quantizes_the_linear_layers_but_not_the_heads(pipelines):
    float32, int8 = pipelines
    quantized = [name for name, m in int8.model.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    assert any(".encoder.layers." in name and name.endswith("fc1") for name in quantized)  # deformable encoder MLP
    assert any(name.endswith("stacked_qkv") for name in quantized)  # Swin q/k/v as one layer
    assert not any("class_predictor" in name or "mask_predictor" in name for name in quantized)
    # The float32 pipeline's model is untouched.
    assert not any(type(m).__module__.startswith("torch.ao") for m in float32.model.modules())


def test_int8_answers_are_close_to_float32(pipelines, street_photo):
    float32, int8 = pipelines
    inputs = float32.processor(images=[street_photo], return_tensors="pt")
    with torch.inference_mode():
        a, b = float32.model(**inputs), int8.model(**inputs)
    for key in ("class_queries_logits", "masks_queries_logits"):
        x, y = getattr(a, key), getattr(b, key)
        assert ((x - y).abs().max() / x.abs().max()).item() < 0.2
    x = float32.predict([street_photo], subtask="semantic")[0].label_map
    y = int8.predict([street_photo], subtask="semantic")[0].label_map
    assert (x == y).float().mean().item() > 0.9
    results = int8(street_photo, subtask="panoptic", threshold=0.0)
    assert results and all(r["mask"].size == street_photo.size for r in results)
    masks = np.stack([np.asarray(r["mask"]) for r in results])
    assert ((masks == 255).sum(axis=0) <= 1).all()


def test_unknown_quantize_mode_is_rejected(fitted_mask2former_dir: Path):
    with pytest.raises(ValueError, match="quantize"):
        omniseg.pipeline("image-segmentation", model=fitted_mask2former_dir, quantize="int4")


def test_int8_mode_runs_large_convolutions_in_bfloat16_where_native(pipelines, monkeypatch):
    from omniseg.ops import bfloat16

    _, int8 = pipelines
    converted = [name for name, m in int8.model.named_modules() if isinstance(m, bfloat16.Bfloat16Conv2d)]
    if bfloat16.native_bfloat16():
        assert any(name.endswith("decoder.layer_1.0") for name in converted)  # the FPN's 3x3
        assert not any("patch_embeddings" in name for name in converted)  # reads the image: float32
    else:
        assert converted == []
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 32, 3, padding=1), torch.nn.Conv2d(3, 8, 3))
    monkeypatch.setattr(bfloat16, "native_bfloat16", lambda: False)
    assert bfloat16.convolutions_to_bfloat16(model) == []  # emulated bfloat16 would be slower
    monkeypatch.setattr(bfloat16, "native_bfloat16", lambda: True)
    x = torch.randn(1, 64, 20, 24).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model[0](x)
        assert bfloat16.convolutions_to_bfloat16(model) == ["0"]
        got = model[0](x)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert 0 < ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2
