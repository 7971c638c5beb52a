"""MaskFormer's pixel decoder: a feature pyramid (FPN) from the backbone's four maps.

The lowest-resolution map (stride 32) goes through a 3x3 conv ``stem``; then, from stride
16 up to stride 4, the running map is upsampled (nearest) to the next backbone map, added to
that map's 1x1 projection and smoothed by a 3x3 conv. Every conv is followed by a 32-group
GroupNorm (and ReLU for the 3x3 ones). A last 3x3 conv (``mask_projection``) turns the
stride-4 map into the mask features. Names mirror the hub checkpoints
(``fpn.stem.{0,1}``, ``fpn.layers.<i>.proj.{0,1}``, ``fpn.layers.<i>.block.{0,1}``,
``mask_projection``), the ``Sequential`` indices included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class ConvNormReLU(nn.Sequential):
    """3x3 conv (no bias), GroupNorm(32), ReLU. Checkpoint names ``0``, ``1``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(32, out_channels),
            nn.ReLU(inplace=True),
        )


class FPNLayer(nn.Module):
    """One top-down step: ``block(upsample(down) + proj(lateral))``."""

    def __init__(self, feature_size: int, lateral_channels: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(lateral_channels, feature_size, kernel_size=1, bias=False),
            nn.GroupNorm(32, feature_size),
        )
        self.block = ConvNormReLU(feature_size, feature_size)

    def forward(self, down: Tensor, lateral: Tensor) -> Tensor:
        """``down [B, F, h, w]`` (coarser), ``lateral [B, C, H, W]`` -> ``[B, F, H, W]``."""
        lateral = self.proj(lateral)
        up = F.interpolate(down, size=lateral.shape[-2:], mode="nearest")
        # The resized map is fresh and nearest resizing's backward does not read it: add in place.
        return self.block(up.add_(lateral))


class FPN(nn.Module):
    """Stem on the coarsest map, then one :class:`FPNLayer` per finer map (coarse to fine)."""

    def __init__(self, in_channels: int, lateral_channels: Sequence[int], feature_size: int) -> None:
        super().__init__()
        self.stem = ConvNormReLU(in_channels, feature_size)
        self.layers = nn.Sequential(*(FPNLayer(feature_size, width) for width in reversed(lateral_channels)))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Backbone maps (fine to coarse) -> the finest output map ``[B, F, H_0, W_0]``."""
        output = self.stem(features[-1])
        for layer, lateral in zip(self.layers, reversed(features[:-1])):
            output = layer(output, lateral)
        return output


class MaskFormerPixelDecoder(nn.Module):
    """Backbone maps -> ``[B, mask_feature_size, H / 4, W / 4]`` mask features."""

    def __init__(self, *, feature_channels: Sequence[int], feature_size: int, mask_feature_size: int) -> None:
        super().__init__()
        if feature_size % 32:
            raise ValueError(f"fpn_feature_size must be a multiple of 32 (GroupNorm groups), got {feature_size}")
        self.fpn = FPN(feature_channels[-1], feature_channels[:-1], feature_size)
        self.mask_projection = nn.Conv2d(feature_size, mask_feature_size, kernel_size=3, padding=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """See the class docstring; ``features`` are the backbone's maps, fine to coarse."""
        return self.mask_projection(self.fpn(features))
