"""MaskFormer's training loss: Mask2Former's criterion with full-resolution focal and dice mask terms.

The structure is :class:`~omniseg.models.mask2former.criterion.Mask2FormerCriterion`'s
(Hungarian matching per image, weighted cross-entropy with a down-weighted "no object" class,
mask losses of matched pairs normalised by the average target count, the same for every
auxiliary prediction, each term times its weight), and so is the cross-entropy. The mask
terms are the original MaskFormer's, deterministic (no sampled points):

* matching cost: ``-p(class) + mask_weight * focal + dice_weight * dice``, with the targets
  resized (nearest) to the predicted masks' size;
* loss: sigmoid focal loss (alpha 0.25, gamma 2) and dice of the predictions upsampled
  (bilinear) to the targets' size.

Returned keys are the reference's: ``loss_mask``, ``loss_dice``, ``loss_cross_entropy``, and
``loss_mask_{i}``, ... for auxiliary prediction ``i``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.models.mask2former.criterion import Mask2FormerCriterion, dice_loss
from omniseg.models.mask2former.matcher import HungarianMatcher, MatchIndices, optimal_assignment, pairwise_dice

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def sigmoid_focal_loss(logits: Tensor, labels: Tensor, num_masks: Tensor) -> Tensor:
    """Focal loss of ``[N, P]`` logits against 0/1 labels: per-mask mean, summed, / ``num_masks``."""
    probs = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p_t = probs * labels + (1 - probs) * (1 - labels)
    loss = cross_entropy * (1 - p_t) ** FOCAL_GAMMA
    alpha_t = FOCAL_ALPHA * labels + (1 - FOCAL_ALPHA) * (1 - labels)
    return (alpha_t * loss).mean(1).sum() / num_masks


def pairwise_sigmoid_focal(pred_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean focal loss of every prediction ``[Q, P]`` against every target ``[T, P]``: ``[Q, T]``."""
    probs = pred_logits.sigmoid()
    positive = (1 - probs) ** FOCAL_GAMMA * F.binary_cross_entropy_with_logits(
        pred_logits, torch.ones_like(pred_logits), reduction="none"
    ) * FOCAL_ALPHA
    negative = probs**FOCAL_GAMMA * F.binary_cross_entropy_with_logits(
        pred_logits, torch.zeros_like(pred_logits), reduction="none"
    ) * (1 - FOCAL_ALPHA)
    return (positive @ targets.T + negative @ (1 - targets).T) / pred_logits.shape[1]


class FullMaskHungarianMatcher(HungarianMatcher):
    """Hungarian matching on whole masks (targets resized to the predictions' size) with a
    focal mask cost, as the original MaskFormer matches."""

    def cost_matrix(
        self, class_logits: Tensor, mask_logits: Tensor, target_masks: Tensor, target_classes: Tensor
    ) -> Tensor:
        """The ``[Q, T]`` cost of one image: ``class_logits [Q, C + 1]``, ``mask_logits
        [Q, h, w]``, ``target_masks [T, H, W]``, ``target_classes [T]``."""
        targets = F.interpolate(target_masks[:, None].to(mask_logits), size=mask_logits.shape[-2:], mode="nearest")
        targets = targets[:, 0].flatten(1)
        preds = mask_logits.flatten(1)
        return (
            self.cost_mask * pairwise_sigmoid_focal(preds, targets)
            - self.cost_class * class_logits.softmax(-1)[:, target_classes]
            + self.cost_dice * pairwise_dice(preds, targets)
        )

    @torch.no_grad()
    def __call__(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        mask_labels: list[Tensor],
        class_labels: list[Tensor],
        generator: torch.Generator | None = None,
    ) -> MatchIndices:
        """Per image, ``(query_indices, target_indices)`` (see :class:`HungarianMatcher`);
        ``generator`` is unused (no random points)."""
        del generator
        return [
            optimal_assignment(self.cost_matrix(class_logits[i], mask_logits[i], mask_labels[i], class_labels[i]))
            for i in range(class_logits.shape[0])
        ]


class MaskFormerCriterion(Mask2FormerCriterion):
    """The loss of :class:`~omniseg.models.maskformer.MaskFormerForInstanceSegmentation`.

    Args:
        num_labels: number of real classes ``C``.
        no_object_weight: cross-entropy weight of the "no object" class.
        cross_entropy_weight, mask_weight, dice_weight: loss weights (the matcher's class
            cost is 1, its mask and dice costs ``mask_weight`` and ``dice_weight``).
    """

    def __init__(
        self,
        num_labels: int,
        *,
        no_object_weight: float = 0.1,
        cross_entropy_weight: float = 1.0,
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
    ) -> None:
        super().__init__(
            num_labels,
            no_object_weight=no_object_weight,
            class_weight=cross_entropy_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
        )
        self.matcher = FullMaskHungarianMatcher(cost_class=1.0, cost_mask=mask_weight, cost_dice=dice_weight)

    @classmethod
    def from_config(cls, config: Any) -> "MaskFormerCriterion":
        return cls(
            config.num_labels,
            no_object_weight=config.no_object_weight,
            cross_entropy_weight=config.cross_entropy_weight,
            mask_weight=config.mask_weight,
            dice_weight=config.dice_weight,
        )

    def loss_masks(
        self,
        mask_logits: Tensor,
        padded_targets: Tensor,
        matches: MatchIndices,
        num_masks: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """Focal and dice of matched masks, predictions upsampled to the targets' size."""
        del generator
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)])
        src_idx = torch.cat([src for src, _ in matches])
        tgt_idx = torch.cat([tgt for _, tgt in matches])
        if len(src_idx) == 0:
            zero = mask_logits.sum() * 0.0  # attached to the graph (see Mask2FormerCriterion)
            return zero, zero.clone()
        device = mask_logits.device
        preds = mask_logits[batch_idx.to(device), src_idx.to(device)][:, None]  # [N, 1, h, w]
        targets = padded_targets[batch_idx.to(device), tgt_idx.to(device)].to(preds)  # [N, H, W]
        preds = F.interpolate(preds, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        preds, targets = preds[:, 0].flatten(1), targets.flatten(1)
        return sigmoid_focal_loss(preds, targets, num_masks), dice_loss(preds, targets, num_masks)
