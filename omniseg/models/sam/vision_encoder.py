"""SAM's image encoder: a plain ViT over 16x16 patches with windowed attention, decomposed
relative positions and a convolutional neck.

``pixel_values [B, 3, S, S]`` (``S = image_size``, 1024 for the hub models) become a
``[B, G, G, hidden]`` token grid (``G = S / patch_size``); each layer attends inside
``window_size`` windows (the grid padded to a multiple of it) or, for the layers in
``global_attn_indexes``, over the whole grid. The neck maps the grid to the
``[B, output_channels, G, G]`` image embeddings that the mask decoder reads.

Module names mirror the hub checkpoints (``vision_encoder.layers.0.attn.qkv`` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models.sam.config import SamVisionConfig
from omniseg.models.segformer.encoder import activation
from omniseg.ops.linear import Linear, linear, linear_and_activation


# Queries per block of global attention (see SamVisionAttention.attend).
QUERY_BLOCK = 1024


class SamPatchEmbeddings(nn.Module):
    """Non-overlapping ``patch_size`` convolution: ``[B, 3, S, S] -> [B, G, G, hidden]``."""

    def __init__(self, config: SamVisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values are {height}x{width}, the model expects "
                f"{self.image_size}x{self.image_size} (the processor pads to it)"
            )
        return self.projection(pixel_values).permute(0, 2, 3, 1)


def relative_positions(size: int, table: torch.Tensor) -> torch.Tensor:
    """Embeddings of every (query, key) offset along one axis of a ``size``-long window.

    ``table [L, C]`` holds one embedding per offset ``-(size-1) .. size-1`` (``L = 2 size - 1``;
    another ``L`` is linearly resampled to it first, as the reference does). Returns
    ``[size, size, C]`` with entry ``[q, k] = table[q - k + size - 1]``.
    """
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T
    offsets = torch.arange(size, device=table.device)
    return table[offsets[:, None] - offsets[None, :] + (size - 1)]


class SamVisionAttention(nn.Module):
    """Multi-head self-attention over a ``[B, h, w, C]`` grid (one window or the whole grid)
    with decomposed relative positions (MViTv2): the attention logit of query ``(i, j)`` and
    key ``(k, l)`` gets ``q . Rh[i - k] + q . Rw[j - l]``.

    ``[B, h, w, C] -> [B, h, w, C]``.
    """

    def __init__(self, config: SamVisionConfig, *, window_size: int) -> None:
        super().__init__()
        size = config.grid_size if window_size == 0 else window_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.qkv = Linear(config.hidden_size, config.hidden_size * 3, bias=config.qkv_bias)
        self.proj = Linear(config.hidden_size, config.hidden_size)
        self.use_rel_pos = config.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, self.head_dim))

    def relative_position_logits(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors of the relative-position logits of queries ``grid [BH, h, w, D]``:
        ``(rel_h [BH, h, w, h], rel_w [BH, h, w, w])``, contiguous, with ``rel_h[b, i, j, k] =
        q_ij . Rh[i - k]`` and ``rel_w[b, i, j, l] = q_ij . Rw[j - l]``."""
        height, width = grid.shape[1:3]
        row_table = relative_positions(height, self.rel_pos_h)  # [h, h, D]
        col_table = relative_positions(width, self.rel_pos_w)  # [w, w, D]
        # Per query row i: [BH * w, D] @ [D, h]; per query column j: [BH * h, D] @ [D, w]
        # (batched matmuls, no [h, w, h, D] intermediate).
        rel_h = torch.matmul(grid.transpose(0, 1), row_table.transpose(1, 2)[:, None])  # [h, BH, w, h]
        rel_w = torch.matmul(grid.permute(2, 0, 1, 3), col_table.transpose(1, 2)[:, None])  # [w, BH, h, w]
        return rel_h.transpose(0, 1).contiguous(), rel_w.permute(1, 2, 0, 3).contiguous()

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from projected ``qkv [B, h, w, 3C]`` to ``[B, h, w, C]`` (before ``proj``).

        Queries go in blocks of grid rows (about 1024 tokens): the relative-position
        logits of a global layer, ``heads x N x N`` (800 MB for ViT-B), then exist one
        block at a time, each written into the same buffer (a fresh 200 MB tensor per
        block costs more in page faults than the sum itself). Each query's softmax is its
        own, so the answer is the same.
        """
        batch, height, width, _ = qkv.shape
        tokens = height * width
        split = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = split.unbind(0)  # [B, heads, N, D]
        dropout = self.dropout if self.training else 0.0
        if not self.use_rel_pos:
            attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        else:
            rel_h, rel_w = self.relative_position_logits(
                query.reshape(batch * self.num_heads, height, width, self.head_dim)
            )
            block = max(1, QUERY_BLOCK // width)
            # With autograd recording (a forward outside torch.no_grad, as in
            # ``outputs = model(**inputs)``), ``out=`` is refused and a reused buffer would
            # overwrite what the backward pass needs: each block then gets its own tensor.
            shared = not (torch.is_grad_enabled() and (rel_h.requires_grad or rel_w.requires_grad))
            if shared:
                buffer = query.new_empty(batch * self.num_heads * min(block, height) * width * tokens)
            parts = []
            for first in range(0, height, block):
                rows = slice(first, min(first + block, height))
                count = rows.stop - rows.start
                if shared:
                    bias = buffer[: batch * self.num_heads * count * width * tokens].view(
                        batch * self.num_heads, count, width, height, width
                    )
                    torch.add(rel_h[:, rows, :, :, None], rel_w[:, rows, :, None, :], out=bias)
                else:
                    bias = rel_h[:, rows, :, :, None] + rel_w[:, rows, :, None, :]
                parts.append(
                    F.scaled_dot_product_attention(
                        query[:, :, rows.start * width : rows.stop * width],
                        key,
                        value,
                        attn_mask=bias.view(batch, self.num_heads, count * width, tokens),
                        dropout_p=dropout,
                    )
                )
            attended = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return attended.transpose(1, 2).reshape(batch, height, width, -1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, C] -> [B, h, w, C]``."""
        return self.proj(self.attend(self.qkv(hidden)))


def window_partition(
    hidden: torch.Tensor, window: int, *, fill: torch.Tensor | None = None
) -> tuple[torch.Tensor, int, int]:
    """``[B, H, W, C]`` -> ``[B * nH * nW, window, window, C]`` (padded at the bottom and
    right to multiples of ``window`` with the vector ``fill [C]``, or zeros), and the padded
    ``(H, W)``."""
    batch, height, width, channels = hidden.shape
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if pad_h or pad_w:
        padded = hidden.new_zeros(batch, height + pad_h, width + pad_w, channels)
        if fill is not None:
            padded.copy_(fill.expand_as(padded))
        padded[:, :height, :width] = hidden
        hidden = padded
    padded_h, padded_w = height + pad_h, width + pad_w
    windows = hidden.view(batch, padded_h // window, window, padded_w // window, window, channels)
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels), padded_h, padded_w


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, window, window, C] -> [B, H, W, C]``."""
    padded_h, padded_w = padded
    height, width = size
    batch = windows.shape[0] // ((padded_h // window) * (padded_w // window))
    hidden = windows.view(batch, padded_h // window, padded_w // window, window, window, -1)
    hidden = hidden.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)
    return hidden[:, :height, :width]


class SamMLPBlock(nn.Module):
    """``lin2(act(lin1(x)))``: ``[..., hidden] -> [..., hidden]`` through ``mlp_dim``."""

    def __init__(self, *, hidden_size: int, mlp_dim: int, hidden_act: str) -> None:
        super().__init__()
        self.lin1 = Linear(hidden_size, mlp_dim)
        self.lin2 = Linear(mlp_dim, hidden_size)
        self.hidden_act = hidden_act
        self.act = activation(hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lin2(linear_and_activation(self.lin1, hidden, self.hidden_act, self.act))


class SamVisionLayer(nn.Module):
    """Pre-norm ViT block, attention windowed unless ``window_size == 0``.
    ``[B, G, G, C] -> [B, G, G, C]``."""

    def __init__(self, config: SamVisionConfig, *, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SamVisionAttention(config, window_size=window_size)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SamMLPBlock(
            hidden_size=config.hidden_size, mlp_dim=config.mlp_dim, hidden_act=config.hidden_act
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.attn.qkv(self.layer_norm1(hidden))
        if self.window_size > 0:
            # The reference pads the normed tokens with zeros and projects the padding too;
            # a zero token's projection is the bias, so the padding is the bias here, and
            # the output projection runs on the real tokens only (20% fewer rows for ViT-B:
            # a 64x64 grid pads to 70x70 for windows of 14).
            height, width = hidden.shape[1:3]
            windows, padded_h, padded_w = window_partition(qkv, self.window_size, fill=self.attn.qkv.bias)
            attended = window_unpartition(
                self.attn.attend(windows), self.window_size, (padded_h, padded_w), (height, width)
            )
        else:
            attended = self.attn.attend(qkv)
        hidden = hidden + self.attn.proj(attended)
        return hidden + self.mlp(self.layer_norm2(hidden))


class SamVisionNeck(nn.Module):
    """1x1 conv (no bias) -> LayerNorm over channels -> 3x3 conv (no bias) -> LayerNorm.
    ``[B, G, G, C] -> [B, output_channels, G, G]``."""

    def __init__(self, config: SamVisionConfig) -> None:
        super().__init__()
        channels = config.output_channels
        self.conv1 = nn.Conv2d(config.hidden_size, channels, kernel_size=1, bias=False)
        self.layer_norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.layer_norm2 = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The 1x1 convolution is a per-token linear map; the norms act on the channels of
        # each token, so everything but the 3x3 convolution stays channels-last.
        hidden = self.layer_norm1(linear(hidden, self.conv1.weight.flatten(1)))
        hidden = self.conv2(hidden.permute(0, 3, 1, 2))
        hidden = self.layer_norm2(hidden.permute(0, 2, 3, 1))
        return hidden.permute(0, 3, 1, 2).contiguous()


class SamVisionEncoder(nn.Module):
    """``pixel_values [B, 3, S, S]`` -> image embeddings ``[B, output_channels, G, G]``."""

    def __init__(self, config: SamVisionConfig) -> None:
        super().__init__()
        self.patch_embed = SamPatchEmbeddings(config)
        grid = config.grid_size
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, grid, grid, config.hidden_size)) if config.use_abs_pos else None
        )
        self.layers = nn.ModuleList(
            SamVisionLayer(
                config, window_size=0 if i in config.global_attn_indexes else config.window_size
            )
            for i in range(config.num_hidden_layers)
        )
        self.neck = SamVisionNeck(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.patch_embed(pixel_values)
        if self.pos_embed is not None:
            hidden = hidden + self.pos_embed
        for layer in self.layers:
            hidden = layer(hidden)
        return self.neck(hidden)
