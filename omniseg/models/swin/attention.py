"""Window self-attention with a learned relative position bias (Swin, Liu et al. 2021).

Tokens attend only within non-overlapping ``window x window`` windows. Each head adds a
learned bias that depends only on the offset between the two tokens, looked up in a table
of ``(2 * window - 1) ** 2`` entries.

Module and parameter names mirror the hub checkpoints (``attention.self.query``,
``attention.self.relative_position_bias_table``, ``attention.output.dense``, ...), so
published weights load unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from omniseg.ops.linear import HoldsPackedWeights, Linear, linear

# Projecting before cutting windows skips the padding slots' matmul, but gathers three
# times the channels. It pays when (padding slots / all slots) * channels is at least this:
# Swin-T at 384x512 projects first in stages 3 and 4 (22% and 35% padding), not in 1 and 2.
_PROJECT_FIRST = 24

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
        float32 tensor ``[num_windows, window_size**2, window_size**2]`` of 0 and -100,
        windows row-major.
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


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """How the tokens of an ``H x W`` map are cut into (possibly shifted) windows.

    The map is zero-padded at the bottom/right to whole windows, cyclically shifted by
    ``-shift_size`` and cut into windows, as in the reference. Here all of that is one
    gather (``gather_index``) plus zeroing the padding slots, and the way back (unshift,
    unpad) one more gather (``restore_index``): two copies per block instead of up to eight.

    Attributes:
        window_size: side of the windows, ``L = window_size**2`` tokens each.
        num_windows: windows per image.
        gather_index: ``[num_windows * L]`` long; the token (row-major in ``H x W``) that
            fills each window slot (any valid token for padding slots).
        padding_slots: ``[K]`` long, the window slots that are zero padding; None if none.
        restore_index: ``[H * W]`` long; the window slot holding each token.
        shift_mask: ``[num_windows, L, L]`` additive mask when shifted, else None.
    """

    window_size: int
    num_windows: int
    gather_index: torch.Tensor
    padding_slots: torch.Tensor | None
    restore_index: torch.Tensor
    shift_mask: torch.Tensor | None


@functools.lru_cache(maxsize=64)
def window_layout(
    height: int, width: int, window_size: int, shift_size: int, *, device: torch.device
) -> WindowLayout:
    """The :class:`WindowLayout` of an ``height x width`` map (``shift_size`` 0: regular).

    Cached: the same sizes give the same object, whose tensors callers must not modify
    (building the indices and the shift mask took about 1% of a Swin-T forward). They are
    made as normal tensors even under ``inference_mode``, so that a layout first made there
    still serves a training forward (autograd saves the gather indices).
    """
    with torch.inference_mode(False):
        return _window_layout(height, width, window_size, shift_size, device=device)


def _window_layout(
    height: int, width: int, window_size: int, shift_size: int, *, device: torch.device
) -> WindowLayout:
    padded_h = -(-height // window_size) * window_size
    padded_w = -(-width // window_size) * window_size
    rows_of_windows, cols_of_windows = padded_h // window_size, padded_w // window_size
    # Window slot -> (row, col) in the shifted, padded map, windows row-major.
    slot = torch.arange(padded_h * padded_w, device=device).view(
        rows_of_windows, window_size, cols_of_windows, window_size
    )
    slot = slot.transpose(1, 2).reshape(-1)  # slot order -> flat index in the padded map
    # Rolling by -shift means slot (y, x) holds the padded map's ((y+s) % Hp, (x+s) % Wp).
    rows = (slot // padded_w + shift_size) % padded_h
    cols = (slot % padded_w + shift_size) % padded_w
    valid = (rows < height) & (cols < width)
    source = torch.where(valid, rows * width + cols, torch.zeros_like(rows))
    restore = torch.empty(height * width, dtype=torch.long, device=device)
    restore[source[valid]] = torch.arange(slot.numel(), device=device)[valid]
    padding = None if bool(valid.all()) else torch.nonzero(~valid).flatten()
    mask = None
    if shift_size:
        mask = shift_attention_mask(padded_h, padded_w, window_size, shift_size, device=device)
    return WindowLayout(
        window_size=window_size,
        num_windows=rows_of_windows * cols_of_windows,
        gather_index=source,
        padding_slots=padding,
        restore_index=restore,
        shift_mask=mask,
    )


class WindowSelfAttention(HoldsPackedWeights):
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
        self.query = Linear(dim, dim, bias=qkv_bias)
        self.key = Linear(dim, dim, bias=qkv_bias)
        self.value = Linear(dim, dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        # Inference cache of the stacked projection (see _fused_parameters); not state.
        self.stacked_qkv: nn.Module | None = None  # set by stack_qkv(), for quantization
        self._fused_key: tuple | None = None
        self._fused_cache: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._fused_sources: list[torch.Tensor] = []
        # Inference cache of the last layout's attention bias (see attention_bias); not state.
        self._bias_key: tuple | None = None
        self._bias_cache: tuple[WindowLayout, torch.Tensor] | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> WindowSelfAttention:
        # The stacked projection's and the bias's caches too: they keep old parameters alive.
        self._fused_key, self._fused_cache, self._fused_sources = None, None, []
        self._bias_key, self._bias_cache = None, None
        return super()._apply(fn, recurse)

    def position_bias(self, window_size: int) -> torch.Tensor:
        """Bias ``[num_heads, L, L]`` for windows of side ``window_size`` (``L = side**2``)."""
        if window_size == self.window_size:
            index = self.relative_position_index
        else:  # a window clamped to a small feature map: the table's central offsets
            index = relative_position_index(window_size, self.window_size).to(
                self.relative_position_bias_table.device
            )
        return self.relative_position_bias_table[index].permute(2, 0, 1)

    def attention_bias(self, layout: WindowLayout, dtype: torch.dtype) -> torch.Tensor:
        """The additive attention mask of ``layout``'s windows, contiguous: the position
        bias ``[1, h, L, L]``, plus the shift mask when shifted (``[num_windows, h, L, L]``).

        With gradients off the last layout's bias is kept, keyed on the layout and the
        table's memory and version counter: a forward at the same size reuses it instead of
        gathering the table, adding the mask and copying the sum (SDPA wants a contiguous
        mask; a permuted gather plus the mask was copied again inside it).
        """
        table = self.relative_position_bias_table
        key = None
        if not torch.is_grad_enabled():
            try:
                key = (id(layout), table.data_ptr(), table._version, dtype)
            except RuntimeError:  # a table created under inference_mode has no version
                key = None
        if key is not None and key == self._bias_key:
            return self._bias_cache[1]
        bias = self.position_bias(layout.window_size).to(dtype)[None]  # [1, h, L, L]
        if layout.shift_mask is not None:
            bias = bias + layout.shift_mask.to(dtype)[:, None]  # [nW, h, L, L]
        bias = bias.contiguous()
        if key is not None:
            # The layout is kept with the bias so that its id stays unique while in the key.
            self._bias_key, self._bias_cache = key, (layout, bias)
        return bias

    def _fused_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query/key/value weights ``[3C, C]`` and biases ``[3C]`` stacked.

        When no gradient is needed the stack is cached, keyed on the identity, storage and
        version counter of each parameter, so that loading new weights (in place or not)
        or moving the module rebuilds it.
        """
        parts = [self.query, self.key, self.value]
        tensors = [lin.weight for lin in parts]
        tensors += [lin.bias for lin in parts if lin.bias is not None]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        key = None
        if not needs_grad:
            try:
                key = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
            except RuntimeError:  # parameters created under inference_mode have no version
                key = None
        if key is not None and key == self._fused_key:
            return self._fused_cache
        weight = torch.cat([lin.weight for lin in parts])
        bias = torch.cat([lin.bias for lin in parts]) if self.query.bias is not None else None
        if key is not None:
            # Keep the tensors alive so their ids stay unique while they are in the key.
            self._fused_key, self._fused_cache, self._fused_sources = key, (weight, bias), tensors
        return weight, bias

    def stack_qkv(self) -> nn.Linear:
        """Freeze the three projections into one ``nn.Linear`` (``stacked_qkv``) used from
        now on, so that module-level transforms such as dynamic quantization see a single
        layer. Inference only: later changes to ``query``/``key``/``value`` are ignored."""
        weight, bias = self._fused_parameters()
        stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        stacked.to(weight.device)
        with torch.no_grad():
            stacked.weight.copy_(weight)
            if bias is not None:
                stacked.bias.copy_(bias)
        self.stacked_qkv = stacked
        return stacked

    def fused_qkv(self, tokens: torch.Tensor) -> torch.Tensor:
        """Project with one matmul instead of three: ``[..., C] -> [..., 3C]`` (query, key,
        value concatenated)."""
        if self.stacked_qkv is not None:
            return self.stacked_qkv(tokens)
        weight, bias = self._fused_parameters()
        return linear(tokens, weight, bias, packed=self.packed_weights)


class Dense(nn.Module):
    """A linear layer kept under the checkpoint name ``<parent>.dense``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.dense = Linear(in_features, out_features)

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

    def forward(self, tokens: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Attend within each window of the map.

        Args:
            tokens: ``[B, H*W, C]`` (row-major map, already layer-normed).
            layout: windows of this ``H x W`` map, from :func:`window_layout`.

        Returns:
            ``[B, H*W, C]``, after the output projection.
        """
        batch, _, channels = tokens.shape
        num_windows, length = layout.num_windows, layout.window_size**2
        # Padding slots are zero *after* the norm, as in the reference: zero vectors that
        # still take part in attention, projected to the biases.
        slots = num_windows * length
        padding = layout.padding_slots
        if padding is not None and len(padding) * channels >= _PROJECT_FIRST * slots:
            # Project the tokens, then cut windows of projections: no matmul on the padding.
            windows = self.self.fused_qkv(tokens).index_select(1, layout.gather_index)  # [B, nW*L, 3C]
            windows[:, padding] = self.self.fused_qkv(tokens.new_zeros(1, channels))
        else:
            windows = tokens.index_select(1, layout.gather_index)  # [B, nW*L, C]
            if padding is not None:
                windows.index_fill_(1, padding, 0.0)
            windows = self.self.fused_qkv(windows)
        # SDPA gets 4-D inputs [B*nW, h, L, d]: on CPU that selects the fused (flash) kernel,
        # while 5-D inputs fall back to the much slower unfused maths. They are views of the
        # windows' [B*nW, L, 3, h, d] projections, no copy.
        heads, head_dim = self.self.num_heads, self.self.head_dim
        query, key, value = windows.view(batch * num_windows, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attn_bias = self.self.attention_bias(layout, tokens.dtype)  # [1 or nW, h, L, L]
        dropout = self.attention_dropout if self.training else 0.0
        # SDPA returns [N, h, L, d] views of [N, L, h, d] memory: transposed back, the
        # windows' tokens are rows of C channels with no copy.
        if layout.shift_mask is None:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_bias, dropout_p=dropout
            ).transpose(1, 2)
        else:
            # The per-window mask differs between windows but not between images: attend
            # image by image rather than materialising the mask batch times.
            contexts = [
                F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout).transpose(1, 2)
                for q, k, v in zip(query.split(num_windows), key.split(num_windows), value.split(num_windows))
            ]
            context = contexts[0] if batch == 1 else torch.cat(contexts)
        context = context.reshape(batch, num_windows * length, channels)  # [B, nW*L, C]
        # Back to map order (dropping padding) before the projection: fewer rows to project.
        return self.output(context.index_select(1, layout.restore_index))
