"""Mask2Former's training loss (mask classification with Hungarian matching).

For the last decoder layer and every auxiliary (intermediate) layer:

1. match queries to target segments (:class:`HungarianMatcher`);
2. cross-entropy of every query's class logits against its matched class, or "no object"
   for unmatched queries, with the no-object class down-weighted (``no_object_weight``);
3. sigmoid BCE and dice of matched masks on ``train_num_points`` points per mask, chosen
   by importance sampling: oversample ``oversample_ratio`` times as many uniform points,
   keep the ``importance_sample_ratio`` share with the most uncertain predictions
   (uncertainty ``-|logit|``) and fill the rest with fresh uniform points.

Losses are weighted by the config (``class_weight``, ``mask_weight``, ``dice_weight``) and
returned as a dict with the reference implementation's keys: ``loss_mask``, ``loss_dice``,
``loss_cross_entropy`` and ``loss_mask_{i}``, ... for auxiliary layer ``i``.

Random points come from the global torch RNG (or ``generator``) in a fixed order: per layer
(last layer first, then auxiliary layers in order), the matcher's points for each image,
then the importance-sampling oversample, then the random fill.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.mask2former.matcher import HungarianMatcher, MatchIndices, point_sample

# Defaults of the published Mask2Former configs, used when a config omits a key.
LOSS_DEFAULTS: dict[str, float] = {
    "no_object_weight": 0.1,
    "class_weight": 2.0,
    "mask_weight": 5.0,
    "dice_weight": 5.0,
    "train_num_points": 12544,
    "oversample_ratio": 3.0,
    "importance_sample_ratio": 0.75,
}


def _config_value(config: Any, key: str) -> Any:
    """``config.key``, else ``config.extra[key]`` (keys kept verbatim), else the default."""
    value = getattr(config, key, None)
    if value is None:
        value = getattr(config, "extra", {}).get(key)
    return LOSS_DEFAULTS[key] if value is None else value


def sigmoid_bce_loss(logits: Tensor, labels: Tensor, num_masks: Tensor) -> Tensor:
    """Per-mask mean BCE over points, summed over masks, divided by ``num_masks``.

    ``logits`` and ``labels`` are ``[N, P]``.
    """
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: Tensor) -> Tensor:
    """Dice loss ``1 - (2|x∩y| + 1) / (|x| + |y| + 1)`` summed over ``[N, P]`` masks / ``num_masks``."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * labels).sum(-1)
    denominator = probs.sum(-1) + labels.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


def pad_masks(masks: list[Tensor]) -> Tensor:
    """Stack per-image ``[T_i, H_i, W_i]`` masks into ``[B, max T, max H, max W]``, zero padded.

    Sample coordinates are normalised to this padded canvas, so padding (bottom/right) must
    match the layout the model's inputs were padded to.
    """
    depth = max(m.shape[0] for m in masks)
    height = max(m.shape[1] for m in masks)
    width = max(m.shape[2] for m in masks)
    out = masks[0].new_zeros((len(masks), depth, height, width))
    for i, m in enumerate(masks):
        out[i, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return out


class Mask2FormerCriterion(nn.Module):
    """The loss of :class:`Mask2FormerForUniversalSegmentation` given targets.

    Args:
        num_labels: number of real classes ``C`` (logits have ``C + 1`` columns).
        no_object_weight: cross-entropy weight of the "no object" class.
        class_weight, mask_weight, dice_weight: loss weights, also the matcher's costs.
        train_num_points: sample points per mask.
        oversample_ratio: uniform candidates per kept point in importance sampling.
        importance_sample_ratio: share of points chosen by uncertainty.
    """

    def __init__(
        self,
        num_labels: int,
        *,
        no_object_weight: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.weight_dict = {
            "loss_cross_entropy": class_weight,
            "loss_mask": mask_weight,
            "loss_dice": dice_weight,
        }
        self.num_points = int(train_num_points)
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_labels + 1)
        empty_weight[-1] = no_object_weight
        # Not persistent: checkpoints in the hub layout do not carry it.
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.matcher = HungarianMatcher(
            cost_class=class_weight,
            cost_mask=mask_weight,
            cost_dice=dice_weight,
            num_points=self.num_points,
        )

    @classmethod
    def from_config(cls, config: Any) -> "Mask2FormerCriterion":
        """Build from a Mask2Former config (omniseg's or any object with the same keys)."""
        kwargs = {key: _config_value(config, key) for key in LOSS_DEFAULTS}
        return cls(config.num_labels, **kwargs)

    # -- pieces -------------------------------------------------------------------------

    def num_masks(self, class_labels: list[Tensor], device: torch.device) -> Tensor:
        """Average target count per process (all-reduced under torch.distributed), at least 1."""
        total = torch.tensor(
            float(sum(len(c) for c in class_labels)), dtype=torch.float, device=device
        )
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            world = dist.get_world_size()
        return torch.clamp(total / world, min=1)

    def loss_labels(self, class_logits: Tensor, class_labels: list[Tensor], matches: MatchIndices) -> Tensor:
        """Weighted cross-entropy over all ``[B, Q]`` queries; unmatched ones target no-object."""
        batch, queries, _ = class_logits.shape
        target = torch.full(
            (batch, queries), self.num_labels, dtype=torch.int64, device=class_logits.device
        )
        for i, (src, tgt) in enumerate(matches):
            target[i, src.to(target.device)] = class_labels[i][tgt].to(target)
        return F.cross_entropy(
            class_logits.transpose(1, 2), target, weight=self.empty_weight.to(class_logits.dtype)
        )

    def sample_points(self, mask_logits: Tensor, generator: torch.Generator | None) -> Tensor:
        """Importance-sampled ``[N, train_num_points, 2]`` coordinates for ``[N, 1, h, w]`` logits."""
        n = mask_logits.shape[0]
        num_candidates = int(self.num_points * self.oversample_ratio)
        num_uncertain = int(self.importance_sample_ratio * self.num_points)
        num_random = self.num_points - num_uncertain
        candidates = torch.rand(n, num_candidates, 2, device=mask_logits.device, generator=generator)
        uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()  # [N, candidates]
        keep = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
        coords = torch.gather(candidates, 1, keep[..., None].expand(-1, -1, 2))
        if num_random > 0:
            fresh = torch.rand(n, num_random, 2, device=mask_logits.device, generator=generator)
            coords = torch.cat([coords, fresh], dim=1)
        return coords

    def loss_masks(
        self,
        mask_logits: Tensor,
        padded_targets: Tensor,
        matches: MatchIndices,
        num_masks: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """BCE and dice of matched masks at importance-sampled points."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)])
        src_idx = torch.cat([src for src, _ in matches])
        tgt_idx = torch.cat([tgt for _, tgt in matches])
        if len(src_idx) == 0:
            # No targets anywhere in the batch: zero, but still attached to the graph so
            # backward() and DDP's gradient hooks see every parameter.
            zero = mask_logits.sum() * 0.0
            return zero, zero.clone()
        device = mask_logits.device
        preds = mask_logits[batch_idx.to(device), src_idx.to(device)][:, None]  # [N, 1, h, w]
        targets = padded_targets[batch_idx.to(device), tgt_idx.to(device)][:, None].to(preds)
        with torch.no_grad():
            coords = self.sample_points(preds, generator)
            point_labels = point_sample(targets, coords)[:, 0]
        point_logits = point_sample(preds, coords)[:, 0]
        return (
            sigmoid_bce_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    def layer_losses(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        mask_labels: list[Tensor],
        class_labels: list[Tensor],
        padded_targets: Tensor,
        num_masks: Tensor,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """Unweighted losses of one decoder layer's predictions."""
        matches = self.matcher(class_logits, mask_logits, mask_labels, class_labels, generator)
        loss_mask, loss_dice = self.loss_masks(
            mask_logits, padded_targets, matches, num_masks, generator
        )
        return {
            "loss_mask": loss_mask,
            "loss_dice": loss_dice,
            "loss_cross_entropy": self.loss_labels(class_logits, class_labels, matches),
        }

    # -- entry point --------------------------------------------------------------------

    def forward(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        mask_labels: list[Tensor],
        class_labels: list[Tensor],
        auxiliary: list[dict[str, Tensor]] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Weighted losses of the last layer and of every auxiliary layer.

        Args:
            class_logits: ``[B, Q, C + 1]`` last-layer class logits.
            mask_logits: ``[B, Q, h, w]`` last-layer mask logits.
            mask_labels: per image ``[T_i, H, W]`` binary masks (padded to the inputs' size).
            class_labels: per image ``[T_i]`` class ids in ``[0, C)``.
            auxiliary: per intermediate layer, ``{"class_queries_logits", "masks_queries_logits"}``.
            generator: random source for sample points (global RNG when ``None``).

        Returns:
            ``{"loss_mask", "loss_dice", "loss_cross_entropy", "loss_mask_0", ...}``, each
            already multiplied by its weight; the total loss is their sum.
        """
        padded_targets = pad_masks([m.to(mask_logits.device) for m in mask_labels])
        num_masks = self.num_masks(class_labels, mask_logits.device)
        losses = self.layer_losses(
            class_logits, mask_logits, mask_labels, class_labels, padded_targets, num_masks, generator
        )
        for i, aux in enumerate(auxiliary or []):
            layer = self.layer_losses(
                aux["class_queries_logits"],
                aux["masks_queries_logits"],
                mask_labels,
                class_labels,
                padded_targets,
                num_masks,
                generator,
            )
            losses.update({f"{key}_{i}": value for key, value in layer.items()})
        return {
            key: value * self.weight_dict[key.rsplit("_", 1)[0] if key[-1].isdigit() else key]
            for key, value in losses.items()
        }
