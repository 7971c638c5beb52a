"""DETR's transformer encoder and its padding-aware sine position embedding.

The encoder refines the projected stride-32 backbone map, flattened to a sequence
``[B, h*w, C]``: each layer is self-attention (the position embedding added to queries and
keys, never to values; padded pixels masked out as keys), then an MLP, each followed by a
residual add and a LayerNorm (post-norm). Names mirror the hub checkpoints
(``layers.<i>.self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``, ``fc1``, ``fc2``,
``final_layer_norm``). The decoder is MaskFormer's, the same DETR decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.detr.config import DetrConfig
from omniseg.models.mask2former.transformer_decoder import _ACTIVATIONS, Attention
from omniseg.ops.linear import Linear


def masked_sine_position_embedding(mask: Tensor, num_features: int, *, dtype: torch.dtype) -> Tensor:
    """DETR's normalised 2-D sine embedding of the real (unpadded) part of each map.

    Args:
        mask: ``[B, h, w]`` bool, True on real pixels (padding is bottom/right).
        num_features: frequencies per axis (``d_model // 2``).

    Returns:
        ``[B, h*w, 2 * num_features]``, row-major positions: for each pixel the row embedding
        then the column embedding (sin/cos interleaved), of its running count of real pixels
        down its column / along its row, divided by the column's / row's total, times 2 pi
        (temperature 10000). Padding gets the last real value (or 0 in all-padding lines).
    """
    real = mask.to(dtype)
    y = real.cumsum(1)
    x = real.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    exponent = 2 * torch.div(torch.arange(num_features, device=mask.device), 2, rounding_mode="floor")
    dim_t = 10000 ** (exponent.to(dtype) / num_features)

    def embed(coords: Tensor) -> Tensor:  # [B, h, w] -> [B, h, w, num_features]
        angles = coords[..., None] / dim_t
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

    positions = torch.cat((embed(y), embed(x)), dim=3)  # [B, h, w, 2F]
    return positions.flatten(1, 2)


class DetrEncoderLayer(nn.Module):
    """Self-attention and MLP, each then residual add and LayerNorm."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        dim = config.d_model
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {config.activation_function!r}")
        self.activation = _ACTIVATIONS[config.activation_function]
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.self_attn = Attention(dim, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, config.encoder_ffn_dim)
        self.fc2 = Linear(config.encoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, hidden: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
        """``hidden [B, N, C]``, ``positions [B, N, C]``, ``key_mask [B, 1, 1, N]`` bool (True:
        real pixel) or None -> ``[B, N, C]``."""
        with_positions = hidden + positions
        attended = self.self_attn(with_positions, with_positions, hidden, key_mask)
        hidden = self.self_attn_layer_norm(hidden + self._drop(attended, self.dropout))
        inner = self._drop(self.activation(self.fc1(hidden)), self.activation_dropout)
        return self.final_layer_norm(hidden + self._drop(self.fc2(inner), self.dropout))

    def _drop(self, x: Tensor, p: float) -> Tensor:
        return F.dropout(x, p=p, training=True) if self.training and p > 0 else x


class DetrEncoder(nn.Module):
    """The encoder layers (checkpoint name ``layers``)."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DetrEncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(self, hidden: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
        """See :meth:`DetrEncoderLayer.forward`."""
        for layer in self.layers:
            hidden = layer(hidden, positions, key_mask)
        return hidden
