"""Per pixel, the first of several maps with the highest score x value, in one compiled pass.

Panoptic post-processing gives each pixel to the query with the highest ``score x mask
probability`` (``argmax`` over the queries, the first on ties, the first NaN if any) and
counts, per query, the pixels where that product reaches the mask threshold. With PyTorch
operations that is several passes over each chunk of full-size maps (scale, maximum,
equality, ranks, merge, counts), each bound by memory speed. Compiled with numba (the
``fast`` extra) it is one pass that reads each map once: the same numbers, as the products
are the same float32 multiplications and the comparisons exact.

Without numba :func:`available` is False and callers keep their PyTorch path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from omniseg.ops._numba import numba, use_torch_threads


def available(maps: Tensor) -> bool:
    """Whether :func:`update` can reduce maps like ``maps`` (numba installed, float32 on CPU)."""
    return numba is not None and maps.device.type == "cpu" and maps.dtype == torch.float32


def update(
    maps: Tensor, scores: Tensor, start: int, threshold: float, best: Tensor, owner: Tensor, areas: Tensor
) -> None:
    """Fold maps ``start .. start + k - 1`` into the running per-pixel winner.

    Args:
        maps: ``[k, H, W]`` float32 values (probabilities), not yet scaled.
        scores: ``[k]`` float32 score of each map.
        start: index of the first of these maps; 0 starts a new reduction (``best`` and
            ``owner`` are then overwritten, not read).
        threshold: a map's area counts its pixels with ``score x value >= threshold``.
        best: ``[H, W]`` float32, the running maximum (updated in place).
        owner: ``[H, W]`` int64, the index of the map holding it (updated in place).
        areas: ``[count]`` int64, per map (entries ``start .. start + k - 1`` are written).
    """
    use_torch_threads()
    k = maps.shape[0]
    row_areas = torch.empty(maps.shape[1], k, dtype=torch.int64)
    _reduce(
        maps.detach().contiguous().numpy(),
        scores.detach().to(torch.float32).contiguous().numpy(),
        start,
        np.float32(threshold),  # compared in float32, as PyTorch compares a float32 map with a Python float
        best.numpy(),
        owner.numpy(),
        row_areas.numpy(),
    )
    areas[start : start + k] = row_areas.sum(0)


if numba is not None:

    @numba.njit(parallel=True, cache=True)
    def _reduce(maps, scores, start, threshold, best, owner, row_areas):  # pragma: no cover - compiled
        k, height, width = maps.shape
        for y in numba.prange(height):
            best_row, owner_row = best[y], owner[y]
            for j in range(k):
                row, score, index, area = maps[j, y], scores[j], start + j, 0
                if start == 0 and j == 0:
                    for x in range(width):
                        value = row[x] * score
                        best_row[x] = value
                        owner_row[x] = index
                        area += value >= threshold
                else:
                    for x in range(width):
                        value, held = row[x] * score, best_row[x]
                        # Strictly greater: on ties the earlier map keeps the pixel. A NaN
                        # takes the pixel from a number and keeps it (argmax's first NaN).
                        take = (value > held) | ((value != value) & (held == held))
                        best_row[x] = value if take else held
                        owner_row[x] = index if take else owner_row[x]
                        area += value >= threshold
                row_areas[y, j] = area
