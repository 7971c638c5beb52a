"""Swin Transformer blocks, patch merging and stages.

Feature maps travel between blocks channels-last, ``[B, H, W, C]``: layer norms and linear
layers act on the last dimension, windows are cut with one gather (see
:class:`~omniseg.models.swin.attention.WindowLayout`), and no ``[B, H*W, C]`` <->
``[B, C, H, W]`` permutes are needed between blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models.swin.attention import Dense, WindowAttention, WindowLayout, window_layout
from omniseg.ops.linear import Linear, linear_and_activation

# Each activation out of place (for autograd) and in place. The MLP's hidden layer is a
# block's largest tensor: at inference a second buffer of its size costs an allocation and
# its page faults on every forward (stage 1 of Swin-T at 384x512: 19 MB, 4-5 ms per GELU).
_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "gelu": (F.gelu, torch.ops.aten.gelu_),
    "gelu_new": (partial(F.gelu, approximate="tanh"), partial(torch.ops.aten.gelu_, approximate="tanh")),
    "gelu_pytorch_tanh": (partial(F.gelu, approximate="tanh"), partial(torch.ops.aten.gelu_, approximate="tanh")),
    "relu": (F.relu, F.relu_),
    "silu": (F.silu, partial(F.silu, inplace=True)),
    "swish": (F.silu, partial(F.silu, inplace=True)),
}


class Activation(nn.Module):
    """The elementwise activation a config names (``hidden_act``), computed in place when no
    gradient flows through it: callers hand over a tensor they own (a fresh layer output)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {name!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.name = name

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out_of_place, in_place = _ACTIVATIONS[self.name]
        return out_of_place(hidden) if hidden.requires_grad else in_place(hidden)

    def extra_repr(self) -> str:
        return self.name


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability
    ``drop_prob`` and rescale the kept ones by ``1 / (1 - drop_prob)``. Identity in eval."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return branch
        keep_prob = 1.0 - self.drop_prob
        shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
        keep = torch.floor(torch.rand(shape, dtype=branch.dtype, device=branch.device) + keep_prob)
        return branch / keep_prob * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _dropout(p: float) -> nn.Module:
    # nn.Identity when p == 0 so that training runs draw random numbers only for drop path.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class SwinBlock(nn.Module):
    """One Swin block: (shifted-)window attention then an MLP, each pre-norm and residual.

    Checkpoint names: ``layernorm_before``, ``attention.*``, ``layernorm_after``,
    ``intermediate.dense`` (MLP in), ``output.dense`` (MLP out).

    As in the reference implementation, stochastic depth applies to the attention branch
    only; the MLP branch has plain dropout.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        window_size: int,
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.shifted = shifted
        hidden = int(mlp_ratio * dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attention = WindowAttention(
            dim,
            num_heads=num_heads,
            window_size=window_size,
            qkv_bias=qkv_bias,
            attention_dropout=attention_dropout,
        )
        self.layernorm_after = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.intermediate = Dense(dim, hidden)
        self.activation = Activation(hidden_act)
        self.output = Dense(hidden, dim)
        self.dropout = _dropout(hidden_dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, features: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Args:
            features: ``[B, H, W, C]``.
            layout: this block's windows of the ``H x W`` map (shifted or not), see
                :func:`~omniseg.models.swin.attention.window_layout`.

        Returns:
            ``[B, H, W, C]``.
        """
        batch, height, width, channels = features.shape
        normed = self.layernorm_before(features).view(batch, height * width, channels)
        attended = self.attention(normed, layout).view(batch, height, width, channels)
        # Residual sums are written into the branch's fresh output (the same numbers as
        # features + branch): no new buffer per block.
        features = self.drop_path(self.dropout(attended)).add_(features)

        hidden = linear_and_activation(
            self.intermediate.dense, self.layernorm_after(features), self.activation.name, self.activation
        )
        mlp = self.output(hidden)
        return self.dropout(mlp).add_(features)


class PatchMerging(nn.Module):
    """Halve the resolution, double the channels: each 2x2 patch -> one token.

    Odd sizes are zero-padded at the bottom/right first. Checkpoint names: ``norm``
    (over ``4C``), ``reduction`` (``4C -> 2C``, no bias).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        # The reference uses LayerNorm's default eps here, not config.layer_norm_eps.
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), 2C]``."""
        batch, height, width, channels = features.shape
        if height % 2 or width % 2:
            features = F.pad(features, (0, 0, 0, width % 2, 0, height % 2))
            height, width = height + height % 2, width + width % 2
        # Channel order of the checkpoint's reduction: (row, col) = (0,0), (1,0), (0,1), (1,1),
        # i.e. column-parity major. One permute + copy instead of four strided slices + cat.
        grid = features.view(batch, height // 2, 2, width // 2, 2, channels)
        merged = grid.permute(0, 1, 3, 4, 2, 5).reshape(
            batch, height // 2, width // 2, 4 * channels
        )
        return self.reduction(self.norm(merged))


def stage_windowing(
    height: int, width: int, window_size: int, *, always_partition: bool
) -> tuple[int, int]:
    """Window side of a stage's blocks at ``height x width``, and the shift of its
    shifted blocks.

    With ``always_partition`` (what the reference backbone does, and what Mask2Former was
    trained with) the configured window is used at every resolution, padding small maps.
    Otherwise, as in the reference ``SwinModel``, a map no larger than the window is
    covered by one window of side ``min(height, width)`` and not shifted.
    """
    if not always_partition and min(height, width) <= window_size:
        return min(height, width), 0
    return window_size, window_size // 2


class SwinStage(nn.Module):
    """``depth`` blocks alternating regular and shifted windows, then optional merging.

    Checkpoint names: ``blocks.<i>.*``, ``downsample.*``.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: list[float],
        downsample: bool,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                num_heads=num_heads,
                window_size=window_size,
                shifted=index % 2 == 1,
                drop_path=drop_path[index],
                **block_kwargs,
            )
            for index in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(
        self, features: torch.Tensor, *, always_partition: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            features: ``[B, H, W, C]``.

        Returns:
            ``(stage_output [B, H, W, C], next_stage_input [B, ceil(H/2), ceil(W/2), 2C])``;
            the second is the first when there is no downsampling.
        """
        _, height, width, _ = features.shape
        window_size, shift_size = stage_windowing(
            height, width, self.window_size, always_partition=always_partition
        )
        # Layouts (gather indices, shift mask) are shared by all blocks of the stage.
        layouts = {}
        for block in self.blocks:
            shift = shift_size if block.shifted else 0
            if shift not in layouts:
                layouts[shift] = window_layout(
                    height, width, window_size, shift, device=features.device
                )
            features = block(features, layouts[shift])
        if self.downsample is None:
            return features, features
        return features, self.downsample(features)
