"""Multi-scale deformable attention (Deformable DETR), the core sampling step, in pure PyTorch.

Each query attends to a few sampled points per head and feature level; a point's value is
read from the level's feature map by bilinear interpolation (``align_corners=False``,
zeros outside the map), and the points' values are summed with the query's attention
weights. This is what the reference computes with one ``grid_sample`` per level.

Here the interpolation and the weighted sum are one fused sparse read: every sampled point
contributes its four neighbouring pixels, each with weight ``attention * bilinear weight``
(zero when the pixel lies outside the map), and ``F.embedding_bag`` with
``per_sample_weights`` gathers and sums those rows of the flattened values without
materialising the sampled values. The values are read in place in their ``[B, S, H, D]``
layout, and the result comes out in ``[B, Q, H * D]`` with no permutes. Gradients flow to the
values, the attention weights and (through the bilinear weights) the sampling locations.
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
    num_queries = sampling_locations.shape[1]
    device, dtype = value.device, sampling_locations.dtype

    # Per-level constants, shaped [L, 1] to broadcast against [B, Q, H, L, P].
    sizes = torch.tensor(spatial_shapes, device=device, dtype=dtype)
    heights, widths = sizes[:, :1], sizes[:, 1:]
    level_starts = torch.cumsum(heights * widths, 0) - heights * widths

    # Pixel coordinates with pixel centres at integers (align_corners=False); the sample
    # lies between columns x0, x0 + 1 and rows y0, y0 + 1.
    x = sampling_locations[..., 0] * widths - 0.5  # [B, Q, H, L, P]
    y = sampling_locations[..., 1] * heights - 0.5
    x0 = x.floor()
    y0 = y.floor()
    fx = x - x0
    fy = y - y0
    # Bilinear weights, zero for neighbours outside the map (zero padding).
    wx0 = (1 - fx) * ((x0 >= 0) & (x0 < widths))
    wx1 = fx * ((x0 >= -1) & (x0 < widths - 1))
    wy0 = (1 - fy) * ((y0 >= 0) & (y0 < heights))
    wy1 = fy * ((y0 >= -1) & (y0 < heights - 1))
    weights = torch.stack((wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1), dim=-1)
    weights = weights * attention_weights[..., None]  # [B, Q, H, L, P, 4]

    # Row of each neighbour in ``value`` viewed as [B * S * H, D]: ((b * S + s) * H + h),
    # with s = level start + row * width + column (exact in floating point for any
    # realistic S). The neighbours of (x0, y0) are 1 column and ``width`` positions away.
    # A neighbour outside the map may point at another pixel, or past the ends (hence the
    # clamp): its weight is zero, so it adds nothing.
    position = (level_starts + y0 * widths + x0).long()
    batch_offset = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1) * seq_len
    head_offset = torch.arange(heads, device=device).view(1, 1, heads, 1, 1)
    rows = (batch_offset + position) * heads + head_offset  # [B, Q, H, L, P]
    neighbour_offsets = (
        torch.tensor([0, 1], device=device).repeat(2) + widths.long() * torch.tensor([0, 0, 1, 1], device=device)
    ) * heads  # [L, 4]
    rows = (rows[..., None] + neighbour_offsets[:, None, :]).clamp_(0, batch * seq_len * heads - 1)

    points_per_query = weights[0, 0, 0].numel()  # L * P * 4
    output = F.embedding_bag(
        rows.view(-1, points_per_query),
        value.reshape(-1, head_dim),
        per_sample_weights=weights.reshape(-1, points_per_query).to(value.dtype),
        mode="sum",
    )
    return output.view(batch, num_queries, heads * head_dim)
