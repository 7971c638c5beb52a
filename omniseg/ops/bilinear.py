"""PyTorch's bilinear resize (``align_corners=False``), bit for bit, computed separably.

Post-processing must resize mask logits and probabilities exactly as the reference does
(``F.interpolate(..., mode="bilinear", align_corners=False)``): its answers are argmaxes of
the results, so a last-bit difference can move a pixel. PyTorch's kernel computes both
interpolations for every output pixel. The numba kernel here (the ``fast`` extra) uses the
same arithmetic, source positions ``fma(scale, x + 0.5, -0.5)`` and ``fma(a, w0, b * w1)``
along rows then down columns, but resizes each source row along once rather than once per
output row, and runs 3x faster on 8 maps of 96x128 -> 384x384.

How PyTorch's compiled kernel fused its multiply-adds decides its last bits, so the kernel
is used for a pair of sizes only after it matched ``F.interpolate`` bit for bit on this
machine (:func:`matches_pytorch`, once per pair): with torch 2.13 on x86-64 it does for
image-sized outputs and not for some small ones (such as 384x384 -> 25x31, which PyTorch
computes another way); PyTorch resizes those.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.ops._numba import fma32, kernels_apply, numba, use_torch_threads

Taps = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(maps[None], size, mode="bilinear", align_corners=False)[0]``, the same
    numbers: ``[N, h, w] -> [N, *size]``."""
    size = tuple(size)
    if not (kernels_apply(maps) and matches_pytorch(tuple(maps.shape[1:]), size, _compiled_resize)):
        return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    return _compiled_resize(maps, size)


def _compiled_resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    use_torch_threads()
    out = torch.empty(maps.shape[0], *size)
    _resize(maps.detach().contiguous().numpy(), *taps(maps.shape[1], size[0]), *taps(maps.shape[2], size[1]), out.numpy())
    return out


@functools.lru_cache(maxsize=64)
def taps(in_size: int, out_size: int) -> Taps:
    """PyTorch's source indices ``first, second`` (int64) and float32 weights ``w0, w1`` for
    each of ``out_size`` outputs of a bilinear resize with ``align_corners=False``."""
    scale = np.float32(in_size) / np.float32(out_size)
    outputs = np.arange(out_size, dtype=np.float64)
    # fma(scale, x + 0.5, -0.5) rounded once: exact in float64, whose 53 bits hold the product.
    position = np.maximum((np.float64(scale) * (outputs + 0.5) - 0.5).astype(np.float32), np.float32(0))
    first = position.astype(np.int64)
    second = np.where(first < in_size - 1, first + 1, first)
    w1 = np.minimum(position - first.astype(np.float32), np.float32(1)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    return first, second, w0, w1


@functools.lru_cache(maxsize=128)
def matches_pytorch(
    in_size: tuple[int, int], out_size: tuple[int, int], kernel: Callable[[Tensor, tuple[int, int]], Tensor]
) -> bool:
    """Whether ``kernel(maps, out_size)`` resizes ``[N, *in_size]`` maps exactly as
    ``F.interpolate`` does here, tried on random values. Sizes equal along an axis are left
    to PyTorch, which copies there."""
    if in_size[0] == out_size[0] or in_size[1] == out_size[1]:
        return False
    probe = torch.rand(2, *in_size, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(probe[None], size=out_size, mode="bilinear", align_corners=False)[0]
    return torch.equal(kernel(probe, out_size), expected)


if numba is not None:

    @numba.njit(parallel=True, cache=True)
    def _resize(maps, rows0, rows1, row_w0, row_w1, cols0, cols1, col_w0, col_w1, out):  # pragma: no cover
        count, in_height, _ = maps.shape
        height, width = out.shape[1], out.shape[2]
        along = np.empty((count, in_height, width), dtype=np.float32)
        for item in numba.prange(count * in_height):
            source, target = maps[item // in_height, item % in_height], along[item // in_height, item % in_height]
            for x in range(width):
                target[x] = fma32(source[cols0[x]], col_w0[x], source[cols1[x]] * col_w1[x])
        for item in numba.prange(count * height):
            j, y = item // height, item % height
            upper, lower, w0, w1, target = along[j, rows0[y]], along[j, rows1[y]], row_w0[y], row_w1[y], out[j, y]
            for x in range(width):
                target[x] = fma32(upper[x], w0, lower[x] * w1)
