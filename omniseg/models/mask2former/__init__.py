"""Mask2Former (masked-attention mask transformer) with a Swin backbone."""

from omniseg.models.mask2former.config import Mask2FormerConfig
from omniseg.models.mask2former.modeling import Mask2FormerForUniversalSegmentation, Mask2FormerOutput

__all__ = ["Mask2FormerConfig", "Mask2FormerForUniversalSegmentation", "Mask2FormerOutput"]
