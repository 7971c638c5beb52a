"""Segment Anything (SAM): promptable masks from points, boxes and masks."""

from omniseg.models.sam.config import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig
from omniseg.models.sam.modeling import SamImageSegmentationOutput, SamModel

__all__ = [
    "SamConfig",
    "SamImageSegmentationOutput",
    "SamMaskDecoderConfig",
    "SamModel",
    "SamPromptEncoderConfig",
    "SamVisionConfig",
]
