"""OneFormer (task-conditioned universal segmentation) with a Swin backbone."""

from omniseg.models.oneformer.config import OneFormerConfig
from omniseg.models.oneformer.modeling import OneFormerForUniversalSegmentation, OneFormerOutput

__all__ = ["OneFormerConfig", "OneFormerForUniversalSegmentation", "OneFormerOutput"]
