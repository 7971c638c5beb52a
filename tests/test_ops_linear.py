"""omniseg.ops.linear: the oneDNN inference path computes F.linear; training keeps autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omniseg.ops.linear import Linear, as_plain_linear, linear


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
