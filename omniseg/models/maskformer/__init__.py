"""MaskFormer (per-pixel queries, mask classification) with a Swin backbone and a DETR decoder."""

from omniseg.models.maskformer.config import MaskFormerConfig, MaskFormerDecoderConfig
from omniseg.models.maskformer.modeling import MaskFormerForInstanceSegmentation, MaskFormerOutput

__all__ = ["MaskFormerConfig", "MaskFormerDecoderConfig", "MaskFormerForInstanceSegmentation", "MaskFormerOutput"]
