"""Multi-scale deformable attention (Deformable DETR), the core sampling step, in pure PyTorch.

Each query attends to a few sampled points per head and feature level; a point's value is
read from the level's feature map by bilinear interpolation (``align_corners=False``,
zeros outside the map), and the points' values are summed with the query's attention
weights. This is what the reference computes with one ``grid_sample`` per level.

Here the interpolation and the weighted sum are one sparse read per level: every sampled
point contributes its four neighbouring pixels, each with weight ``attention * bilinear
weight`` (zero when the pixel lies outside the map), and ``F.embedding_bag`` with
``per_sample_weights`` gathers and sums those rows of the flattened values without
materialising the sampled values. The values are read in place in their ``[B, S, H, D]``
layout and the result comes out as ``[B, Q, H * D]``, with no permutes; the per-level loop
keeps the index arithmetic on contiguous tensors with scalar operands, which is where the
time would otherwise go. Gradients flow to the values, the attention weights and (through
the bilinear weights) the sampling locations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
    batch, seq_len, heads, head_dim = value.shape
    num_queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    table = value.reshape(batch * seq_len * heads, head_dim)  # row (b * S + s) * H + h
    # Row of position s = 0 for each (batch, head): [B, 1, H, 1] against [B, Q, H, P].
    batch_head_rows = (
        torch.arange(batch, device=value.device).view(batch, 1, 1, 1) * (seq_len * heads)
        + torch.arange(heads, device=value.device).view(1, 1, heads, 1)
    )
    output = None
    level_start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # Pixel coordinates with pixel centres at integers (align_corners=False); the
        # sample lies between columns x0, x0 + 1 and rows y0, y0 + 1.
        x = sampling_locations[:, :, :, level, :, 0] * width - 0.5  # [B, Q, H, P]
        y = sampling_locations[:, :, :, level, :, 1] * height - 0.5
        x0 = x.floor()
        y0 = y.floor()
        fx = x - x0
        fy = y - y0
        # Bilinear weights, zero for neighbours outside the map (zero padding); the
        # attention weight is folded into the row weights.
        attention = attention_weights[:, :, :, level]
        wx0 = (1 - fx) * ((x0 >= 0) & (x0 < width))
        wx1 = fx * ((x0 >= -1) & (x0 < width - 1))
        wy0 = (1 - fy) * ((y0 >= 0) & (y0 < height)) * attention
        wy1 = fy * ((y0 >= -1) & (y0 < height - 1)) * attention
        weights = torch.stack((wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1), dim=-2)  # [B, Q, H, 4, P]

        # Rows of the four neighbours in ``table``. A neighbour outside the map may point
        # at another pixel, or past the table's ends (hence the clamp): its weight is zero.
        top_left = batch_head_rows + (level_start + y0.long() * width + x0.long()) * heads
        rows = torch.stack(
            (top_left, top_left + heads, top_left + width * heads, top_left + (width + 1) * heads), dim=-2
        ).clamp_(0, table.shape[0] - 1)

        sampled = F.embedding_bag(
            rows.view(-1, points * 4),
            table,
            per_sample_weights=weights.view(-1, points * 4).to(value.dtype),
            mode="sum",
        )  # [B * Q * H, D]
        output = sampled if output is None else output + sampled
        level_start += height * width
    return output.view(batch, num_queries, heads * head_dim)
