"""The compiled separable bilinear resize gives F.interpolate's numbers, bit for bit."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from omniseg.ops import bilinear, scored_argmax


@pytest.mark.parametrize(
    "in_size, out_size",
    [((96, 128), (384, 384)), ((24, 32), (384, 384)), ((384, 384), (480, 640)), ((384, 384), (25, 31)), ((7, 9), (7, 20))],
)
def test_resize_equals_interpolate(in_size, out_size) -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(5, *in_size, generator=g) * 20
    maps[1, 0, 0] = float("nan")
    maps[2, -1, -1] = float("inf")
    expected = F.interpolate(maps[None], size=out_size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(bilinear.resize(maps, out_size), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="checked on x86-64 builds")
def test_compiled_kernel_matches_pytorch_for_image_sizes() -> None:
    # On other machines the check may fail and PyTorch resize instead (still the same numbers);
    # on x86-64 (torch 2.13) the fast path must stay in use.
    pytest.importorskip("numba")
    for in_size, out_size in [((96, 128), (384, 384)), ((384, 384), (480, 640)), ((384, 384), (1080, 1920))]:
        assert bilinear.matches_pytorch(in_size, out_size, bilinear._compiled_resize)
        assert bilinear.matches_pytorch(in_size, out_size, scored_argmax._resized)  # panoptic's fused resize
    maps = torch.randn(8, 96, 128, generator=torch.Generator().manual_seed(1)) * 10
    expected = F.interpolate(maps[None], size=(384, 384), mode="bilinear", align_corners=False)[0]
    assert torch.equal(bilinear._compiled_resize(maps, (384, 384)), expected)
