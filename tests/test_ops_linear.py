"""omniseg.ops.linear: the oneDNN inference path computes F.linear; training keeps autograd."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omniseg.ops.linear import (
    _ONEDNN_LINEAR,
    Linear,
    PackedWeights,
    PointwiseConv2d,
    as_plain_linear,
    linear,
    linear_and_activation,
)


@pytest.mark.parametrize("shape", [(7, 32), (2, 5, 32), (2, 3, 4, 32), (0, 32)])
def test_linear_equals_f_linear_at_inference(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(48, 32, generator=generator)
    bias = torch.randn(48, generator=generator)
    with torch.inference_mode():
        for b in (bias, None):
            torch.testing.assert_close(linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    # A strided (non-contiguous) input.
    wide = torch.randn(6, 64, generator=generator)[:, ::2]
    with torch.no_grad():
        torch.testing.assert_close(linear(wide, weight, bias), F.linear(wide, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, function", [("relu", F.relu), ("gelu", F.gelu)])
def test_fused_activation_is_bit_identical(name, function):
    generator = torch.Generator().manual_seed(1)
    layer = Linear(32, 48)
    x = torch.randn(3, 50, 32, generator=generator) * 3
    with torch.inference_mode():
        plain = function(layer(x))
        assert torch.equal(linear(x, layer.weight, layer.bias, packed=layer.packed_weights, activation=name), plain)
        assert torch.equal(linear_and_activation(layer, x, name, function), plain)
        # Layers other than omniseg's Linear (here a plain nn.Linear) take the two steps.
        other = nn.Linear(32, 48)
        assert torch.equal(linear_and_activation(other, x, name, function), function(other(x)))
    # With autograd: PyTorch's operations, gradients flow.
    x.requires_grad_()
    out = linear_and_activation(layer, x, name, function)
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    torch.testing.assert_close(out, plain)


def test_linear_module_trains():
    torch.manual_seed(0)
    layer = Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    expected = F.linear(x, layer.weight, layer.bias).square().sum()
    grads = torch.autograd.grad(expected, [layer.weight, x])
    torch.testing.assert_close(layer.weight.grad, grads[0])
    torch.testing.assert_close(x.grad, grads[1])


def test_as_plain_linear_keeps_parameters():
    model = nn.Sequential(Linear(4, 3), nn.ReLU(), Linear(3, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    as_plain_linear(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_packed_weights_give_the_same_numbers_and_follow_the_weights():
    """oneDNN's reordered weights compute bit for bit what the plain weights do, and any
    change to the weights (in place, load_state_dict, .data) is picked up."""
    torch.manual_seed(0)
    layer = Linear(32, 48)
    x = torch.randn(2, 100, 32)
    with torch.no_grad():
        plain = linear(x, layer.weight, layer.bias)
        assert torch.equal(layer(x), plain)
        packed = PackedWeights()
        assert torch.equal(linear(x, layer.weight, layer.bias, packed=packed), plain)
        if _ONEDNN_LINEAR:
            assert len(layer.packed_weights._entries) == 1
        layer.weight.mul_(2)
        assert torch.equal(layer(x), linear(x, layer.weight, layer.bias))
        layer.load_state_dict({name: torch.randn_like(t) for name, t in layer.state_dict().items()})
        assert torch.equal(layer(x), linear(x, layer.weight, layer.bias))
        layer.weight.data = torch.randn(48, 32)
        assert torch.equal(layer(x), linear(x, layer.weight, layer.bias))
        if _ONEDNN_LINEAR:  # the replaced weight's copy is gone, not kept alive
            assert len(layer.packed_weights._entries) == 1
        # Slices of one parameter (as attention's packed q/k/v) are told apart.
        w_q, w_k = torch.randn(64, 32).chunk(2)
        assert torch.equal(linear(x, w_q, None, packed=packed), linear(x, w_q, None))
        assert torch.equal(linear(x, w_k, None, packed=packed), linear(x, w_k, None))
        if _ONEDNN_LINEAR:
            assert len(packed._entries) == 2
        conv = PointwiseConv2d(32, 16)
        maps = torch.randn(1, 32, 5, 7).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(conv(maps), torch.nn.functional.conv2d(maps, conv.weight, conv.bias))


def test_packed_weights_are_not_copied_or_saved():
    layer = Linear(8, 4)
    with torch.no_grad():
        layer(torch.randn(3, 8))
    for copied in (copy.deepcopy(layer), _saved_and_loaded(layer)):
        assert copied.packed_weights._entries == {}
        torch.testing.assert_close(copied(torch.ones(1, 8)), layer(torch.ones(1, 8)))


def _saved_and_loaded(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_converting_or_moving_a_module_drops_its_packed_weights():
    """``.to`` / ``.double`` / ``.cuda`` replace the weights: the cached copies of the old
    ones (which hold those weights alive) go with them, in every module that has some."""
    from omniseg.models.mask2former.transformer_decoder import MaskedCrossAttention
    from omniseg.models.swin.attention import WindowSelfAttention

    torch.manual_seed(0)
    layer = Linear(32, 48)
    conv = PointwiseConv2d(32, 16)
    window = WindowSelfAttention(32, num_heads=2, window_size=3, qkv_bias=True)
    cross = MaskedCrossAttention(32, 2, 0.0)
    x = torch.randn(2, 9, 32)
    maps = torch.randn(1, 32, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x), conv(maps), window.fused_qkv(x), cross(x, x, x, torch.ones(2, 1, 9, 9, dtype=torch.bool))
    if _ONEDNN_LINEAR:
        assert all(len(m.packed_weights._entries) > 0 for m in (layer, conv, window, cross))
    assert window._fused_sources
    for module in (layer, conv, window, cross):
        module.double()
        assert module.packed_weights._entries == {}
    assert window._fused_sources == [] and window._fused_cache is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x.double()), F.linear(x.double(), layer.weight, layer.bias))
        layer.float()
        assert torch.equal(layer(x), linear(x, layer.weight, layer.bias))
