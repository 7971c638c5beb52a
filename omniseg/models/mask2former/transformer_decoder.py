"""Mask2Former's transformer decoder: learned queries refined by masked attention.

Each layer lets the queries attend to one level of the pixel decoder's multi-scale
features (cycling from the lowest resolution), but only inside the foreground of the mask
the previous prediction gave them (masked attention), then to each other (self-attention),
then through an MLP. After the initial queries and after every layer, a shared layer norm
and the mask head predict each query's mask over the stride-4 mask features; those
intermediate predictions are the auxiliary outputs and give the next layer's attention mask.

Tensors are batch first (``[B, Q, C]`` queries, ``[B, HW, C]`` features). Attention runs on
``F.scaled_dot_product_attention``. Module and parameter names mirror the hub checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.mask2former.config import Mask2FormerConfig
from omniseg.models.mask2former.pixel_decoder import NUM_ATTENTION_LEVELS, sine_position_embedding
from omniseg.ops.linear import HoldsPackedWeights, Linear, linear

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, N, C]`` -> ``[B, heads, N, C / heads]`` (a view)."""
    batch, length, channels = x.shape
    return x.view(batch, length, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """``[B, heads, N, D]`` -> ``[B, N, heads * D]``."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


class Attention(nn.Module):
    """Multi-head attention with separate query, key and value projections; the caller adds
    positions to queries and keys, never to values (Mask2Former's self-attention, DETR's
    self- and cross-attention).

    Checkpoint names: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``query [B, Q, C]`` (positions included), ``key [B, N, C]`` (positions included),
        ``value [B, N, C]`` -> ``[B, Q, C]``. ``key_mask [B, 1, 1, N]`` (bool, optional):
        which keys may be attended to (DETR's padding mask)."""
        q = _split_heads(self.q_proj(query), self.num_heads)
        k = _split_heads(self.k_proj(key), self.num_heads)
        v = _split_heads(self.v_proj(value), self.num_heads)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout)
        return self.out_proj(_merge_heads(attended))


class MaskedCrossAttention(HoldsPackedWeights):
    """Multi-head attention from queries to features, restricted by a boolean mask.

    Parameters are packed as in ``torch.nn.MultiheadAttention`` (checkpoint names
    ``in_proj_weight`` ``[3C, C]`` for query/key/value, ``in_proj_bias``, ``out_proj``).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attend: Tensor) -> Tensor:
        """
        Args:
            query: ``[B, Q, C]``.
            key, value: ``[B, HW, C]``.
            attend: bool ``[B, 1, Q, HW]``, True where a query may attend (every row has at
                least one True).

        Returns:
            ``[B, Q, C]``.
        """
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        query = _split_heads(linear(query, w_q, b_q, packed=self.packed_weights), self.num_heads)
        key = _split_heads(linear(key, w_k, b_k, packed=self.packed_weights), self.num_heads)
        value = _split_heads(linear(value, w_v, b_v, packed=self.packed_weights), self.num_heads)
        dropout = self.dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attend, dropout_p=dropout)
        return self.out_proj(_merge_heads(context))


class MaskedAttentionDecoderLayer(nn.Module):
    """Masked cross-attention, self-attention, MLP; post-norm, or pre-norm if ``config.pre_norm``.

    Checkpoint names: ``cross_attn``, ``cross_attn_layer_norm``, ``self_attn``,
    ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``.
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported activation_function {config.activation_function!r}; "
                f"expected one of {sorted(_ACTIVATIONS)}"
            )
        self.activation = _ACTIVATIONS[config.activation_function]
        self.pre_norm = config.pre_norm
        self.dropout = config.dropout
        self.cross_attn = MaskedCrossAttention(dim, config.num_attention_heads, config.dropout)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, config.num_attention_heads, config.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, config.dim_feedforward)
        self.fc2 = Linear(config.dim_feedforward, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(
        self,
        queries: Tensor,
        query_positions: Tensor,
        features: Tensor,
        feature_positions: Tensor,
        attend: Tensor,
    ) -> Tensor:
        """
        Args:
            queries: ``[B, Q, C]``.
            query_positions: ``[Q, C]``, added to the queries in both attentions.
            features: ``[B, HW, C]`` one level of the multi-scale features.
            feature_positions: ``[HW, C]``, added to the features as keys.
            attend: bool ``[B, 1, Q, HW]``, where each query may attend.

        Returns:
            ``[B, Q, C]``.
        """
        keys = features + feature_positions

        def cross(x: Tensor) -> Tensor:
            return self._drop(self.cross_attn(x + query_positions, keys, features, attend))

        def self_attend(x: Tensor) -> Tensor:
            with_position = x + query_positions
            return self._drop(self.self_attn(with_position, with_position, x))

        def mlp(x: Tensor) -> Tensor:
            x = self._drop(self.activation(self.fc1(x)))
            return self._drop(self.fc2(x))

        blocks = (
            (cross, self.cross_attn_layer_norm),
            (self_attend, self.self_attn_layer_norm),
            (mlp, self.final_layer_norm),
        )
        for block, norm in blocks:
            if self.pre_norm:
                queries = queries + block(norm(queries))
            else:
                queries = norm(queries + block(queries))
        return queries

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training)


class PredictionBlock(nn.Module):
    """A linear layer and its activation, named like a ``Sequential`` (``0`` = linear)."""

    def __init__(self, in_dim: int, out_dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.add_module("0", Linear(in_dim, out_dim))
        self.add_module("1", activation)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.children():
            x = layer(x)
        return x


class MLPPredictionHead(nn.Module):
    """``num_layers`` linear layers with ReLU between them (checkpoint: ``{i}.0``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        for i in range(num_layers):
            activation = nn.ReLU() if i < num_layers - 1 else nn.Identity()
            self.add_module(str(i), PredictionBlock(dims[i], dims[i + 1], activation))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.children():
            x = block(x)
        return x


class MaskPredictor(nn.Module):
    """Mask logits per query: the dot product of its mask embedding with the mask features.

    The mask features are the pixel decoder's ``mask_projection`` (a 1x1 conv) of its pixel
    features. Both maps are linear, so the projection is applied to the queries' embeddings
    instead of to every pixel: ``e . (W y + b) = (W^T e) . y + e . b``. The same numbers up
    to float rounding, with one ``[M, D]`` product per query instead of one per pixel
    (100 queries against 12288 pixels at 384x512).

    Checkpoint name: ``mask_embedder`` (a 3-layer MLP).
    """

    def __init__(self, hidden_dim: int, mask_feature_size: int) -> None:
        super().__init__()
        self.mask_embedder = MLPPredictionHead(hidden_dim, hidden_dim, mask_feature_size)

    def forward(self, queries: Tensor, pixel_features: Tensor, projection: nn.Conv2d) -> Tensor:
        """
        Args:
            queries: ``[B, Q, C]``.
            pixel_features: ``[B, D, H, W]``, channels-last or channels-first memory (used
                in place: bmm reads either as a ``[D, H * W]`` matrix).
            projection: the 1x1 conv from ``D`` to the ``M`` mask feature channels.

        Returns:
            ``[B, Q, H, W]`` mask logits.
        """
        batch, _, height, width = pixel_features.shape
        embeddings = self.mask_embedder(queries)  # [B, Q, M]
        folded = embeddings @ projection.weight.flatten(1)  # [B, Q, D]
        masks = torch.bmm(folded, pixel_features.flatten(2))
        if projection.bias is not None:
            masks += (embeddings @ projection.bias)[..., None]
        return masks.view(batch, -1, height, width)


def attention_mask(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Where each query may attend on a feature level, from its predicted mask.

    The logits are resized to the level (bilinear); a query attends where its mask
    probability is at least 0.5, and everywhere if that leaves nothing.

    Args:
        mask_logits: ``[B, Q, H, W]``.
        size: the level's ``(height, width)``.

    Returns:
        bool ``[B, 1, Q, height * width]``, True where attention is allowed.
    """
    batch, queries, height, width = mask_logits.shape
    # One channel per image (the same maths): PyTorch's CPU kernel would otherwise copy the
    # Q-channel maps to channels-last and back, costing more than the resize itself.
    single_channel = mask_logits.detach().reshape(batch * queries, 1, height, width)
    resized = F.interpolate(single_channel, size=size, mode="bilinear", align_corners=False)
    return _attend_where_foreground(resized.view(batch, queries, -1))


def _attend_where_foreground(mask_logits: Tensor) -> Tensor:
    """``[B, Q, HW]`` logits on a level -> bool ``[B, 1, Q, HW]`` (see :func:`attention_mask`)."""
    attend = mask_logits.detach().sigmoid() >= 0.5
    attend |= ~attend.any(-1, keepdim=True)
    return attend[:, None]


class MaskedAttentionDecoder(nn.Module):
    """``decoder_layers - 1`` layers plus the shared output norm and mask head.

    Checkpoint names: ``layers``, ``layernorm``, ``mask_predictor``.
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MaskedAttentionDecoderLayer(config) for _ in range(config.decoder_layers - 1)
        )
        self.layernorm = nn.LayerNorm(config.hidden_dim)
        self.mask_predictor = MaskPredictor(config.hidden_dim, config.mask_feature_size)

    def forward(
        self,
        queries: Tensor,
        query_positions: Tensor,
        features: Sequence[Tensor],
        feature_positions: Sequence[Tensor],
        spatial_shapes: Sequence[tuple[int, int]],
        pixel_features: Tensor,
        mask_projection: nn.Conv2d,
        intermediate_masks: bool = True,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            queries: ``[B, Q, C]`` initial query features.
            query_positions: ``[Q, C]``.
            features: per level ``[B, h_l * w_l, C]``, lowest resolution first.
            feature_positions: per level ``[h_l * w_l, C]``.
            spatial_shapes: per level ``(h_l, w_l)``.
            pixel_features: ``[B, D, H, W]`` the pixel decoder's stride-4 features.
            mask_projection: the pixel decoder's 1x1 conv to the mask features (see
                :class:`MaskPredictor`).
            intermediate_masks: also return the intermediate mask logits (for auxiliary
                outputs and losses); when False only the final one is computed at full size.

        Returns:
            ``decoder_layers`` predictions, the initial one first and the final one last:
            the normalised query states ``[B, Q, C]`` (for the class head) and the mask
            logits ``[B, Q, H, W]`` (only the final one unless ``intermediate_masks``).
        """
        if not intermediate_masks:
            # Resizing is linear per channel, so the resized mask logits that set each
            # layer's attention are the dot products with resized pixel features: the same
            # numbers up to float rounding, at the level's size instead of stride 4 (the
            # full-size intermediate masks are most of the decoder's cost otherwise).
            level_features = [
                F.interpolate(pixel_features, size=size, mode="bilinear", align_corners=False)
                for size in spatial_shapes
            ]
        states: list[Tensor] = []
        masks: list[Tensor] = []
        num_levels = len(features)
        for index in range(len(self.layers) + 1):
            states.append(self.layernorm(queries))
            last = index == len(self.layers)
            if intermediate_masks or last:
                masks.append(self.mask_predictor(states[-1], pixel_features, mask_projection))
            if last:
                break
            level = index % num_levels
            if intermediate_masks:
                attend = attention_mask(masks[-1], spatial_shapes[level])
            else:
                logits = self.mask_predictor(states[-1], level_features[level], mask_projection)
                attend = _attend_where_foreground(logits.flatten(2))
            queries = self.layers[index](
                queries, query_positions, features[level], feature_positions[level], attend
            )
        return states, masks


class Mask2FormerTransformerModule(nn.Module):
    """Query embeddings, feature projections and level embeddings around the decoder.

    Checkpoint names: ``queries_embedder`` (query positions), ``queries_features`` (initial
    queries), ``input_projections.{l}`` (conv 1x1 when ``feature_size != hidden_dim`` or
    ``enforce_input_projection``, else nothing), ``level_embed``, ``decoder``.
    """

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.position_features = dim // 2
        self.queries_embedder = nn.Embedding(config.num_queries, dim)
        self.queries_features = nn.Embedding(config.num_queries, dim)
        project = config.feature_size != dim or config.enforce_input_projection
        self.input_projections = nn.ModuleList(
            nn.Conv2d(config.feature_size, dim, kernel_size=1) if project else nn.Identity()
            for _ in range(NUM_ATTENTION_LEVELS)
        )
        self.decoder = MaskedAttentionDecoder(config)
        self.level_embed = nn.Embedding(NUM_ATTENTION_LEVELS, dim)

    def forward(
        self,
        multi_scale_features: Sequence[Tensor],
        spatial_shapes: Sequence[tuple[int, int]],
        pixel_features: Tensor,
        mask_projection: nn.Conv2d,
        intermediate_masks: bool = True,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            multi_scale_features: per level ``[B, h_l * w_l, feature_size]``, lowest
                resolution first.
            spatial_shapes: per level ``(h_l, w_l)``.
            pixel_features: ``[B, D, H, W]``.
            mask_projection: the pixel decoder's 1x1 conv to the mask features.

        Returns:
            See :meth:`MaskedAttentionDecoder.forward`.
        """
        features, positions = [], []
        for level, (sequence, (height, width)) in enumerate(zip(multi_scale_features, spatial_shapes)):
            projection = self.input_projections[level]
            if isinstance(projection, nn.Conv2d):  # a 1x1 conv is a linear map on channels
                sequence = linear(sequence, projection.weight.flatten(1), projection.bias)
            features.append(sequence + self.level_embed.weight[level])
            positions.append(
                sine_position_embedding(
                    height, width, self.position_features, device=sequence.device, dtype=sequence.dtype
                )
            )
        batch = pixel_features.shape[0]
        queries = self.queries_features.weight.expand(batch, -1, -1)
        return self.decoder(
            queries,
            self.queries_embedder.weight,
            features,
            positions,
            spatial_shapes,
            pixel_features,
            mask_projection,
            intermediate_masks=intermediate_masks,
        )
