"""DETR for panoptic segmentation: ResNet backbone, transformer encoder-decoder, box and mask heads."""

from omniseg.models.detr.config import DetrConfig, ResNetConfig
from omniseg.models.detr.modeling import DetrForSegmentation, DetrSegmentationOutput

__all__ = ["DetrConfig", "DetrForSegmentation", "DetrSegmentationOutput", "ResNetConfig"]
