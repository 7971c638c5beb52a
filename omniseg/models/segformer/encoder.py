"""The Mix Transformer (MiT) encoder of SegFormer.

Each of the ``num_encoder_blocks`` stages embeds its input with an overlapping strided
convolution, runs ``depths[i]`` transformer blocks on the resulting tokens and closes with a
LayerNorm. Tokens are kept as ``[B, N, C]`` with ``N = H * W`` in row-major order; the
convolutions see them through ``[B, C, H, W]`` views (channels-last strides, no copies).

Module and attribute names mirror the published checkpoints (``encoder.block.0.0.attention
.self.query`` ...), so ``state_dict`` keys are exactly the reference's on-disk keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models.segformer.config import SegformerConfig
from omniseg.ops.linear import Linear

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` in ``config.json`` (``hidden_act``)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported hidden_act {name!r} (supported: {', '.join(sorted(_ACTIVATIONS))})"
        ) from None


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, H*W, C]`` tokens as a ``[B, C, H, W]`` view (channels-last strides)."""
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` feature map as ``[B, H*W, C]`` tokens (a view when channels-last)."""
    return feature_map.flatten(2).transpose(1, 2)


def drop_path(hidden: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability
    ``drop_prob`` and rescale the survivors by ``1 / (1 - drop_prob)``; identity in eval."""
    if drop_prob == 0.0 or not training:
        return hidden
    keep_prob = 1.0 - drop_prob
    shape = (hidden.shape[0],) + (1,) * (hidden.ndim - 1)
    keep = torch.empty(shape, dtype=hidden.dtype, device=hidden.device).bernoulli_(keep_prob)
    return hidden * keep / keep_prob


class OverlapPatchEmbeddings(nn.Module):
    """Strided convolution with ``kernel // 2`` padding, so neighbouring patches overlap.

    ``[B, C_in, H, W]`` -> tokens ``[B, H' * W', C]`` with ``H' = floor((H - 1) / stride) + 1``
    (for odd kernels), and ``(H', W')``.
    """

    def __init__(self, *, patch_size: int, stride: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_channels, hidden_size, kernel_size=patch_size, stride=stride, padding=patch_size // 2
        )
        self.layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        embeddings = self.proj(pixel_values)
        height, width = embeddings.shape[-2:]
        return self.layer_norm(map_to_tokens(embeddings)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a spatially reduced sequence.

    With ``sr_ratio > 1`` the tokens are reshaped to their map, reduced by a
    ``sr_ratio x sr_ratio`` strided convolution (``sr``) and layer-normed before the key and
    value projections, so attention costs ``N * N / sr_ratio**2`` instead of ``N * N``.
    Queries always come from the full sequence.
    """

    def __init__(
        self, *, hidden_size: int, num_heads: int, sr_ratio: int, dropout: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.sr_ratio = sr_ratio
        self.dropout = dropout
        self.query = Linear(hidden_size, hidden_size)
        self.key = Linear(hidden_size, hidden_size)
        self.value = Linear(hidden_size, hidden_size)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=sr_ratio, stride=sr_ratio)
            self.layer_norm = nn.LayerNorm(hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, C] -> [B, heads, N, head_dim]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``tokens [B, N, C]`` -> attended values ``[B, N, C]`` (before the output projection)."""
        context = tokens
        if self.sr_ratio > 1:
            reduced = self.sr(tokens_to_map(tokens, height, width))
            context = self.layer_norm(map_to_tokens(reduced))
        query = self._split_heads(self.query(tokens))
        key = self._split_heads(self.key(context))
        value = self._split_heads(self.value(context))
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0
        )
        return attended.transpose(1, 2).flatten(2)


class AttentionOutput(nn.Module):
    """Output projection of the attention, then dropout. ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, *, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.dense = Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden))


class Attention(nn.Module):
    """Efficient self-attention plus its output projection (``self`` / ``output`` as in the
    checkpoints). ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, config: SegformerConfig, *, hidden_size: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.self = EfficientSelfAttention(
            hidden_size=hidden_size,
            num_heads=num_heads,
            sr_ratio=sr_ratio,
            dropout=config.attention_probs_dropout_prob,
        )
        self.output = AttentionOutput(hidden_size=hidden_size, dropout=config.hidden_dropout_prob)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.output(self.self(tokens, height, width))


class DepthWiseConv(nn.Module):
    """3x3 depth-wise convolution on the token map: ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(tokens, height, width)))


class MixFFN(nn.Module):
    """Mix-FFN: ``dense1 -> 3x3 depth-wise conv -> activation -> dense2`` (dropout after the
    activation and after ``dense2``). The convolution leaks positional information, so the
    encoder needs no position embeddings. ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, config: SegformerConfig, *, hidden_size: int, expansion: int) -> None:
        super().__init__()
        inner = int(hidden_size * expansion)
        self.dense1 = Linear(hidden_size, inner)
        self.dwconv = DepthWiseConv(inner)
        self.act = activation(config.hidden_act)
        self.dense2 = Linear(inner, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        hidden = self.act(self.dwconv(self.dense1(tokens), height, width))
        return self.dropout(self.dense2(self.dropout(hidden)))


class MixTransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(ln1(x)))`` then
    ``x + drop_path(ffn(ln2(x)))``. ``[B, N, C] -> [B, N, C]``."""

    def __init__(
        self,
        config: SegformerConfig,
        *,
        hidden_size: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: int,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.layer_norm_1 = nn.LayerNorm(hidden_size)
        self.attention = Attention(config, hidden_size=hidden_size, num_heads=num_heads, sr_ratio=sr_ratio)
        self.layer_norm_2 = nn.LayerNorm(hidden_size)
        self.mlp = MixFFN(config, hidden_size=hidden_size, expansion=mlp_ratio)
        self.drop_path = drop_path

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        attended = self.attention(self.layer_norm_1(tokens), height, width)
        tokens = tokens + drop_path(attended, self.drop_path, self.training)
        mixed = self.mlp(self.layer_norm_2(tokens), height, width)
        return tokens + drop_path(mixed, self.drop_path, self.training)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


class MixTransformerEncoder(nn.Module):
    """The hierarchical encoder: ``num_encoder_blocks`` stages at strides 4, 8, 16, 32 (by
    default), each ``patch_embeddings[i] -> block[i] -> layer_norm[i]``.

    Stochastic depth grows linearly from 0 to ``drop_path_rate`` over all blocks.
    """

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.patch_embeddings = nn.ModuleList()
        self.block = nn.ModuleList()
        self.layer_norm = nn.ModuleList()
        in_channels = config.num_channels
        first = 0
        for stage in range(config.num_encoder_blocks):
            hidden = config.hidden_sizes[stage]
            self.patch_embeddings.append(
                OverlapPatchEmbeddings(
                    patch_size=config.patch_sizes[stage],
                    stride=config.strides[stage],
                    in_channels=in_channels,
                    hidden_size=hidden,
                )
            )
            self.block.append(
                nn.ModuleList(
                    MixTransformerBlock(
                        config,
                        hidden_size=hidden,
                        num_heads=config.num_attention_heads[stage],
                        sr_ratio=config.sr_ratios[stage],
                        mlp_ratio=config.mlp_ratios[stage],
                        drop_path=rates[first + i],
                    )
                    for i in range(config.depths[stage])
                )
            )
            self.layer_norm.append(nn.LayerNorm(hidden))
            in_channels = hidden
            first += config.depths[stage]

    def forward(self, pixel_values: torch.Tensor) -> list[tuple[torch.Tensor, int, int]]:
        """``pixel_values [B, C, H, W]`` -> per stage ``(tokens [B, H_i * W_i, C_i], H_i, W_i)``.

        ``tokens_to_map(tokens, H_i, W_i)`` gives the stage's ``[B, C_i, H_i, W_i]`` feature map.
        """
        stages = []
        hidden = pixel_values
        for embed, blocks, norm in zip(self.patch_embeddings, self.block, self.layer_norm):
            tokens, height, width = embed(hidden)
            for block in blocks:
                tokens = block(tokens, height, width)
            tokens = norm(tokens)
            stages.append((tokens, height, width))
            hidden = tokens_to_map(tokens, height, width)
        return stages
