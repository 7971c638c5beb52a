"""Multi-scale deformable attention (Deformable DETR), the core sampling step, in pure PyTorch.

Each query attends to a few sampled points per head and feature level; a point's value is
read from the level's feature map by bilinear interpolation (``align_corners=False``,
zeros outside the map), and the points' values are summed with the query's attention
weights. This is what the reference computes with one ``grid_sample`` per level.

Here the interpolation and the weighted sum are one sparse read for all levels: every
sampled point contributes its four neighbouring pixels, each with weight ``attention *
bilinear weight``, and ``F.embedding_bag`` with ``per_sample_weights`` gathers and sums
those rows of the values without materialising the sampled values. Each level is copied
once into a table with a one-pixel zero border, so a sample's coordinates only need
clamping to the border: neighbours outside the map then read zeros, with no per-neighbour
validity masks. The index and weight arithmetic runs on all levels at once.

At inference, with numba installed (the ``fast`` extra), a compiled loop does the same
sampling for each query and head in one pass instead (no index or weight tensors: about 4x
faster on Swin-T's pixel decoder); it sums the same terms in another order, so results agree
to float rounding.

Speed notes (CPU): elementwise ops that broadcast a small per-level tensor such as
``[L, 1]`` over ``[..., L, P]`` run an order of magnitude slower than same-shape ones
(the innermost loop is only P long), so per-level constants are expanded to the full
``[heads, L, P]`` trailing shape once, and the four neighbours are stacked on a dimension
outside ``(L, P)``. Gradients flow to the values, the attention weights and (through the
bilinear weights) the sampling locations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.ops._numba import kernels_apply, numba, use_torch_threads


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample multi-scale values at fractional locations and sum them with attention weights.

    Args:
        value: ``[B, S, H, D]`` values of all levels, flattened row-major per level and
            concatenated, ``S = sum(h * w for h, w in spatial_shapes)``; H heads of size D.
        spatial_shapes: ``(height, width)`` of each of the L levels, in the order of ``value``.
        sampling_locations: ``[B, Q, H, L, P, 2]`` (x, y) locations normalised to [0, 1]
            per level (0 and 1 are the outer edges of the border pixels).
        attention_weights: ``[B, Q, H, L, P]`` weight of each sampled point.

    Returns:
        ``[B, Q, H * D]``: for each query, the heads' weighted sums, concatenated.
    """
    sizes = sampling_locations.new_tensor([(w, h) for h, w in spatial_shapes])  # [L, 2]
    pixels = sampling_locations * sizes[:, None, :] - 0.5
    return deformable_sampling(value, spatial_shapes, pixels, attention_weights)


def deformable_sampling(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    pixel_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """:func:`multi_scale_deformable_attention` with locations in pixels of each level.

    Args:
        value: ``[B, S, H, D]``, as in :func:`multi_scale_deformable_attention`.
        spatial_shapes: ``(height, width)`` of each of the L levels.
        pixel_locations: ``[B, Q, H, L, P, 2]`` (x, y) of each sample on its level, pixel
            centres at integers (``normalised * size - 0.5``, as ``align_corners=False``).
        attention_weights: ``[B, Q, H, L, P]``.

    Returns:
        ``[B, Q, H * D]``.
    """
    if kernels_apply(value, pixel_locations, attention_weights, dtypes=(torch.float32, torch.float64)):
        return _compiled_sampling(value, spatial_shapes, pixel_locations, attention_weights)
    batch, _, heads, head_dim = value.shape
    num_queries, points = pixel_locations.shape[1], pixel_locations.shape[4]
    table = _bordered_table(value, spatial_shapes)
    index_dtype = torch.int32 if table.shape[0] < 2**31 else torch.int64
    level = _LevelConstants(spatial_shapes, heads, points, value.dtype, index_dtype, value.device)

    # Coordinates in the bordered maps (a map's pixel (0, 0) is at (1, 1)). Clamping to the
    # border is exact: a sample beyond it has all its weight on zeros either way.
    zero = value.new_zeros(())
    u = torch.clamp(pixel_locations[..., 0] + 1, zero, level.max_u)  # [B, Q, H, L, P]
    v = torch.clamp(pixel_locations[..., 1] + 1, zero, level.max_v)
    u0 = u.to(index_dtype)  # truncation is floor here: u, v >= 0
    v0 = v.to(index_dtype)
    fx = u - u0
    fy = v - v0

    # The four neighbours, stacked as [B, Q, H, 4, L, P] in the order (top-left,
    # top-right, bottom-left, bottom-right): rows of the table, and bilinear weights
    # times the attention weight.
    rows_per_image = table.shape[0] // batch
    top_left = (v0 * level.padded_width + u0) * heads + level.first_row  # [B, Q, H, L, P]
    if batch > 1:
        image_rows = torch.arange(batch, device=value.device, dtype=index_dtype) * rows_per_image
        top_left = top_left + image_rows.view(batch, 1, 1, 1, 1)
    rows = torch.stack(
        (top_left, top_left + heads, top_left + level.row_stride, top_left + level.row_stride + heads), dim=3
    )
    bottom = fy * attention_weights
    top = attention_weights - bottom
    top_right = top * fx
    bottom_right = bottom * fx
    weights = torch.stack((top - top_right, top_right, bottom - bottom_right, bottom_right), dim=3)

    bag = rows[0, 0, 0].numel()  # 4 * L * P neighbours per (image, query, head)
    output = F.embedding_bag(
        rows.view(-1, bag), table, per_sample_weights=weights.view(-1, bag), mode="sum"
    )  # [B * Q * H, D]
    return output.view(batch, num_queries, heads * head_dim)


def _bordered_table(value: Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> Tensor:
    """The values of every level with a one-pixel zero border, as one table of rows.

    Args:
        value: ``[B, S, H, D]``.

    Returns:
        ``[B * R * H, D]``: row ``(b * R + s) * H + h`` holds head ``h`` of position ``s``
        of image ``b``, where ``s`` runs over the bordered ``(h + 2) x (w + 2)`` maps
        (row-major, concatenated) and then ``w_last + 3`` spare zero rows: the right and
        bottom neighbours of a sample clamped to the last map's bottom-right border,
        read with weight 0.
    """
    batch, _, heads, head_dim = value.shape
    bordered = [(h + 2) * (w + 2) for h, w in spatial_shapes]
    spare = spatial_shapes[-1][1] + 3
    table = value.new_zeros(batch, sum(bordered) + spare, heads, head_dim)
    start = source = 0
    for (height, width), size in zip(spatial_shapes, bordered):
        inner = table[:, start : start + size].view(batch, height + 2, width + 2, heads, head_dim)
        inner[:, 1:-1, 1:-1] = value[:, source : source + height * width].view(batch, height, width, heads, head_dim)
        start += size
        source += height * width
    return table.view(-1, head_dim)


class _LevelConstants:
    """Per-level sizes for :func:`deformable_sampling`, expanded to ``[H, L, P]`` (see the
    module docstring for why).

    Attributes:
        max_u, max_v: the bordered maps' last column / row, ``w + 1`` and ``h + 1``.
        padded_width: ``w + 2``.
        first_row: table row of head ``h`` at the level's first bordered position.
        row_stride: table rows between vertically adjacent pixels, ``(w + 2) * H``.
    """

    def __init__(
        self,
        spatial_shapes: Sequence[tuple[int, int]],
        heads: int,
        points: int,
        dtype: torch.dtype,
        index_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        levels = len(spatial_shapes)

        def expand(per_level: list[int], dtype: torch.dtype) -> Tensor:
            values = torch.tensor(per_level, dtype=dtype, device=device)
            return values.view(1, levels, 1).expand(heads, levels, points).contiguous()

        widths = [w for _, w in spatial_shapes]
        starts = [0]
        for height, width in spatial_shapes[:-1]:
            starts.append(starts[-1] + (height + 2) * (width + 2))
        self.max_u = expand([w + 1 for w in widths], dtype)
        self.max_v = expand([h + 1 for h, _ in spatial_shapes], dtype)
        self.padded_width = expand([w + 2 for w in widths], index_dtype)
        head = torch.arange(heads, dtype=index_dtype, device=device).view(heads, 1, 1)
        self.first_row = expand(starts, index_dtype) * heads + head
        self.row_stride = self.padded_width * heads


def _compiled_sampling(
    value: Tensor, spatial_shapes: Sequence[tuple[int, int]], pixel_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """:func:`deformable_sampling` by the numba kernel: ``[B, S, H, D]`` values -> ``[B, Q, H * D]``."""
    use_torch_threads()
    batch, _, heads, head_dim = value.shape
    sizes = np.array(spatial_shapes, dtype=np.int64).reshape(-1, 2)
    starts = np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])[:-1]])
    output = value.new_empty(batch, pixel_locations.shape[1], heads, head_dim)
    _sample(
        # Head-major: one head's maps (S * D values, 0.5 MB for Swin-T at 384x512) stay in
        # cache while the queries sample them (10% faster than position-major).
        value.transpose(1, 2).contiguous().numpy(),
        sizes,
        starts,
        pixel_locations.contiguous().numpy(),
        attention_weights.contiguous().numpy(),
        output.numpy(),
    )
    return output.flatten(2)


# Queries per parallel work item of the kernel (each item samples one head's maps).
_QUERY_BLOCK = 64

if numba is not None:

    @numba.njit(parallel=True, cache=True)
    def _sample(value, sizes, starts, locations, weights, output):  # pragma: no cover - compiled
        batch, heads, _, head_dim = value.shape
        num_queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
        blocks = (num_queries + _QUERY_BLOCK - 1) // _QUERY_BLOCK
        for item in numba.prange(batch * heads * blocks):
            b, h, block = item // (heads * blocks), (item // blocks) % heads, item % blocks
            maps = value[b, h]  # [S, D]
            for q in range(block * _QUERY_BLOCK, min((block + 1) * _QUERY_BLOCK, num_queries)):
                total = output[b, q, h]
                total[:] = 0.0
                for level in range(levels):
                    height, width, start = sizes[level, 0], sizes[level, 1], starts[level]
                    for p in range(points):
                        x, y = locations[b, q, h, level, p, 0], locations[b, q, h, level, p, 1]
                        # All four neighbours outside the map (NaN too): the sample is zero.
                        if not (x > -1.0 and x < width and y > -1.0 and y < height):
                            continue
                        left, top_row = np.floor(x), np.floor(y)
                        fx, fy = x - left, y - top_row
                        col, row = int(left), int(top_row)
                        attention = weights[b, q, h, level, p]
                        bottom = fy * attention
                        top = attention - bottom
                        top_right, bottom_right = top * fx, bottom * fx
                        pixel = start + row * width + col
                        if row >= 0:
                            if col >= 0:
                                _accumulate(total, top - top_right, maps[pixel])
                            if col + 1 < width:
                                _accumulate(total, top_right, maps[pixel + 1])
                        if row + 1 < height:
                            if col >= 0:
                                _accumulate(total, bottom - bottom_right, maps[pixel + width])
                            if col + 1 < width:
                                _accumulate(total, bottom_right, maps[pixel + width + 1])

    @numba.njit(inline="always")
    def _accumulate(total, weight, values):  # pragma: no cover - compiled
        for d in range(total.shape[0]):
            total[d] += weight * values[d]
