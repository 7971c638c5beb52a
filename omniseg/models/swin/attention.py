"""Window self-attention with a learned relative position bias (Swin, Liu et al. 2021).

Tokens attend only within non-overlapping ``window x window`` windows. Each head adds a
learned bias that depends only on the offset between the two tokens, looked up in a table
of ``(2 * window - 1) ** 2`` entries.

Module and parameter names mirror the hub checkpoints (``attention.self.query``,
``attention.self.relative_position_bias_table``, ``attention.output.dense``, ...), so
published weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The additive mask value the reference uses between tokens of different shift regions.
# Not -inf: a finite value keeps the exact same softmax numbers as the reference.
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window_size: int, table_window: int | None = None) -> torch.Tensor:
    """Index into the bias table for every (query, key) pair of a window.

    Args:
        window_size: side of the window actually used.
        table_window: side of the window the table was built for (defaults to
            ``window_size``). A smaller window uses the central part of a larger table.

    Returns:
        LongTensor ``[window_size**2, window_size**2]``; entry ``(i, j)`` is the row of the
        table for the offset of token ``i`` from token ``j`` (row-major within the window).
    """
    table_window = window_size if table_window is None else table_window
    coords = torch.arange(window_size)
    rows = coords.repeat_interleave(window_size)  # [L], row of each token
    cols = coords.repeat(window_size)  # [L], column of each token
    d_row = rows[:, None] - rows[None, :] + (table_window - 1)  # [L, L] in [0, 2*tw-2]
    d_col = cols[:, None] - cols[None, :] + (table_window - 1)
    return d_row * (2 * table_window - 1) + d_col


def shift_attention_mask(
    height: int, width: int, window_size: int, shift_size: int, *, device: torch.device
) -> torch.Tensor:
    """Additive mask for shifted-window attention on a padded ``height x width`` map.

    After the cyclic shift, a window at the bottom or right border holds tokens that were
    far apart in the image; tokens may only attend to tokens of the same region. Regions
    per axis: ``[0, n - window)``, ``[n - window, n - shift)``, ``[n - shift, n)``.

    Returns:
        float32 tensor ``[num_windows, window_size**2, window_size**2]`` of 0 and -100, in
        the window order of :func:`omniseg.models.swin.blocks.window_partition`.
    """
    h = torch.arange(height, device=device)
    w = torch.arange(width, device=device)
    h_region = (h >= height - window_size).long() + (h >= height - shift_size).long()
    w_region = (w >= width - window_size).long() + (w >= width - shift_size).long()
    region = h_region[:, None] * 3 + w_region[None, :]  # [H, W]
    region = region.view(height // window_size, window_size, width // window_size, window_size)
    region = region.transpose(1, 2).reshape(-1, window_size * window_size)  # [nW, L]
    different = region[:, :, None] != region[:, None, :]
    return torch.zeros(different.shape, device=device).masked_fill_(different, SHIFT_MASK_VALUE)


class WindowSelfAttention(nn.Module):
    """Query/key/value projections and the relative position bias table of one block.

    Checkpoint names: ``query``, ``key``, ``value``, ``relative_position_bias_table``.
    ``relative_position_index`` is derived from the window size and not saved (published
    checkpoints do carry it; loaders ignore it, see ``IGNORE_ON_LOAD`` in the backbone).
    """

    def __init__(self, dim: int, *, num_heads: int, window_size: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )

    def position_bias(self, window_size: int) -> torch.Tensor:
        """Bias ``[num_heads, L, L]`` for windows of side ``window_size`` (``L = side**2``)."""
        if window_size == self.window_size:
            index = self.relative_position_index
        else:  # a window clamped to a small feature map: the table's central offsets
            index = relative_position_index(window_size, self.window_size).to(
                self.relative_position_bias_table.device
            )
        return self.relative_position_bias_table[index].permute(2, 0, 1)

    def fused_qkv(self, windows: torch.Tensor) -> torch.Tensor:
        """Project with one matmul instead of three.

        Args:
            windows: ``[..., L, C]``.

        Returns:
            ``[3, ..., num_heads, L, head_dim]`` (query, key, value stacked first).
        """
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = None
        if self.query.bias is not None:
            bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(windows, weight, bias)  # [..., L, 3C]
        *lead, length, _ = qkv.shape
        qkv = qkv.view(*lead, length, 3, self.num_heads, self.head_dim)
        n = len(lead)
        # [..., L, 3, h, d] -> [3, ..., h, L, d]
        return qkv.permute(n + 1, *range(n), n + 2, n, n + 3)


class Dense(nn.Module):
    """A linear layer kept under the checkpoint name ``<parent>.dense``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with relative position bias.

    Submodules are named ``self`` and ``output`` to match checkpoint keys
    (``attention.self.query.weight``, ``attention.output.dense.weight``).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self = WindowSelfAttention(
            dim, num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias
        )
        self.output = Dense(dim, dim)
        self.attention_dropout = attention_dropout

    def forward(
        self,
        windows: torch.Tensor,
        *,
        window_size: int,
        shift_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend within each window.

        Args:
            windows: ``[B, num_windows, L, C]`` tokens grouped by window, ``L = window_size**2``.
            window_size: side of the windows (the configured one, or smaller if clamped).
            shift_mask: ``[num_windows, L, L]`` additive mask for shifted windows, or None.

        Returns:
            ``[B, num_windows, L, C]``.
        """
        batch, num_windows, length, channels = windows.shape
        query, key, value = self.self.fused_qkv(windows)  # each [B, nW, h, L, d]
        bias = self.self.position_bias(window_size).to(windows.dtype)  # [h, L, L]
        # One additive term for SDPA: broadcast over the batch, per window only if shifted.
        attn_bias = bias if shift_mask is None else bias + shift_mask.to(bias.dtype)[:, None]
        dropout = self.attention_dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_bias, dropout_p=dropout
        )  # [B, nW, h, L, d]
        context = context.transpose(2, 3).reshape(batch, num_windows, length, channels)
        return self.output(context)
