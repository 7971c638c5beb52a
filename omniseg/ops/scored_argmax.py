"""Per pixel, the first of several maps with the highest score x value, in one compiled pass.

Panoptic post-processing resizes each query's mask probabilities to the image, gives each
pixel to the query with the highest ``score x probability`` (``argmax`` over the queries, the
first on ties, the first NaN if any) and counts, per query, the pixels where that product
reaches the mask threshold. With PyTorch operations that is a resize and several passes over
each chunk of full-size maps (scale, maximum, equality, ranks, merge, counts), each bound by
memory speed. Compiled with numba (the ``fast`` extra) it is one pass per band of output
rows that never writes the resized maps: the same numbers. The products are the same float32
multiplications, the comparisons exact, and the bilinear resize is PyTorch's arithmetic,
computed separably (see :mod:`omniseg.ops.bilinear`, whose check this kernel passes too before
it resizes: where it does not, PyTorch resizes and the kernel only reduces).

Without numba :func:`available` is False and callers keep their PyTorch path.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.ops import bilinear
from omniseg.ops._numba import fma32, kernels_apply, numba, use_torch_threads


def available(maps: Tensor) -> bool:
    """Whether :func:`update` can reduce maps like ``maps`` (see ``kernels_apply``)."""
    return kernels_apply(maps)


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
    if tuple(maps.shape[1:]) != size and not bilinear.matches_pytorch(tuple(maps.shape[1:]), size, _resized):
        maps = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    row_areas = torch.empty(size[0], k, dtype=torch.int64)
    _reduce(
        maps.detach().contiguous().numpy(),
        *bilinear.taps(maps.shape[1], size[0]),
        *bilinear.taps(maps.shape[2], size[1]),
        scores.detach().to(torch.float32).contiguous().numpy(),
        start,
        np.float32(threshold),  # compared in float32, as PyTorch compares a float32 map with a Python float
        best.numpy(),
        owner.numpy(),
        row_areas.numpy(),
    )
    areas[start : start + k] = row_areas.sum(0)


def _resized(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Each map resized by the reduction kernel (alone, with score 1: the running maximum is
    the map), for :func:`~omniseg.ops.bilinear.matches_pytorch`."""
    resized = torch.empty(maps.shape[0], *size)
    for j in range(maps.shape[0]):
        _reduce(
            maps[j : j + 1].contiguous().numpy(),
            *bilinear.taps(maps.shape[1], size[0]),
            *bilinear.taps(maps.shape[2], size[1]),
            np.ones(1, dtype=np.float32),
            0,
            np.float32(2.0),
            resized[j].numpy(),
            np.empty(size, dtype=np.int64),
            np.empty((size[0], 1), dtype=np.int64),
        )
    return resized


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
