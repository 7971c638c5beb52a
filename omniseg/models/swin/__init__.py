"""Swin Transformer backbone (the encoder of Mask2Former / MaskFormer Swin checkpoints)."""

from omniseg.models.swin.backbone import IGNORE_ON_LOAD, SwinBackbone
from omniseg.models.swin.config import SwinConfig

__all__ = ["IGNORE_ON_LOAD", "SwinBackbone", "SwinConfig"]
