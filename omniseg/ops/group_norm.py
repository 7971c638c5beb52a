"""Group normalisation of channels-last maps with exact statistics."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Rows per block of the second pass of the fast statistics: 512 rows of 256 channels
# (0.5 MB) stay in cache between the subtraction, the square and the sum.
_VARIANCE_BLOCK_ROWS = 512


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with exact statistics on channels-last maps too.

    PyTorch's channels-last CPU kernel takes a group's variance as ``E[x^2] - E[x]^2`` in
    float32, which cancels badly where a map's values sit far from zero with little spread:
    the near-constant padding of the smaller images of a batch, for example (5e-5 relative
    error on such maps, against 2e-7 for the channels-first kernel; the decoder's masked
    attention then turns that into other masks). Here each channel's mean and variance come
    from ``var_mean`` and are pooled per group exactly (the group variance is the channels'
    mean variance plus the variance of their means), then one ``addcmul`` normalises.

    ``fast_statistics`` (set by the opt-in fast CPU mode, whose answers already move by int8's
    error): the channels' statistics in two passes instead, 8x faster than ``var_mean``'s
    strided loop (a stride-4 map of 256 channels: 2.4 vs 20 ms on one AMD EPYC core), 3x
    less accurate (mean 1.5e-6, variance 2.6e-7 relative against float64), which is enough
    to flip a tie pixel against the reference, so the default keeps ``var_mean``.

    Shapes: ``[B, C, H, W]`` in and out (channels-last memory stays channels-last).
    """

    fast_statistics: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.is_contiguous():
            return super().forward(x)
        batch, channels, height, width = x.shape
        groups, per_group = self.num_groups, channels // self.num_groups
        flat = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view of channels-last memory
        if self.fast_statistics:
            var_c, mean_c = _two_pass_var_mean(flat)
        else:
            var_c, mean_c = torch.var_mean(flat, dim=1, unbiased=False)  # [B, C]
        mean_c, var_c = mean_c.view(batch, groups, per_group), var_c.view(batch, groups, per_group)
        mean = mean_c.mean(-1, keepdim=True)  # [B, G, 1]
        var = var_c.mean(-1, keepdim=True) + (mean_c - mean).square().mean(-1, keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, groups, per_group)  # [B, G, C / G]
        shift = self.bias.view(1, groups, per_group) - mean * scale
        out = torch.addcmul(shift.view(batch, 1, channels), flat, scale.view(batch, 1, channels))
        return out.view(batch, height, width, channels).permute(0, 3, 1, 2)


def _two_pass_var_mean(flat: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean over dim 1 of ``flat [B, N, C]`` (channels contiguous):
    ``[B, C]`` each, the mean first, then the mean squared deviation from it, block by block."""
    mean = flat.mean(1, keepdim=True)  # [B, 1, C]
    squares = sum((block - mean).square().sum(1) for block in flat.split(_VARIANCE_BLOCK_ROWS, dim=1))
    return squares / flat.shape[1], mean.squeeze(1)


def group_norms_to_fast_statistics(model: nn.Module) -> list[str]:
    """Switch every :class:`GroupNorm` of ``model`` to ``fast_statistics``; return their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, GroupNorm):
            module.fast_statistics = True
            names.append(name)
    return names
