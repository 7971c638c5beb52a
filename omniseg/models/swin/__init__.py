"""Swin Transformer backbone (the encoder of Mask2Former / MaskFormer Swin checkpoints)."""

from omniseg.models.swin.backbone import IGNORE_ON_LOAD, SwinBackbone
from omniseg.models.swin.config import SwinConfig, pop_swin_backbone

__all__ = ["IGNORE_ON_LOAD", "SwinBackbone", "SwinConfig", "pop_swin_backbone"]
