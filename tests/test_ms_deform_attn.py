"""The multi-scale deformable attention (gather-based, and the numba kernel of the ``fast``
extra) equals the grid_sample formulation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from omniseg.ops import _numba
from omniseg.ops.ms_deform_attn import multi_scale_deformable_attention


@pytest.fixture(params=["numba", "pytorch"])
def sampling(request, monkeypatch):
    """Run a test with the compiled kernels (numba installed) and the PyTorch path."""
    if request.param == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(_numba, "numba", None)
    return request.param


def grid_sample_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights):
    """Straightforward formulation: one bilinear ``grid_sample`` per level and head."""
    batch, _, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    output = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # [B, h*w, H, D] -> [B*H, D, h, w]
        maps = levels[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        # [B, Q, H, P, 2] -> [B*H, Q, P, 2] in grid_sample's [-1, 1] coordinates
        grid = 2 * sampling_locations[:, :, :, level].transpose(1, 2).flatten(0, 1) - 1
        sampled = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = attention_weights[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*H, Q, P]
        output = output + (sampled * weights[:, None]).sum(-1)  # [B*H, D, Q]
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2)


def random_inputs(spatial_shapes, *, batch=2, heads=3, head_dim=5, queries=11, points=4, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    seq_len = sum(h * w for h, w in spatial_shapes)
    levels = len(spatial_shapes)
    value = torch.randn(batch, seq_len, heads, head_dim, generator=generator, dtype=dtype)
    # Locations reach past the borders so zero padding and partly-outside samples matter.
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype)
    locations = locations * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return value, locations, weights


SHAPES = [
    [(7, 9), (4, 5), (2, 3)],
    [(1, 1), (3, 2)],
    [(16, 12), (8, 6), (4, 3), (2, 2)],
]


@pytest.mark.parametrize("spatial_shapes", SHAPES)
def test_matches_grid_sample_float64(spatial_shapes, sampling):
    value, locations, weights = random_inputs(spatial_shapes, dtype=torch.float64)
    ours = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
    expected = grid_sample_deformable_attention(value, spatial_shapes, locations, weights)
    assert ours.shape == (2, 11, 15)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_matches_grid_sample_float32(sampling):
    spatial_shapes = [(24, 32), (12, 16), (6, 8)]
    value, locations, weights = random_inputs(spatial_shapes, dtype=torch.float32, queries=200)
    ours = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
    expected = grid_sample_deformable_attention(value, spatial_shapes, locations, weights)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_exact_pixel_centres_borders_and_outside(sampling):
    # One 3x4 level, one head: a sample on a pixel centre returns that pixel, a sample on the
    # outer edge of the map half of the border pixel, a sample beyond half a pixel outside 0.
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)
    locations = torch.tensor(
        [
            [(1.5 / 4, 0.5 / 3)],  # centre of pixel (row 0, col 1) -> 1
            [(3.5 / 4, 2.5 / 3)],  # centre of the last pixel -> 11
            [(0.0, 1.5 / 3)],  # left edge of row 1 -> half of pixel 4 -> 2
            [(1.0, 1.5 / 3)],  # right edge of row 1 -> half of pixel 7 -> 3.5
            [(1.5 / 4, -0.5)],  # far above the map -> 0
            [(2.0 / 4, 1.0 / 3)],  # between pixels 1, 2, 5, 6 -> 3.5
        ],
        dtype=torch.float64,
    ).view(1, 6, 1, 1, 1, 2)
    weights = torch.ones(1, 6, 1, 1, 1, dtype=torch.float64)
    out = multi_scale_deformable_attention(value, [(3, 4)], locations, weights)
    torch.testing.assert_close(out.view(-1), torch.tensor([1, 11, 2, 3.5, 0, 3.5], dtype=torch.float64))


def test_gradients_match_grid_sample(sampling):
    spatial_shapes = [(5, 6), (3, 3)]
    inputs = random_inputs(spatial_shapes, dtype=torch.float64, queries=7)
    ours_inputs = [t.clone().requires_grad_() for t in inputs]
    ref_inputs = [t.clone().requires_grad_() for t in inputs]
    ours = multi_scale_deformable_attention(ours_inputs[0], spatial_shapes, *ours_inputs[1:])
    ref = grid_sample_deformable_attention(ref_inputs[0], spatial_shapes, *ref_inputs[1:])
    upstream = torch.randn(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, a, b in zip(("value", "locations", "weights"), ours_inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10, msg=f"gradient of {name}")


def test_compiled_sampling_keeps_torch_thread_count():
    # numba's OpenMP layer starts by sizing the OpenMP pool, which PyTorch may share.
    pytest.importorskip("numba")
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from omniseg.ops.ms_deform_attn import multi_scale_deformable_attention as sample\n"
        "sample(torch.randn(1, 4, 1, 2), [(2, 2)], torch.rand(1, 3, 1, 1, 1, 2), torch.rand(1, 3, 1, 1, 1))\n"
        "print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]


def test_autocast_samples_in_float32(sampling):
    # Under bfloat16 autocast the values arrive in bfloat16; the sampling (and its gradients)
    # run in float32 on them, with the locations unrounded.
    spatial_shapes = [(8, 64), (4, 32)]
    value, locations, weights = random_inputs(spatial_shapes, dtype=torch.float32, queries=50)
    value = value.bfloat16().float()
    locations.requires_grad_()
    expected = grid_sample_deformable_attention(value, spatial_shapes, locations, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = multi_scale_deformable_attention(value.bfloat16(), spatial_shapes, locations, weights)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad(ours.sum(), locations)
    (expected_grad,) = torch.autograd.grad(expected.sum(), locations)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-3)
