"""Per pixel, the first of several maps with the highest score x value, in one compiled pass.

Panoptic post-processing resizes each query's mask probabilities to the image, gives each
pixel to the query with the highest ``score x probability`` (``argmax`` over the queries, the
first on ties, the first NaN if any) and counts, per query, the pixels where that product
reaches the mask threshold. With PyTorch operations that is a resize and several passes over
each chunk of full-size maps (scale, maximum, equality, ranks, merge, counts), each bound by
memory speed. Compiled with numba (the ``fast`` extra) it is one pass per band of output
rows that never writes the resized maps: the same numbers. The products are the same float32
multiplications, the comparisons exact, and the bilinear resize is PyTorch's arithmetic
(``align_corners=False``: source positions ``fma(scale, x + 0.5, -0.5)``, then ``fma(a, w0,
b * w1)`` along rows and the same down columns), computed separably: each source row is
resized along once, not once per output row. That it equals PyTorch's own resize bit for bit
is checked on this machine, once per pair of sizes, before it is used (:func:`_exact_resize`);
where it does not, PyTorch resizes and the kernel only reduces. (With torch 2.13 on x86-64 it
matches for image-sized outputs, 61x83 to 1080x1920 from 384x384, and not for some small
ones such as 25x31, which PyTorch computes another way.)

Without numba :func:`available` is False and callers keep their PyTorch path.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.ops._numba import fma32, numba, use_torch_threads


def available(maps: Tensor) -> bool:
    """Whether :func:`update` can reduce maps like ``maps`` (numba installed, float32 on CPU)."""
    return numba is not None and maps.device.type == "cpu" and maps.dtype == torch.float32


def update(
    maps: Tensor,
    scores: Tensor,
    start: int,
    threshold: float,
    best: Tensor,
    owner: Tensor,
    areas: Tensor,
) -> None:
    """Fold maps ``start .. start + k - 1``, resized to ``best``'s size, into the running
    per-pixel winner.

    Args:
        maps: ``[k, h, w]`` float32 values (probabilities), not yet scaled; resized to
            ``[H, W]`` as ``F.interpolate(..., mode="bilinear", align_corners=False)`` does
            when ``(h, w) != (H, W)``.
        scores: ``[k]`` float32 score of each map.
        start: index of the first of these maps; 0 starts a new reduction (``best`` and
            ``owner`` are then overwritten, not read).
        threshold: a map's area counts its pixels with ``score x value >= threshold``.
        best: ``[H, W]`` float32, the running maximum (updated in place).
        owner: ``[H, W]`` int64, the index of the map holding it (updated in place).
        areas: ``[count]`` int64, per map (entries ``start .. start + k - 1`` are written).
    """
    use_torch_threads()
    k, size = maps.shape[0], tuple(best.shape)
    if tuple(maps.shape[1:]) != size and not _exact_resize(tuple(maps.shape[1:]), size):
        maps = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    row_areas = torch.empty(size[0], k, dtype=torch.int64)
    _reduce(
        maps.detach().contiguous().numpy(),
        *_taps(maps.shape[1], size[0]),
        *_taps(maps.shape[2], size[1]),
        scores.detach().to(torch.float32).contiguous().numpy(),
        start,
        np.float32(threshold),  # compared in float32, as PyTorch compares a float32 map with a Python float
        best.numpy(),
        owner.numpy(),
        row_areas.numpy(),
    )
    areas[start : start + k] = row_areas.sum(0)


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear source indices ``first, second`` (int64) and float32 weights
    ``w0, w1`` (``align_corners=False``) for each of ``out_size`` outputs; the identity
    (``w0 = 1, w1 = 0``) when the sizes are equal."""
    scale = np.float32(in_size) / np.float32(out_size)
    outputs = np.arange(out_size, dtype=np.float64)
    # fma(scale, x + 0.5, -0.5) rounded once: exact in float64, whose 53 bits hold the product.
    position = np.maximum((np.float64(scale) * (outputs + 0.5) - 0.5).astype(np.float32), np.float32(0))
    first = position.astype(np.int64)
    second = np.where(first < in_size - 1, first + 1, first)
    w1 = np.minimum(position - first.astype(np.float32), np.float32(1)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    return first, second, w0, w1


@functools.lru_cache(maxsize=64)
def _exact_resize(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether the kernel's resize from ``in_size`` to ``out_size`` equals PyTorch's here, bit
    for bit, on random values (PyTorch's kernel is plain C++: how the compiler fused its
    multiply-adds decides its last bits). Equal sizes along an axis are left to PyTorch,
    which copies there."""
    if in_size[0] == out_size[0] or in_size[1] == out_size[1]:
        return False
    probe = torch.rand(1, *in_size, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(probe[None], size=out_size, mode="bilinear", align_corners=False)[0, 0]
    resized = torch.empty(out_size)
    _reduce(
        probe.numpy(),
        *_taps(in_size[0], out_size[0]),
        *_taps(in_size[1], out_size[1]),
        np.ones(1, dtype=np.float32),
        0,
        np.float32(2.0),
        resized.numpy(),
        np.empty(out_size, dtype=np.int64),
        np.empty((out_size[0], 1), dtype=np.int64),
    )
    return torch.equal(resized, expected)


# Output rows per parallel work item: the block's source rows, resized along, stay in cache.
_BLOCK_ROWS = 16

if numba is not None:

    @numba.njit(parallel=True, cache=True)
    def _reduce(  # pragma: no cover - compiled
        maps, rows0, rows1, row_w0, row_w1, cols0, cols1, col_w0, col_w1,
        scores, start, threshold, best, owner, row_areas,
    ):
        k = maps.shape[0]
        height, width = best.shape
        resize = maps.shape[1] != height or maps.shape[2] != width
        for block in numba.prange((height + _BLOCK_ROWS - 1) // _BLOCK_ROWS):
            top, bottom = block * _BLOCK_ROWS, min((block + 1) * _BLOCK_ROWS, height)
            low, high = rows0[top], rows1[bottom - 1]
            along = np.empty((high - low + 1, width), dtype=np.float32)
            for j in range(k):
                if resize:
                    for r in range(low, high + 1):
                        source, target = maps[j, r], along[r - low]
                        for x in range(width):
                            target[x] = fma32(source[cols0[x]], col_w0[x], source[cols1[x]] * col_w1[x])
                score, index = scores[j], start + j
                for y in range(top, bottom):
                    best_row, owner_row, area = best[y], owner[y], 0
                    if resize:
                        upper, lower, w0, w1 = along[rows0[y] - low], along[rows1[y] - low], row_w0[y], row_w1[y]
                    else:
                        upper, lower, w0, w1 = maps[j, y], maps[j, y], np.float32(1), np.float32(0)
                    for x in range(width):
                        value = (fma32(upper[x], w0, lower[x] * w1) if resize else upper[x]) * score
                        held = best_row[x]
                        # Strictly greater: on ties the earlier map keeps the pixel. A NaN
                        # takes the pixel from a number and keeps it (argmax's first NaN).
                        take = (start == 0 and j == 0) | (value > held) | ((value != value) & (held == held))
                        best_row[x] = value if take else held
                        owner_row[x] = index if take else owner_row[x]
                        area += value >= threshold
                    row_areas[y, j] = area
