"""SegFormer (Xie et al., 2021): Mix Transformer encoder with an all-MLP decode head."""

from omniseg.models.segformer.config import SegformerConfig
from omniseg.models.segformer.modeling import SegformerForSemanticSegmentation, SemanticSegmenterOutput

__all__ = ["SegformerConfig", "SegformerForSemanticSegmentation", "SemanticSegmenterOutput"]
