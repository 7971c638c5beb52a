"""OneFormer's query transformer: the task token becomes the initial object queries.

A small DETR-style decoder (``query_dec_layers`` layers: self-attention, cross-attention, MLP)
refines ``num_queries - 1`` copies of the task token, attending to the stride-4 mask features.
As in the reference, the attention's *values* are the sine position embedding of the mask
features' grid and its *keys* add the projected mask features to it (the reference passes
the two in that order).

Checkpoint names (under ``query_transformer.decoder``): ``layers.{i}.self_attn`` /
``layers.{i}.multihead_attn`` (packed as ``torch.nn.MultiheadAttention``), ``linear1``,
``linear2``, ``norm1`` .. ``norm3``, and the final ``norm``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.mask2former.transformer_decoder import MaskedCrossAttention
from omniseg.ops.linear import Linear


class QueryTransformerLayer(nn.Module):
    """Self-attention, cross-attention to the memory, ReLU MLP; post-norm or pre-norm."""

    def __init__(self, *, dim: int, num_heads: int, dim_feedforward: int, pre_norm: bool, eps: float) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        # Packed query/key/value projections as in nn.MultiheadAttention (no attention mask).
        self.self_attn = MaskedCrossAttention(dim, num_heads, dropout=0.0)
        self.multihead_attn = MaskedCrossAttention(dim, num_heads, dropout=0.0)
        self.linear1 = Linear(dim, dim_feedforward)
        self.linear2 = Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)

    def forward(self, queries: Tensor, query_positions: Tensor, memory: Tensor, memory_keys: Tensor) -> Tensor:
        """
        Args:
            queries: ``[B, Q, C]``.
            query_positions: ``[Q, C]``, added to the queries (and self-attention keys).
            memory: ``[B, HW, C]`` attention values.
            memory_keys: ``[B, HW, C]`` attention keys (memory plus its positions).

        Returns:
            ``[B, Q, C]``.
        """

        def self_attend(x: Tensor) -> Tensor:
            with_position = x + query_positions
            return self.self_attn(with_position, with_position, x, None)

        def cross(x: Tensor) -> Tensor:
            return self.multihead_attn(x + query_positions, memory_keys, memory, None)

        def mlp(x: Tensor) -> Tensor:
            return self.linear2(F.relu(self.linear1(x)))

        for block, norm in ((self_attend, self.norm1), (cross, self.norm2), (mlp, self.norm3)):
            if self.pre_norm:
                queries = queries + block(norm(queries))
            else:
                queries = norm(queries + block(queries))
        return queries


class QueryTransformerDecoder(nn.Module):
    """The layers and the final LayerNorm (checkpoint names ``layers``, ``norm``)."""

    def __init__(
        self, *, dim: int, num_heads: int, dim_feedforward: int, num_layers: int, pre_norm: bool, eps: float
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            QueryTransformerLayer(
                dim=dim, num_heads=num_heads, dim_feedforward=dim_feedforward, pre_norm=pre_norm, eps=eps
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, queries: Tensor, query_positions: Tensor, memory: Tensor, memory_keys: Tensor) -> Tensor:
        """See :meth:`QueryTransformerLayer.forward`; returns the normalised ``[B, Q, C]``."""
        for layer in self.layers:
            queries = layer(queries, query_positions, memory, memory_keys)
        return self.norm(queries)


class QueryTransformer(nn.Module):
    """Holds :class:`QueryTransformerDecoder` as ``decoder`` (the checkpoint's nesting)."""

    def __init__(
        self, *, dim: int, num_heads: int, dim_feedforward: int, num_layers: int, pre_norm: bool, eps: float
    ) -> None:
        super().__init__()
        self.decoder = QueryTransformerDecoder(
            dim=dim,
            num_heads=num_heads,
            dim_feedforward=dim_feedforward,
            num_layers=num_layers,
            pre_norm=pre_norm,
            eps=eps,
        )

    def forward(self, initial: Tensor, query_positions: Tensor, memory: Tensor, memory_keys: Tensor) -> Tensor:
        """
        Args:
            initial: ``[B, C]`` the (normalised) task token, or zeros without task norm.
            query_positions: ``[Q - 1, C]``.
            memory: ``[HW, C]`` values (the same for every image).
            memory_keys: ``[B, HW, C]``.

        Returns:
            ``[B, Q - 1, C]`` object queries.
        """
        batch = memory_keys.shape[0]
        queries = initial[:, None, :].expand(-1, query_positions.shape[0], -1)
        return self.decoder(queries, query_positions, memory.expand(batch, -1, -1), memory_keys)
