"""The Swin backbone of MaskFormer checkpoints (the reference's ``MaskFormerSwinBackbone``).

The maths is :mod:`omniseg.models.swin`'s with the configured window at every stage (the
stage outputs before patch merging, each through its own LayerNorm); only the checkpoint
layout differs, so the same embedding and stage modules are reused under these names::

    model.embeddings.*                  (as SwinBackbone's ``embeddings.*``)
    model.encoder.layers.<s>.*          (as SwinBackbone's ``encoder.layers.<s>.*``)
    hidden_states_norms.<i>.{weight,bias}   i = 0..3 for stage1..stage4 (a list, not by name)

The reference also saves ``model.layernorm.*`` (its classification model's final norm, never
used for feature maps) and each block's ``relative_position_index``; see :data:`IGNORE_ON_LOAD`.
"""

from __future__ import annotations

import torch
from torch import nn

from omniseg.models.swin import SwinConfig
from omniseg.models.swin import IGNORE_ON_LOAD as SWIN_IGNORE_ON_LOAD
from omniseg.models.swin.backbone import SwinEmbeddings, SwinEncoder

IGNORE_ON_LOAD: tuple[str, ...] = SWIN_IGNORE_ON_LOAD + ("encoder.model.layernorm.weight", "encoder.model.layernorm.bias")
"""Suffixes of checkpoint tensors :class:`MaskFormerSwinBackbone` has no place for."""


class MaskFormerSwinTrunk(nn.Module):
    """Patch embeddings and stages (checkpoint prefix ``model``)."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinEncoder(config)


class MaskFormerSwinBackbone(nn.Module):
    """Swin Transformer returning the four stage maps, each after its LayerNorm.

    Example::

        backbone = MaskFormerSwinBackbone(config.backbone_config)
        maps = backbone(pixel_values)  # [B, C, H/4, W/4], [B, 2C, H/8, W/8], ... [B, 8C, H/32, W/32]
    """

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.model = MaskFormerSwinTrunk(config)
        widths = [config.stage_channels[f"stage{i}"] for i in range(1, len(config.depths) + 1)]
        # Default eps, as in the reference.
        self.hidden_states_norms = nn.ModuleList(nn.LayerNorm(width) for width in widths)
        self.channels = widths

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` -> one ``[B, C_i, H_i, W_i]`` map per stage (channels-last memory);
        stage 1 is ``ceil(H / patch)`` high, each later stage halves it (rounding up)."""
        features = self.model.embeddings(pixel_values)
        maps = []
        for stage, norm in zip(self.model.encoder.layers, self.hidden_states_norms):
            output, features = stage(features, always_partition=True)
            maps.append(norm(output).permute(0, 3, 1, 2))
        return maps
