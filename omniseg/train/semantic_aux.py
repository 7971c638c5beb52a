"""An auxiliary per-pixel semantic loss for training Mask2Former from scratch.

Mask2Former's own losses reach the pixel features only through the few queries matched to a
target, and through a few thousand sampled points per mask; from random initialisation the
backbone and pixel decoder then learn slowly. A training-only 1x1 convolution on the
stride-4 mask features, trained with per-pixel cross-entropy against the label map, gives
every labelled pixel a direct gradient (the auxiliary semantic head of MaX-DeepLab and
kMaX-DeepLab). The head is not part of the model: it is never saved with it, so the model
that comes out is the plain architecture that the reference loads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class SemanticAuxiliaryLoss(nn.Module):
    """Per-pixel cross-entropy of a 1x1-conv classifier on a Mask2Former's mask features.

    Args:
        in_channels: channels of the mask features (``config.mask_feature_size``).
        num_labels: classes of the label maps.
        ignore_index: label of unlabelled pixels.
        weight: factor of the loss in the training objective.
        class_weights: per-class factors of the cross-entropy (``[num_labels]``), e.g. from
            :func:`median_frequency_weights`; ``None`` weighs every class alike.

    Usage: :meth:`attach` to the model once; after each training forward, :meth:`forward`
    with that batch's label maps returns the weighted loss.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_labels: int,
        ignore_index: int,
        weight: float,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(in_channels, num_labels, kernel_size=1)
        if class_weights is not None and len(class_weights) != num_labels:
            raise ValueError(f"class_weights has {len(class_weights)} entries for {num_labels} classes")
        # A buffer, so it follows .to(device); not persistent: the checkpoint's head does not
        # depend on it (the command line gives it again on resume).
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32),
            persistent=False,
        )
        self.ignore_index = ignore_index
        self.weight = weight
        self._features: Tensor | None = None
        self._handle: RemovableHandle | None = None

    def attach(self, model: nn.Module) -> None:
        """Capture the mask features (``[B, C, H / 4, W / 4]``) of every training forward of
        ``model`` (a ``Mask2FormerForUniversalSegmentation``)."""

        # The model itself never computes the mask features (its mask head folds their
        # projection into the queries), so they are made here from its pixel features.
        mask_projection = model.model.pixel_level_module.decoder.mask_projection

        def keep_mask_features(module: nn.Module, inputs: object, output: tuple[Tensor, ...]) -> None:
            if module.training:
                self._features = mask_projection(output[0])

        self._handle = model.model.pixel_level_module.register_forward_hook(keep_mask_features)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._features = None

    def forward(self, labels: Tensor) -> Tensor:
        """Weighted cross-entropy of the last captured features against ``labels``
        ``[B, H, W]`` (int64, ``ignore_index`` for unlabelled pixels); logits are upsampled
        bilinearly to the labels' size. The captured features are released."""
        if self._features is None:
            raise RuntimeError("no mask features captured: attach() the loss and run a training forward first")
        logits = self.classifier(self._features)
        self._features = None
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if not bool((labels != self.ignore_index).any()):
            return logits.sum() * 0.0  # keeps the graph (and DDP's gradient buckets) whole
        return self.weight * F.cross_entropy(
            logits, labels, weight=self.class_weights, ignore_index=self.ignore_index
        )


def median_frequency_weights(pixel_counts: Sequence[int], *, clip: tuple[float, float] = (0.2, 5.0)) -> list[float]:
    """Median-frequency balancing (Eigen and Fergus; SegNet's CamVid recipe): class ``c``
    weighs ``median(f) / f_c``, where ``f_c`` is its share of the labelled pixels, clipped to
    ``clip`` so that a class with a handful of pixels cannot dominate. A class with no
    pixels gets the upper clip."""
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("no labelled pixels")
    freq = counts / counts.sum()
    median = float(np.median(freq[freq > 0]))
    weights = np.where(freq > 0, median / np.maximum(freq, 1e-12), clip[1])
    return np.clip(weights, *clip).tolist()
