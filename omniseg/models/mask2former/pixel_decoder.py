"""Mask2Former's pixel decoder: multi-scale deformable-attention encoder plus a light FPN.

The three lowest-resolution backbone maps (strides 32, 16, 8) are projected to
``feature_size`` channels, flattened into one sequence and refined by a stack of
multi-scale deformable self-attention layers (encoder only, Deformable DETR style). The
result feeds the transformer decoder (one map per level) and, through FPN lateral and
output convolutions on the higher-resolution backbone maps, the stride-4 pixel features
(whose 1x1 ``mask_projection`` gives the mask features; the transformer decoder's mask
head applies it, folded into its query embeddings).

Inside the encoder, features travel as sequences ``[B, S, C]`` (all levels concatenated,
each level row-major). Maps ``[B, C, H, W]`` are kept in channels-last memory, the layout
of those sequences and of the backbone's outputs: a level's sequence is a map without a
copy, 1x1 convolutions are matmuls over channels, and PyTorch's CPU convolution, group
norm and bilinear resize all have channels-last kernels (with channels-first maps of 256
channels the resize copies to channels-last and back). Module and parameter names mirror
the hub checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.mask2former.config import Mask2FormerConfig
from omniseg.ops.group_norm import GroupNorm
from omniseg.ops.linear import Linear, PointwiseConv2d, linear_and_activation
from omniseg.ops.ms_deform_attn import deformable_sampling

# Mask2Former always uses the three lowest-resolution maps in attention, and 4 sampling
# points per head and level in the deformable encoder.
NUM_ATTENTION_LEVELS = 3
NUM_SAMPLING_POINTS = 4


def sine_position_embedding(
    height: int, width: int, num_features: int, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Normalised 2-D sine/cosine position embedding (DETR), channels last.

    Row ``i`` / column ``j`` are embedded from ``2 pi (i + 1) / height`` and
    ``2 pi (j + 1) / width`` at ``num_features`` frequencies each (``temperature`` 10000),
    alternating sin and cos; the row embedding comes first.

    Returns:
        ``[height * width, 2 * num_features]``, positions row-major.
    """
    scale = 2 * math.pi
    eps = 1e-6
    y = torch.arange(1, height + 1, device=device, dtype=dtype) / (height + eps) * scale
    x = torch.arange(1, width + 1, device=device, dtype=dtype) / (width + eps) * scale
    exponent = 2 * torch.div(torch.arange(num_features, device=device), 2, rounding_mode="floor")
    dim_t = 10000 ** (exponent.to(dtype) / num_features)

    def embed(coords: Tensor) -> Tensor:  # [N] -> [N, num_features], sin/cos interleaved
        angles = coords[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = embed(y)[:, None, :].expand(height, width, num_features)
    pos_x = embed(x)[None, :, :].expand(height, width, num_features)
    return torch.cat((pos_y, pos_x), dim=2).view(height * width, 2 * num_features)


class MultiscaleDeformableAttention(nn.Module):
    """Each query attends to ``n_points`` learned offsets around its reference point on
    every level, per head.

    Checkpoint names: ``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``.
    """

    def __init__(self, embed_dim: int, num_heads: int, n_levels: int, n_points: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.n_heads = num_heads
        self.n_levels = n_levels
        self.n_points = n_points
        self.sampling_offsets = Linear(embed_dim, num_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(embed_dim, num_heads * n_levels * n_points)
        self.value_proj = Linear(embed_dim, embed_dim)
        self.output_proj = Linear(embed_dim, embed_dim)

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offsets except a per-head direction whose length
        grows with the point index, uniform attention, Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values  # [heads, 2]
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = grid[:, None, None, :] * steps[None, None, :, None]  # [heads, 1, points, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """
        Args:
            hidden_states: ``[B, S, C]`` all levels' features (they are queries and values).
            position_embeddings: ``[S, C]`` added to the queries (not the values).
            reference_points: ``[S, heads, L, P, 2]`` each query's own position in pixels
                of every level, (x, y) with pixel centres at integers (see
                :func:`_reference_points`), repeated for every head and point.
            spatial_shapes: ``(height, width)`` of each level.

        Returns:
            ``[B, S, C]``.
        """
        batch, seq_len, channels = hidden_states.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        queries = hidden_states + position_embeddings
        value = self.value_proj(hidden_states).view(batch, seq_len, heads, channels // heads)
        offsets = self.sampling_offsets(queries).view(batch, seq_len, heads, levels, points, 2)
        weights = _softmax(self.attention_weights(queries).view(batch, seq_len, heads, levels * points))
        weights = weights.view(batch, seq_len, heads, levels, points)
        # Offsets are in pixels of each level, like the reference points: the sampling
        # locations are their sums, with no normalising to [0, 1] and back.
        # Under autocast the offsets are bfloat16: the sum is taken in float32, not rounded back.
        if offsets.dtype == reference_points.dtype:
            locations = offsets.add_(reference_points)  # [B, S, heads, L, P, 2]
        else:
            locations = reference_points + offsets
        output = deformable_sampling(value, spatial_shapes, locations, weights)
        return self.output_proj(output)


class PixelDecoderEncoderLayer(nn.Module):
    """Deformable self-attention then a ReLU MLP, each residual with a post layer norm.

    Checkpoint names: ``self_attn``, ``self_attn_layer_norm``, ``fc1``, ``fc2``,
    ``final_layer_norm``.
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        dim = config.feature_size
        self.dropout = config.dropout
        self.self_attn = MultiscaleDeformableAttention(
            dim, config.num_attention_heads, NUM_ATTENTION_LEVELS, NUM_SAMPLING_POINTS
        )
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, config.encoder_feedforward_dim)
        self.fc2 = Linear(config.encoder_feedforward_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """``[B, S, C]`` -> ``[B, S, C]``; other arguments as in
        :meth:`MultiscaleDeformableAttention.forward`."""
        attended = self.self_attn(hidden_states, position_embeddings, reference_points, spatial_shapes)
        # In place, into the layers' fresh outputs (the residual sums too: the same numbers
        # as hidden_states + branch): each new [B, S, C] or [B, S, 4C] buffer would cost an
        # allocation and its page faults.
        attended = F.dropout(attended, self.dropout, self.training)
        hidden_states = self.self_attn_layer_norm(attended.add_(hidden_states))
        mlp = linear_and_activation(self.fc1, hidden_states, "relu", partial(F.relu, inplace=True))
        mlp = F.dropout(mlp, self.dropout, self.training)
        mlp = F.dropout(self.fc2(mlp), self.dropout, self.training)
        return self.final_layer_norm(mlp.add_(hidden_states))


class PixelDecoderEncoder(nn.Module):
    """A stack of ``config.encoder_layers`` deformable encoder layers (checkpoint: ``layers``)."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PixelDecoderEncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(
        self, hidden_states: Tensor, position_embeddings: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """``[B, S, C]`` -> ``[B, S, C]``; ``position_embeddings`` is ``[S, C]``."""
        attention = self.layers[0].self_attn
        reference_points = _reference_points(spatial_shapes, hidden_states.device, hidden_states.dtype)
        # Repeated to the sampling offsets' trailing shape once for all layers: on CPU a
        # same-shape add is much faster than one broadcasting over heads and points.
        seq_len, levels = reference_points.shape[:2]
        reference_points = (
            reference_points[:, None, :, None, :]
            .expand(seq_len, attention.n_heads, levels, attention.n_points, 2)
            .contiguous()
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, reference_points, spatial_shapes)
        return hidden_states


def _reference_points(
    spatial_shapes: Sequence[tuple[int, int]], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``[S, L, 2]``: the centre of every position of every level, as (x, y) in pixels of
    each of the L levels (pixel centres at integers, i.e. ``normalised * size - 0.5``).

    Mask2Former treats every pixel of the (padded) input as valid, so a query's reference
    point is the same fraction of the map on every level.
    """
    points = []
    for height, width in spatial_shapes:
        y = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
        x = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
        points.append(torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).view(-1, 2))
    normalised = torch.cat(points)  # [S, 2] in [0, 1]
    sizes = torch.tensor([(w, h) for h, w in spatial_shapes], device=device, dtype=dtype)  # [L, 2]
    return normalised[:, None, :] * sizes - 0.5


def _softmax(logits: Tensor) -> Tensor:
    """``logits.softmax(-1)``, written out: PyTorch's CPU softmax kernel is several times
    slower on rows as short as the deformable attention's (levels * points = 12)."""
    weights = (logits - logits.amax(-1, keepdim=True)).exp_()
    return weights / weights.sum(-1, keepdim=True)


def _conv_norm(in_channels: int, out_channels: int, *, kernel_size: int, bias: bool) -> list[nn.Module]:
    if kernel_size == 1:
        conv = PointwiseConv2d(in_channels, out_channels, bias=bias)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    return [conv, GroupNorm(32, out_channels)]


class Mask2FormerPixelDecoder(nn.Module):
    """Backbone maps -> (stride-4 pixel features, the encoder's three multi-scale maps).

    Checkpoint names: ``level_embed``, ``input_projections.{i}`` (conv 1x1 + GroupNorm,
    lowest resolution first), ``encoder.layers.*``, ``adapter_{i}`` / ``layer_{i}`` (FPN
    lateral conv 1x1 + GroupNorm / output conv 3x3 + GroupNorm + ReLU; ``i = 1`` is the
    highest-resolution backbone map), ``mask_projection`` (conv 1x1 from the pixel features
    to the mask features; held here for the checkpoint, applied by the mask head).
    """

    def __init__(self, config: Mask2FormerConfig, feature_channels: Sequence[int]) -> None:
        super().__init__()
        dim = config.feature_size
        self.position_features = dim // 2
        self.level_embed = nn.Parameter(torch.empty(NUM_ATTENTION_LEVELS, dim))
        self.input_projections = nn.ModuleList(
            nn.Sequential(*_conv_norm(channels, dim, kernel_size=1, bias=True))
            for channels in feature_channels[::-1][:NUM_ATTENTION_LEVELS]
        )
        self.encoder = PixelDecoderEncoder(config)
        self.mask_projection = PointwiseConv2d(dim, config.mask_feature_size)

        # FPN levels between the finest attention level and the mask features' stride.
        finest_attention_stride = min(config.feature_strides[-NUM_ATTENTION_LEVELS:])
        self.num_fpn_levels = round(math.log2(finest_attention_stride) - math.log2(config.common_stride))
        for index, channels in enumerate(feature_channels[: self.num_fpn_levels], start=1):
            self.add_module(f"adapter_{index}", nn.Sequential(*_conv_norm(channels, dim, kernel_size=1, bias=False)))
            self.add_module(
                f"layer_{index}",
                nn.Sequential(*_conv_norm(dim, dim, kernel_size=3, bias=False), nn.ReLU(inplace=True)),
            )

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor], list[tuple[int, int]]]:
        """
        Args:
            features: backbone maps ``[B, C_i, H_i, W_i]``, highest resolution first
                (channels-last memory is fastest).

        Returns:
            the pixel features ``[B, feature_size, H_0, W_0]`` (stride 4, the FPN's output;
            the mask features are their ``mask_projection``, which the mask head folds
            into its query embeddings instead, see ``MaskPredictor``);
            the encoder's maps as sequences ``[B, h_l * w_l, feature_size]``, lowest
            resolution first (strides 32, 16, 8); and their ``(h_l, w_l)``.
        """
        attention_inputs = features[::-1][:NUM_ATTENTION_LEVELS]
        spatial_shapes = [(x.shape[2], x.shape[3]) for x in attention_inputs]
        sequence = torch.cat(
            [proj(x).flatten(2).transpose(1, 2) for proj, x in zip(self.input_projections, attention_inputs)],
            dim=1,
        )  # [B, S, C]
        position_embeddings = torch.cat(
            [
                sine_position_embedding(
                    h, w, self.position_features, device=sequence.device, dtype=sequence.dtype
                )
                + self.level_embed[level]
                for level, (h, w) in enumerate(spatial_shapes)
            ]
        )  # [S, C]
        sequence = self.encoder(sequence, position_embeddings, spatial_shapes)
        multi_scale = list(sequence.split([h * w for h, w in spatial_shapes], dim=1))

        # FPN: upsample the finest encoder map and add lateral convs of finer backbone maps.
        batch, channels = sequence.shape[0], sequence.shape[2]
        height, width = spatial_shapes[-1]
        fpn = multi_scale[-1].view(batch, height, width, channels).permute(0, 3, 1, 2)
        for index in range(self.num_fpn_levels, 0, -1):
            lateral = getattr(self, f"adapter_{index}")(features[index - 1])
            upsampled = F.interpolate(fpn, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            fpn = getattr(self, f"layer_{index}")(upsampled.add_(lateral))
        return fpn, multi_scale, spatial_shapes
