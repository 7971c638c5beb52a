"""``SegformerForSemanticSegmentation``: Mix Transformer encoder + all-MLP decode head."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models.base import PretrainedModel
from omniseg.models.segformer.config import SegformerConfig
from omniseg.models.segformer.decode_head import SegformerDecodeHead
from omniseg.models.segformer.encoder import MixTransformerEncoder


@dataclasses.dataclass
class SemanticSegmenterOutput:
    """Output of a per-pixel model.

    Attributes:
        logits: ``[B, num_labels, H / 4, W / 4]`` class scores (before softmax) at the first
            encoder stage's resolution.
        loss: scalar training loss, present when ``labels`` were given.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor | None:
        return getattr(self, key)


class SegformerBackbone(nn.Module):
    """Holds the encoder under the checkpoints' ``segformer.encoder`` prefix."""

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        self.encoder = MixTransformerEncoder(config)


class SegformerForSemanticSegmentation(PretrainedModel):
    """SegFormer for semantic segmentation, loading the hub's SegFormer checkpoints.

    ``forward(pixel_values [B, 3, H, W], labels [B, H', W'] | None)`` returns
    :class:`SemanticSegmenterOutput` with ``logits [B, num_labels, ceil(H/4), ceil(W/4)]``
    (for the default strides) and, with labels, the loss of the reference implementation:
    cross-entropy (``ignore_index = semantic_loss_ignore_index``) on the logits bilinearly
    upsampled to the label size, or for a single label a per-pixel binary cross-entropy
    averaged over all pixels with ignored ones counted as zero.
    """

    config_class = SegformerConfig
    architecture = "SegformerForSemanticSegmentation"
    config: SegformerConfig

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__(config)
        self.segformer = SegformerBackbone(config)
        self.decode_head = SegformerDecodeHead(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's initialisation: linear and conv weights ~ N(0, initializer_range)
        with zero biases, norms at identity, batch-norm statistics reset."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                if isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> SemanticSegmenterOutput:
        stages = self.segformer.encoder(pixel_values)
        logits = self.decode_head(stages)
        loss = None if labels is None else self.loss(logits, labels)
        return SemanticSegmenterOutput(logits=logits, loss=loss)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss of ``logits [B, K, h, w]`` against ``labels [B, H, W]`` (int64)."""
        ignore_index = self.config.semantic_loss_ignore_index
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if self.config.num_labels > 1:
            return F.cross_entropy(upsampled, labels, ignore_index=ignore_index)
        valid = ((labels >= 0) & (labels != ignore_index)).to(upsampled.dtype)
        per_pixel = F.binary_cross_entropy_with_logits(
            upsampled.squeeze(1), labels.to(upsampled.dtype), reduction="none"
        )
        return (per_pixel * valid).mean()
