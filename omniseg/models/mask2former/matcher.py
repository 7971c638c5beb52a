"""Hungarian matching of Mask2Former's query predictions to ground-truth segments.

Each image's queries are assigned one-to-one to its target segments by minimising
``class_weight * cost_class + mask_weight * cost_bce + dice_weight * cost_dice`` with
scipy's ``linear_sum_assignment``. Mask costs are computed on points sampled uniformly
at random in the unit square (the same points for every prediction and target), which is
far cheaper than full-resolution masks and is what Mask2Former trains with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

MatchIndices = list[tuple[Tensor, Tensor]]


def point_sample(features: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample ``features`` at normalised point coordinates.

    Args:
        features: ``[N, C, H, W]`` feature maps (or masks with ``C == 1``).
        coords: ``[N, P, 2]`` (x, y) coordinates in ``[0, 1]``; ``(0, 0)`` is the top-left
            corner of the top-left pixel (``align_corners=False`` convention).

    Returns:
        ``[N, C, P]`` sampled values. Points outside the map read zeros.
    """
    # grid_sample wants coordinates in [-1, 1] and a 4-D grid [N, P, 1, 2].
    grid = (2.0 * coords - 1.0).unsqueeze(2)
    return F.grid_sample(features, grid, align_corners=False).squeeze(3)


def pairwise_sigmoid_bce(pred_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of every prediction against every target.

    Args:
        pred_logits: ``[Q, P]`` mask logits at ``P`` points.
        targets: ``[T, P]`` binary target values at the same points.

    Returns:
        ``[Q, T]`` costs.
    """
    num_points = pred_logits.shape[1]
    # sum_p [t BCE(x, 1) + (1 - t) BCE(x, 0)] with BCE(x, 1) = BCE(x, 0) - x is
    # sum_p BCE(x, 0) - x . t: one elementwise pass and one matmul for every pair.
    neg = F.softplus(pred_logits).sum(-1, keepdim=True)  # [Q, 1]
    return (neg - pred_logits @ targets.T) / num_points


def pairwise_dice(pred_logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss ``1 - (2|x∩y| + 1) / (|x| + |y| + 1)`` of every prediction/target pair.

    Args:
        pred_logits: ``[Q, P]`` mask logits.
        targets: ``[T, P]`` binary targets.

    Returns:
        ``[Q, T]`` costs.
    """
    probs = pred_logits.sigmoid()
    numerator = 2.0 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class HungarianMatcher:
    """One-to-one assignment of queries to targets, per image.

    Args:
        cost_class: weight of the classification cost ``-p(target class)``.
        cost_mask: weight of the point-sampled sigmoid BCE cost.
        cost_dice: weight of the point-sampled dice cost.
        num_points: number of uniformly sampled points per image.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 12544,
    ) -> None:
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one of cost_class, cost_mask, cost_dice must be non-zero")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def cost_matrix(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        target_masks: Tensor,
        target_classes: Tensor,
        coords: Tensor,
    ) -> Tensor:
        """The ``[Q, T]`` matching cost of one image.

        Args:
            class_logits: ``[Q, C + 1]`` class logits (last column: no object).
            mask_logits: ``[Q, h, w]`` mask logits.
            target_masks: ``[T, H, W]`` binary target masks (any resolution).
            target_classes: ``[T]`` target class ids.
            coords: ``[1, P, 2]`` sample points in ``[0, 1]``.
        """
        probs = class_logits.softmax(-1)
        cost_class = -probs[:, target_classes]
        # All masks share the points: sampling them as the channels of one map computes the
        # bilinear weights once instead of once per mask (same values).
        target_points = point_sample(target_masks.to(mask_logits)[None], coords)[0]  # [T, P]
        pred_points = point_sample(mask_logits[None], coords)[0]  # [Q, P]
        return (
            self.cost_mask * pairwise_sigmoid_bce(pred_points, target_points)
            + self.cost_class * cost_class
            + self.cost_dice * pairwise_dice(pred_points, target_points)
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
        """Match predictions to targets.

        Args:
            class_logits: ``[B, Q, C + 1]``.
            mask_logits: ``[B, Q, h, w]``.
            mask_labels: per image, ``[T_i, H_i, W_i]`` binary masks.
            class_labels: per image, ``[T_i]`` class ids.
            generator: random source for the sample points (global RNG when ``None``).

        Returns:
            Per image, ``(query_indices, target_indices)``: two int64 tensors of length
            ``min(Q, T_i)``; query indices ascending.
        """
        matches: MatchIndices = []
        for i in range(class_logits.shape[0]):
            # Points are drawn for every image, even one without targets, so the random
            # stream does not depend on the targets' contents.
            coords = torch.rand(
                1, self.num_points, 2, device=mask_logits.device, generator=generator
            )
            if len(class_labels[i]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(
                class_logits[i], mask_logits[i], mask_labels[i], class_labels[i], coords
            )
            matches.append(optimal_assignment(cost))
        return matches


def optimal_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The Hungarian assignment of a ``[Q, T]`` cost matrix: ``(query_indices,
    target_indices)``, int64, query indices ascending.

    A diverging model can give NaN/inf costs, which scipy refuses: the largest finite value
    keeps such pairs as a last resort instead of crashing the run.
    """
    big = torch.finfo(cost.dtype).max
    cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
    rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
