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

With numba installed (a dependency wherever it has wheels), a compiled loop does the same
sampling for each query and head in one pass instead (no index or weight tensors: about 4x
faster on Swin-T's pixel decoder); it sums the same terms in another order, so results agree
to float rounding. In training a second compiled loop gives the gradients (for the values,
the locations and the attention weights) in one pass too, where ``embedding_bag``'s backward
sorts every row index. Under CPU autocast the sampling runs in float32: bfloat16 locations
would be a quarter of a pixel apart on a 64-pixel map.

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
    if value.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        value, pixel_locations, attention_weights = value.float(), pixel_locations.float(), attention_weights.float()
    if kernels_apply(
        value, pixel_locations, attention_weights, dtypes=(torch.float32, torch.float64), differentiable=True
    ):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (value, pixel_locations, attention_weights)):
            return _CompiledSampling.apply(value, tuple(spatial_shapes), pixel_locations, attention_weights)
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
    output = value.new_empty(batch, pixel_locations.shape[1], heads, head_dim)
    _sample(
        # Head-major: one head's maps (S * D values, 0.5 MB for Swin-T at 384x512) stay in
        # cache while the queries sample them (10% faster than position-major).
        value.transpose(1, 2).contiguous().numpy(),
        *_level_sizes_and_starts(spatial_shapes),
        pixel_locations.contiguous().numpy(),
        attention_weights.contiguous().numpy(),
        output.numpy(),
    )
    return output.flatten(2)


def _level_sizes_and_starts(spatial_shapes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``[L, 2]`` (height, width) of the levels and ``[L]`` their first positions in ``value``."""
    sizes = np.array(spatial_shapes, dtype=np.int64).reshape(-1, 2)
    return sizes, np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])[:-1]])


class _CompiledSampling(torch.autograd.Function):
    """The numba kernels as an autograd function: training's forward and backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        value: Tensor,
        spatial_shapes: tuple[tuple[int, int], ...],
        pixel_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        ctx.spatial_shapes = spatial_shapes
        ctx.save_for_backward(value, pixel_locations, attention_weights)
        return _compiled_sampling(value, spatial_shapes, pixel_locations, attention_weights)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        value, pixel_locations, attention_weights = ctx.saved_tensors
        use_torch_threads()
        batch, _, heads, head_dim = value.shape
        grad_value = value.new_zeros(batch, heads, value.shape[1], head_dim)  # head-major, as the kernel reads
        grad_locations = torch.zeros_like(pixel_locations, memory_format=torch.contiguous_format)
        grad_weights = torch.zeros_like(attention_weights, memory_format=torch.contiguous_format)
        _sample_backward(
            value.transpose(1, 2).contiguous().numpy(),
            *_level_sizes_and_starts(ctx.spatial_shapes),
            pixel_locations.contiguous().numpy(),
            attention_weights.contiguous().numpy(),
            grad_output.reshape(batch, -1, heads, head_dim).contiguous().numpy(),
            grad_value.numpy(),
            grad_locations.numpy(),
            grad_weights.numpy(),
        )
        return grad_value.transpose(1, 2), None, grad_locations, grad_weights


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
                        if not _on_map(x, y, height, width):
                            continue
                        col, row, fx, fy = _corner(x, y)
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

    @numba.njit(parallel=True, cache=True)
    def _sample_backward(
        value, sizes, starts, locations, weights, grad_output, grad_value, grad_locations, grad_weights
    ):  # pragma: no cover - compiled
        """Gradients of ``_sample``: ``grad_value`` ``[B, H, S, D]`` (head-major, zeroed),
        ``grad_locations`` ``[B, Q, H, L, P, 2]`` and ``grad_weights`` ``[B, Q, H, L, P]`` (zeroed).
        A work item is one image's head: it alone writes that head's value gradients."""
        batch, heads, _, head_dim = value.shape
        num_queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
        for item in numba.prange(batch * heads):
            b, h = item // heads, item % heads
            maps, grad_maps = value[b, h], grad_value[b, h]
            for q in range(num_queries):
                upstream = grad_output[b, q, h]
                for level in range(levels):
                    height, width, start = sizes[level, 0], sizes[level, 1], starts[level]
                    for p in range(points):
                        x, y = locations[b, q, h, level, p, 0], locations[b, q, h, level, p, 1]
                        if not _on_map(x, y, height, width):
                            continue
                        col, row, fx, fy = _corner(x, y)
                        attention = weights[b, q, h, level, p]
                        pixel = start + row * width + col
                        # The upstream gradient's dot product with each neighbour (0 outside
                        # the map), and each neighbour's share of the upstream gradient.
                        d00 = d01 = d10 = d11 = 0.0
                        if row >= 0:
                            if col >= 0:
                                d00 = _dot(upstream, maps[pixel])
                                _accumulate(grad_maps[pixel], attention * (1 - fx) * (1 - fy), upstream)
                            if col + 1 < width:
                                d01 = _dot(upstream, maps[pixel + 1])
                                _accumulate(grad_maps[pixel + 1], attention * fx * (1 - fy), upstream)
                        if row + 1 < height:
                            if col >= 0:
                                d10 = _dot(upstream, maps[pixel + width])
                                _accumulate(grad_maps[pixel + width], attention * (1 - fx) * fy, upstream)
                            if col + 1 < width:
                                d11 = _dot(upstream, maps[pixel + width + 1])
                                _accumulate(grad_maps[pixel + width + 1], attention * fx * fy, upstream)
                        grad_weights[b, q, h, level, p] = (1 - fy) * ((1 - fx) * d00 + fx * d01) + fy * (
                            (1 - fx) * d10 + fx * d11
                        )
                        grad_locations[b, q, h, level, p, 0] = attention * ((1 - fy) * (d01 - d00) + fy * (d11 - d10))
                        grad_locations[b, q, h, level, p, 1] = attention * ((1 - fx) * (d10 - d00) + fx * (d11 - d01))

    @numba.njit(inline="always")
    def _on_map(x, y, height, width):  # pragma: no cover - compiled
        """Whether a sample at pixel coordinates (x, y) reads any pixel of the map: False when
        all four neighbours are outside (the sample is zero), and for NaN."""
        return x > -1.0 and x < width and y > -1.0 and y < height

    @numba.njit(inline="always")
    def _corner(x, y):  # pragma: no cover - compiled
        """The top-left neighbour's column and row, and the fractions towards the next ones."""
        left, top_row = np.floor(x), np.floor(y)
        return int(left), int(top_row), x - left, y - top_row

    @numba.njit(inline="always")
    def _accumulate(total, weight, values):  # pragma: no cover - compiled
        for d in range(total.shape[0]):
            total[d] += weight * values[d]

    @numba.njit(inline="always")
    def _dot(a, b):  # pragma: no cover - compiled
        total = 0.0
        for d in range(a.shape[0]):
            total += a[d] * b[d]
        return total
