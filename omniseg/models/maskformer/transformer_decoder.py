"""MaskFormer's transformer module: DETR's decoder over the backbone's stride-32 map.

Learned queries (their embeddings are the queries' *positions*; the query states start at
zero) attend to each other, then to the (projected) stride-32 backbone map with DETR's sine
position embedding on the keys, then go through an MLP; each of the three steps is followed
by a residual add and a LayerNorm (post-norm). A final LayerNorm normalises the output.

Tensors are batch first (``[B, Q, C]`` queries, ``[B, HW, C]`` features). Attention runs on
``F.scaled_dot_product_attention``. Names mirror the hub checkpoints
(``queries_embedder``, ``input_projection``, ``decoder.layers.<i>.{self_attn, encoder_attn}.
{q,k,v,out}_proj``, ``..._layer_norm``, ``fc1``, ``fc2``, ``decoder.layernorm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.mask2former.pixel_decoder import sine_position_embedding
from omniseg.models.mask2former.transformer_decoder import _ACTIVATIONS, Attention
from omniseg.models.maskformer.config import MaskFormerDecoderConfig
from omniseg.ops.linear import Linear


class DetrDecoderLayer(nn.Module):
    """Self-attention, cross-attention, MLP; each then residual add and LayerNorm."""

    def __init__(self, config: MaskFormerDecoderConfig) -> None:
        super().__init__()
        dim = config.d_model
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation = _ACTIVATIONS[config.activation_function]
        self.self_attn = Attention(dim, config.decoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = Attention(dim, config.decoder_attention_heads, config.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, config.decoder_ffn_dim)
        self.fc2 = Linear(config.decoder_ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(
        self,
        hidden: Tensor,
        query_positions: Tensor,
        memory: Tensor,
        memory_keys: Tensor,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            hidden: ``[B, Q, C]`` query states.
            query_positions: ``[B, Q, C]`` (or ``[1, Q, C]``) query position embeddings.
            memory: ``[B, N, C]`` image features (the values).
            memory_keys: ``[B, N, C]`` image features plus their position embeddings.
            memory_mask: ``[B, 1, 1, N]`` bool, the image features that are not padding
                (DETR; ``None``: all of them, as MaskFormer).

        Returns:
            ``[B, Q, C]``.
        """
        with_positions = hidden + query_positions
        attended = self.self_attn(with_positions, with_positions, hidden)
        hidden = self.self_attn_layer_norm(hidden + self._drop(attended, self.dropout))
        attended = self.encoder_attn(hidden + query_positions, memory_keys, memory, memory_mask)
        hidden = self.encoder_attn_layer_norm(hidden + self._drop(attended, self.dropout))
        inner = self._drop(self.activation(self.fc1(hidden)), self.activation_dropout)
        return self.final_layer_norm(hidden + self._drop(self.fc2(inner), self.dropout))

    def _drop(self, x: Tensor, p: float) -> Tensor:
        return F.dropout(x, p=p, training=True) if self.training and p > 0 else x


class DetrDecoder(nn.Module):
    """The decoder layers and the final LayerNorm (checkpoint names ``layers``, ``layernorm``)."""

    def __init__(self, config: MaskFormerDecoderConfig) -> None:
        super().__init__()
        self.normalise_between_layers = config.auxiliary_loss
        self.layers = nn.ModuleList(DetrDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layernorm = nn.LayerNorm(config.d_model)

    def forward(
        self,
        hidden: Tensor,
        query_positions: Tensor,
        memory: Tensor,
        memory_keys: Tensor,
        memory_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Returns the normalised final states ``[B, Q, C]`` and the states each layer was
        given (the first is ``hidden``; the reference's ``hidden_states`` but the last).
        ``memory_mask``: see :meth:`DetrDecoderLayer.forward`."""
        inputs = []
        for layer in self.layers:
            inputs.append(hidden)
            hidden = layer(hidden, query_positions, memory, memory_keys, memory_mask)
            if self.normalise_between_layers:
                # With DETR's auxiliary_loss the reference feeds each layer normalised states.
                hidden = self.layernorm(hidden)
        return self.layernorm(hidden), inputs


class MaskFormerTransformerModule(nn.Module):
    """Queries, input projection and DETR decoder (checkpoint prefix ``transformer_module``)."""

    def __init__(self, *, in_channels: int, config: MaskFormerDecoderConfig) -> None:
        super().__init__()
        dim = config.d_model
        self.queries_embedder = nn.Embedding(config.num_queries, dim)
        self.input_projection = nn.Conv2d(in_channels, dim, kernel_size=1) if in_channels != dim else None
        self.decoder = DetrDecoder(config)

    def forward(self, image_features: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``[B, C_in, h, w]`` stride-32 backbone map -> final query states ``[B, Q, C]`` and
        the reference's intermediate states (see :meth:`DetrDecoder.forward`)."""
        if self.input_projection is not None:
            image_features = self.input_projection(image_features)
        batch, channels, height, width = image_features.shape
        memory = image_features.flatten(2).transpose(1, 2)  # [B, hw, C]
        positions = sine_position_embedding(
            height, width, channels // 2, device=memory.device, dtype=memory.dtype
        )  # [hw, C]
        query_positions = self.queries_embedder.weight[None]  # [1, Q, C]
        hidden = torch.zeros(batch, *query_positions.shape[1:], device=memory.device, dtype=memory.dtype)
        return self.decoder(hidden, query_positions, memory, memory + positions)
