"""The pieces of automatic mask generation ("segment everything"), vectorised in torch.

Semantics are the reference's (``transformers``' SAM image processor and mask-generation
pipeline): a regular grid of point prompts per crop, crops in layers of ``2**i x 2**i``
overlapping tiles, masks filtered by predicted IoU, stability score and nearness to a
crop's inner edges, then non-maximum suppression over the masks' boxes.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np
import torch


def point_grid(points_per_side: int) -> np.ndarray:
    """``[n * n, 2]`` float64 ``(x, y)`` cell centres of an ``n x n`` grid over ``[0, 1]^2``,
    row by row (numpy's ``linspace``, as the reference)."""
    offset = 1 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side)
    xs = np.tile(side[None, :], (points_per_side, 1))
    ys = np.tile(side[:, None], (1, points_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def crop_boxes(crop_n_layers: int, overlap_ratio: float, image_size: tuple[int, int]) -> list[tuple[list[int], int]]:
    """``([x0, y0, x1, y1], layer)`` of every crop: the whole image (layer 0), then for layer
    ``i >= 1`` a ``2**i x 2**i`` grid of tiles overlapping by ``overlap_ratio`` of the short
    side (scaled down per layer), column by column. Tiles that would be empty (an image
    smaller than the grid: the second column of a 1-pixel-wide image) are left out; the
    reference keeps them and fails in the resize."""
    height, width = image_size
    boxes = [([0, 0, width, height], 0)]
    short_side = min(height, width)
    for layer in range(1, crop_n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_width = int(math.ceil((overlap * (per_side - 1) + width) / per_side))
        crop_height = int(math.ceil((overlap * (per_side - 1) + height) / per_side))
        lefts = [int((crop_width - overlap) * i) for i in range(per_side)]
        tops = [int((crop_height - overlap) * i) for i in range(per_side)]
        for left, top in product(lefts, tops):
            right, bottom = min(left + crop_width, width), min(top + crop_height, height)
            if right > left and bottom > top:
                boxes.append(([left, top, right, bottom], layer))
    return boxes


def stability_scores(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """``[K, H, W]`` logits -> ``[K]`` IoU of the masks binarised at ``threshold + offset``
    and ``threshold - offset`` (the first lies inside the second: area ratio)."""
    inner = (logits > mask_threshold + offset).flatten(1).sum(1, dtype=torch.int32)
    outer = (logits > mask_threshold - offset).flatten(1).sum(1, dtype=torch.int32)
    return inner / outer


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``[K, H, W]`` bool -> ``[K, 4]`` int64 ``x0, y0, x1, y1`` (inclusive pixel bounds);
    ``[0, 0, 0, 0]`` for an empty mask."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=2)  # [K, H]
    cols = masks.any(dim=1)  # [K, W]
    height, width = masks.shape[-2:]
    top = rows.to(torch.uint8).argmax(dim=1)
    bottom = height - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    left = cols.to(torch.uint8).argmax(dim=1)
    right = width - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * rows.any(dim=1, keepdim=True)


def near_crop_edge(boxes: torch.Tensor, crop_box: list[int], image_size: tuple[int, int], atol: float = 20.0) -> torch.Tensor:
    """``[K]`` bool: a box (in crop pixels) within ``atol`` of an edge of its crop that is
    not also an edge of the image (such masks are likely cut off by the crop)."""
    left, top = crop_box[0], crop_box[1]
    shifted = (boxes + torch.tensor([left, top, left, top], device=boxes.device)).float()
    crop = torch.tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.tensor([0, 0, image_size[1], image_size[0]], dtype=torch.float32, device=boxes.device)
    at_crop = (shifted - crop).abs() <= atol
    at_image = (shifted - image).abs() <= atol
    return (at_crop & ~at_image).any(dim=1)


def box_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[K, K]`` of ``[K, 4]`` ``x0, y0, x1, y1`` boxes (float32, area
    ``(x1 - x0) * (y1 - y0)``, as torchvision)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    return inter / (area[:, None] + area[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes by decreasing score (ties:
    lower index first). A box is dropped when its IoU with a kept, higher-scoring box
    exceeds ``iou_threshold``. One IoU matrix; the greedy pass walks the sorted boxes with
    boolean rows of it."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(scores, descending=True, stable=True)
    overlaps = (box_iou(boxes.float()[order]) > iou_threshold).numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    kept = []
    for position in range(len(order)):
        if suppressed[position]:
            continue
        kept.append(position)
        suppressed |= overlaps[position]
    return order[torch.as_tensor(kept, dtype=torch.int64)]


def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """``[K, H, W]`` bool -> uncompressed column-major RLE per mask,
    ``{"size": [H, W], "counts": [zeros, ones, zeros, ...]}`` (first run of zeros, maybe 0);
    the format of the reference's ``rle_mask`` output and of COCO's uncompressed RLE."""
    count, height, width = masks.shape
    if count == 0:
        return []
    flat = masks.transpose(1, 2).reshape(count, -1)
    starts_with_one = flat[:, 0]
    changes = (flat[:, 1:] != flat[:, :-1]).nonzero()  # [changes, 2] rows sorted by mask
    positions = changes[:, 1] + 1
    per_mask = torch.bincount(changes[:, 0], minlength=count).tolist()
    boundaries = torch.split(positions, per_mask)
    total = height * width
    out = []
    for first_one, cuts in zip(starts_with_one.tolist(), boundaries):
        edges = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), total)])
        counts = torch.diff(edges).tolist()
        if first_one:
            counts = [0] + counts
        out.append({"size": [height, width], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`masks_to_rle` for one mask: ``[H, W]`` bool array."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(width, height).T
