"""MaskFormer image processor: Mask2Former's preprocessing, post-processing at the model's mask size."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from omniseg.processing import mask_classification
from omniseg.processing.mask2former import Mask2FormerImageProcessor


@dataclasses.dataclass
class MaskFormerImageProcessor(Mask2FormerImageProcessor):
    """Prepares images for MaskFormer and turns its outputs into segmentations.

    Settings, defaults and preprocessing are the Mask2Former processor's (the reference's two
    processors are the same there). Post-processing differs in one step: the reference's
    MaskFormer processor uses the mask logits at the model's own resolution (stride 4 of the
    padded input) where Mask2Former's first resizes them to 384x384.
    """

    processor_type = "MaskFormerImageProcessor"
    mask_size: ClassVar[mask_classification.MaskSize] = None
