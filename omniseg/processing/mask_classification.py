"""Post-processing of mask-classification models (Mask2Former, MaskFormer, OneFormer).

The model gives, per image, ``Q`` queries each with class logits ``[Q, C + 1]`` (the last class
is "no object") and mask logits ``[Q, h, w]``. These functions turn them into semantic,
instance and panoptic results with the reference implementation's exact semantics: masks are
first brought to ``mask_size`` (bilinear; Mask2Former's reference uses 384x384, MaskFormer's
keeps the model's own ``h x w``: ``mask_size=None``), then to the requested size; segment
order, ids, fusing and the returned structures are the same.

Heavy work is vectorised: only queries that can pass the thresholds are upsampled, areas and
overlap ratios are computed for all segments at once, and the maps are painted in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from omniseg.ops import bilinear, scored_argmax
from omniseg.ops.linear import linear

# The Mask2Former reference scales mask logits to this size before anything else, whatever the
# model input size (MaskFormer's does not: ``mask_size=None``).
REFERENCE_MASK_SIZE = (384, 384)

MaskSize = tuple[int, int] | None


def _logits(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs' class and mask logits, detached: post-processing is not differentiated,
    and the logits of a forward pass run outside ``torch.no_grad`` (``outputs =
    model(**inputs)``, as the README shows) made every Python float taken of them print
    torch's "Converting a tensor with requires_grad=True to a scalar" warning at users."""
    if isinstance(outputs, Mapping):
        class_logits, mask_logits = outputs["class_queries_logits"], outputs["masks_queries_logits"]
    else:
        class_logits, mask_logits = outputs.class_queries_logits, outputs.masks_queries_logits
    return class_logits.detach(), mask_logits.detach()


def _target_size(target_sizes: Sequence[Any] | torch.Tensor | None, index: int) -> tuple[int, int] | None:
    if target_sizes is None:
        return None
    size = target_sizes[index]
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    return int(size[0]), int(size[1])


def _check_target_sizes(target_sizes: Sequence[Any] | torch.Tensor | None, batch_size: int) -> None:
    if target_sizes is not None and len(target_sizes) != batch_size:
        raise ValueError(
            f"got {len(target_sizes)} target sizes for a batch of {batch_size}; pass one (height, width) per image"
        )


def _grid_size(mask_logits: torch.Tensor, mask_size: MaskSize) -> tuple[int, int]:
    """The size ``[..., h, w]`` mask logits are brought to first: ``mask_size``, or ``(h, w)``."""
    if mask_size is None:
        return int(mask_logits.shape[-2]), int(mask_logits.shape[-1])
    return int(mask_size[0]), int(mask_size[1])


def _to_mask_size(mask_logits: torch.Tensor, mask_size: MaskSize) -> torch.Tensor:
    """``[..., Q, h, w]`` mask logits at ``mask_size`` (bilinear, ``align_corners=False``), or
    a copy at their own size for ``None``: always a new tensor, which callers change in place."""
    if mask_size is None:
        return mask_logits.clone()
    maps = mask_logits.reshape(-1, *mask_logits.shape[-2:])
    return bilinear.resize(maps, tuple(mask_size)).view(*mask_logits.shape[:-2], *mask_size)


# --------------------------------------------------------------------------- RLE


def binary_mask_to_rle(mask: torch.Tensor) -> list[int]:
    """COCO-style uncompressed RLE of a binary ``[H, W]`` mask, as the reference writes it.

    Returns ``[start_1, length_1, start_2, length_2, ...]`` over the row-major flattened mask,
    where starts are 1-based positions of runs of ones.
    """
    pixels = torch.as_tensor(mask).flatten()
    zero = torch.zeros(1, dtype=pixels.dtype, device=pixels.device)
    pixels = torch.cat([zero, pixels, zero])
    runs = torch.nonzero(pixels[1:] != pixels[:-1]).flatten() + 1
    runs[1::2] -= runs[::2].clone()
    return runs.tolist()


def convert_segmentation_to_rle(segmentation: torch.Tensor) -> list[list[int]]:
    """RLE (see :func:`binary_mask_to_rle`) of every distinct value of a ``[H, W]`` map.

    The list is ordered by ascending value (the background ``-1`` first when present), exactly
    like the reference; computed from one run decomposition of the whole map.
    """
    flat = segmentation.flatten()
    if flat.numel() == 0:
        return []
    change = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    starts = torch.cat([change.new_zeros(1), change])
    ends = torch.cat([change, change.new_full((1,), flat.numel())])
    values = flat[starts]
    order = torch.sort(values, stable=True).indices
    pairs = torch.stack([starts[order] + 1, (ends - starts)[order]], dim=1)  # [R, 2]
    _, counts = torch.unique_consecutive(values[order], return_counts=True)
    return [chunk.flatten().tolist() for chunk in torch.split(pairs, counts.tolist())]


# --------------------------------------------------------------------------- semantic


def post_process_semantic_segmentation(
    outputs: Any,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    *,
    mask_size: MaskSize = REFERENCE_MASK_SIZE,
) -> list[torch.Tensor]:
    """Per-pixel class ids from query classes and masks.

    Args:
        outputs: object with ``class_queries_logits [B, Q, C+1]`` and
            ``masks_queries_logits [B, Q, h, w]``.
        target_sizes: one ``(height, width)`` per image; default ``mask_size``.
        mask_size: the size masks are resized to first (None: their own).

    Returns:
        ``B`` int64 tensors ``[height, width]`` of class ids: argmax over classes of
        ``sum_q softmax(class)[q, c] * sigmoid(mask)[q]`` (masks at ``mask_size``, the class maps
        then resized bilinearly to the target, as the reference does); see :func:`_semantic_map`.
    """
    class_logits, mask_logits = _logits(outputs)
    batch_size = class_logits.shape[0]
    _check_target_sizes(target_sizes, batch_size)
    class_probs = class_logits.softmax(dim=-1)[..., :-1]
    # Finite logits give finite scores, and resizing finite maps cannot make NaN.
    may_be_nan = not _all_finite(class_logits, mask_logits)
    return [
        _semantic_map(
            class_probs[i], mask_logits[i], _target_size(target_sizes, i), may_be_nan=may_be_nan, mask_size=mask_size
        )
        for i in range(batch_size)
    ]


def semantic_scores(
    outputs: Any,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    *,
    mask_size: MaskSize = REFERENCE_MASK_SIZE,
) -> list[torch.Tensor]:
    """The per-class score maps whose argmax is the semantic segmentation, for averaging
    several views of an image (test-time flips) before that argmax.

    Returns:
        ``B`` float tensors ``[C, height, width]``: ``sum_q softmax(class)[q, c] *
        sigmoid(mask)[q]`` with the masks at ``mask_size`` (its own size for None), resized
        bilinearly to the target size, as :func:`post_process_semantic_segmentation` defines
        them (which takes their argmax without making all of them).
    """
    class_logits, mask_logits = _logits(outputs)
    _check_target_sizes(target_sizes, class_logits.shape[0])
    class_probs = class_logits.softmax(dim=-1)[..., :-1]
    maps = []
    for i in range(class_logits.shape[0]):
        scores = torch.einsum("qc, qhw -> chw", class_probs[i], _to_mask_size(mask_logits[i], mask_size).sigmoid_())
        size = _target_size(target_sizes, i)
        if size is not None:
            scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
        maps.append(scores)
    return maps


# Rows of the 384x384 maps made at a time: ``[16 * 384, Q]`` mask probabilities and
# ``[C, 16 * 384]`` class scores (3.3 MB for 133 classes) stay in cache. Narrower bands pay
# for more small operations (8 rows: 17-18% slower with 2 threads, 9-10% with 1, on the random
# Swin-T and the bundled model); wider ones score more classes per band on trained heads with
# many classes (32 rows: 24% slower with 1 thread on a COCO-like head).
_SCORE_BAND_ROWS = 16
# A class wins an output pixel outright when, at each source pixel the resize reads, it
# leads every other class by more than this fraction of its score (and by more than a tiny
# absolute floor, so that scores near float32's subnormal range need no thought). Bilinear
# weights are non-negative, so such a lead carries over to the resized scores. The scores
# the lead is measured on are the reference's to within ~1.5e-5 relative (two float32 sums
# of 100 non-negative terms) plus the effect of resizing the masks another way: torch rounds
# each source position (< in_size) to float32, so a bilinear weight may be off by a few ulps
# of in_size, and the logit by that times the largest |mask logit| difference; the rounding
# of the arithmetic adds a few ulps of the largest |mask logit|. :func:`_logit_error` bounds
# both with room to spare, and a logit error dx changes a sigmoid by at most the fraction dx.
# The reference's own resize of the class maps rounds them by ~4e-7 relative.
_SCORE_MARGIN = 1e-4
_SCORE_FLOOR = 1e-30
_MIN_SCORED_CLASSES = 16
# Bounds on a band's class scores (see _classes_worth_scoring) are float32 sums of 100-odd
# products, like the scores: this covers their rounding and that of the sigmoids.
_BOUND_SLACK = 1e-4


def _semantic_map(
    class_probs: torch.Tensor,
    mask_logits: torch.Tensor,
    size: tuple[int, int] | None,
    *,
    may_be_nan: bool,
    mask_size: MaskSize = REFERENCE_MASK_SIZE,
) -> torch.Tensor:
    """Semantic map of one image, identical to the reference's.

    Args:
        class_probs: ``[Q, C]`` class probabilities (without "no object").
        mask_logits: ``[Q, h, w]`` mask logits.
        size: target ``(height, width)``, or None for the mask size (no resize).
        may_be_nan: whether the scores can hold NaN.
        mask_size: the size masks are resized to first (None: their own).

    Returns:
        ``[height, width]`` long: ``argmax_c resize(scores)[c]`` with ``scores [C, *mask_size]
        = einsum("qc, qhw -> chw", class_probs, sigmoid(resize(mask_logits, mask_size)))``.

    The reference resizes all ``C`` class maps to the target (133 maps of 480x640 are 41M
    interpolated values, from 78 MB of scores, whose fresh pages alone cost much) to take
    their argmax. But a bilinear output pixel is a convex combination of (at most) 2x2
    source pixels, so a class that clearly leads all others at each of them wins it. So
    the scores are first made a band of rows at a time, in cache (:func:`_leads`), keeping
    per source pixel only the band's leading class and its lead. Output pixels whose source
    window has one leader with a clear lead everywhere get it directly; if any are left
    (where classes meet or nearly tie), they are taken from the reference's computation,
    resizing only the class maps that can win there.

    Without the 384x384 step (``mask_size=None``, MaskFormer) the class maps are as small as
    the masks and this is the reference's own computation (one einsum, one resize of all
    class maps, one argmax): on the random MaskFormer Swin-T (150 classes, 96x128 -> 480x640)
    and a 12-query model on a CamVid photo, the banded leads and the chunked argmax below
    (made for 384x384 maps) were slower than it, not faster, on a busy shared machine.
    """
    num_classes = class_probs.shape[1]
    if mask_size is None:
        scores = torch.einsum("qc, qhw -> chw", class_probs, mask_logits.sigmoid())
        if size is not None:
            scores = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
        return scores.argmax(dim=0)
    if tuple(mask_size) != REFERENCE_MASK_SIZE:  # the bands below are laid out for it
        raise ValueError(f"semantic post-processing takes mask_size {REFERENCE_MASK_SIZE} or None, not {mask_size}")
    out_height, out_width = size if size is not None else REFERENCE_MASK_SIZE
    device = mask_logits.device
    if num_classes < 2:  # argmax over one class (NaN or not)
        return torch.zeros(out_height, out_width, dtype=torch.long, device=device)
    # NaN compares false: no lead can be trusted. On an accelerator the reference's
    # computation is cheap, and the banded pass is written for the CPU's caches.
    if may_be_nan or device.type != "cpu":
        labels = torch.zeros(out_height, out_width, dtype=torch.long, device=device)
        hard = torch.ones(out_height, out_width, dtype=torch.bool, device=device)
        classes = torch.arange(num_classes, device=device)
    else:
        leader, slack, can_win = _leads(class_probs, mask_logits)  # [384], [384, 384], [bands, C]
        rows = _source_window_starts(REFERENCE_MASK_SIZE[0], out_height, resized=size is not None)
        cols = _source_window_starts(REFERENCE_MASK_SIZE[1], out_width, resized=size is not None)
        labels = leader[rows].view(-1, 1).expand(out_height, out_width)
        # Source pixels (as window starts) whose window has one leader, clearly leading.
        window = 4 if size is not None else 1
        leaders = F.pad(leader[None, None].float(), (0, window - 1), mode="replicate")[0, 0].unfold(0, window, 1)
        one_leader = leaders.amax(dim=1) == leaders.amin(dim=1)  # [384] window starts
        clear = (-_window_max(-slack[None], window) > 0)[0] & one_leader.view(-1, 1)
        hard = ~clear[rows.view(-1, 1), cols]
        hard_rows = hard.any(dim=1)
        if not bool(hard_rows.any()):
            return labels.contiguous()
        # The classes that can win in the bands holding the hard output rows' source rows.
        source_rows = (rows[hard_rows].view(-1, 1) + torch.arange(window)).clamp(max=REFERENCE_MASK_SIZE[0] - 1)
        classes = can_win[(source_rows // _SCORE_BAND_ROWS).unique()].any(dim=0).nonzero().flatten()  # [K]

    mask_probs = _to_mask_size(mask_logits, REFERENCE_MASK_SIZE).sigmoid_()
    # Only the classes that can win are scored. Matrix products of very few rows take BLAS
    # kernels that round differently from the reference's all-class product, so at least
    # _MIN_SCORED_CLASSES rows are computed (extra classes are scored, never ranked).
    scored = classes
    if len(classes) < min(_MIN_SCORED_CLASSES, num_classes):
        extra = torch.ones(num_classes, dtype=torch.bool, device=device)
        extra[classes] = False
        padding = extra.nonzero().flatten()[: _MIN_SCORED_CLASSES - len(classes)]
        scored = torch.cat([classes, padding]).sort().values
    ranked = torch.searchsorted(scored, classes)  # where each class's map is in ``scores``
    scores = torch.einsum("qc, qhw -> chw", class_probs[:, scored], mask_probs)  # [len(scored), 384, 384]

    def values(start: int, stop: int) -> torch.Tensor:
        maps = scores[ranked[start:stop]]
        if size is None:
            return maps
        return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]

    exact = classes[_chunked_first_argmax(values, len(classes), may_be_nan=may_be_nan)]
    return torch.where(hard, exact, labels)


def _leads(class_probs: torch.Tensor, mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each 384x384 source pixel's leading class and how clearly it leads.

    Args:
        class_probs: ``[Q, C]`` class probabilities, ``C >= 2``.
        mask_logits: ``[Q, h, w]`` finite mask logits.

    Returns:
        ``leader [384]`` (long): for each row, the class with the largest total score in
        its band of rows; ``slack [384, 384]``: that class's score minus the best other
        class's, less the margin (positive: it surely leads the reference's scores there);
        ``can_win [384 / _SCORE_BAND_ROWS, C]`` (bool): per band of rows, the classes that
        may win a pixel whose source pixels lie in it.

    A class that wins a bilinear output pixel reaches at least 1/4 of the best score at one
    of its (up to 4) source pixels: its resized score is at least the resized score of the
    leader of the source pixel ``p`` with the largest ``weight * best score``, which is at
    least ``weight_p * best_p``, a quarter of the weighted best scores. Classes that stay
    below that everywhere in a band (checked per 32-pixel run of a row, against the run's
    lowest best score) cannot win there.

    Masks are resized separably (columns once, then each band's rows: the same bilinear
    weights as torch's, the arithmetic rounded differently) and turned into scores band by
    band, so the ``[Q, 384, 384]`` and ``[C, 384, 384]`` maps are never made.
    """
    queries, num_classes = class_probs.shape
    height, width = REFERENCE_MASK_SIZE
    low, high = torch.aminmax(mask_logits)
    margin = _SCORE_MARGIN + _logit_error(mask_logits.shape[1:]) * max(-float(low), float(high))
    # Only the width resized: torch's kernel then weighs the one source row by exactly 1.
    # Queries last: a band's rows are then contiguous blocks to gather, and its probabilities
    # rows of Q values, the layout in which oneDNN's matmul takes them fastest. Resized as
    # channels-last maps, the result comes out in that layout: 4-5x faster than resizing
    # channel-first (which converts to channels-last and back inside) and transposing.
    queries_last = mask_logits[None].contiguous(memory_format=torch.channels_last)
    columns = F.interpolate(queries_last, size=(mask_logits.shape[1], width), mode="bilinear", align_corners=False)
    columns = columns[0].permute(1, 2, 0).contiguous()  # [h, 384, Q], no copy
    first, second, weight = _bilinear_taps(mask_logits.shape[1], height)
    # Each grid row as a blend of two column-resized source rows: a band's rows are one small
    # matrix product with the band's few source rows (one pass, where two row gathers and a
    # lerp were three).
    grid_rows = torch.arange(height)
    blend = torch.zeros(height, mask_logits.shape[1])  # [384, h], two weights per row
    blend[grid_rows, first] = 1 - weight
    blend[grid_rows, second] += weight
    columns = columns.view(mask_logits.shape[1], -1)  # [h, 384 * Q]
    class_rows = class_probs.T.contiguous()  # [C, Q]
    leader = torch.empty(height, dtype=torch.long)
    slack = torch.empty(height, width)
    can_win = torch.empty(-(-height // _SCORE_BAND_ROWS), num_classes, dtype=torch.bool)
    quarter = 0.25 * (1 - 2 * margin)  # a quarter, less the error of these scores
    scored_classes = _classes_worth_scoring(class_rows, mask_logits, first, second, quarter)
    for start in range(0, height, _SCORE_BAND_ROWS):
        band = slice(start, min(start + _SCORE_BAND_ROWS, height))
        sources = slice(int(first[band][0]), int(second[band][-1]) + 1)
        probs = torch.mm(blend[band, sources], columns[sources]).sigmoid_()  # [rows, 384 * Q]
        scored, rest = scored_classes[start // _SCORE_BAND_ROWS]
        scores = linear(class_rows[scored], probs.view(-1, queries)).view(len(scored), -1, width)
        k = int(scores.sum(dim=(1, 2)).argmax())
        best_other = _best_other(scores, k).clamp_(min=rest)
        torch.sub(scores[k], best_other, out=slack[band])
        slack[band] -= scores[k] * margin + _SCORE_FLOOR
        leader[band] = scored[k]
        runs = scores.view(len(scores), -1, 32).amax(dim=-1)  # [K, rows * 12]
        lowest_best = torch.maximum(scores[k], best_other).view(-1, 32).amin(dim=-1)  # [rows * 12]
        can_win[start // _SCORE_BAND_ROWS] = False
        can_win[start // _SCORE_BAND_ROWS, scored] = (runs >= lowest_best * quarter).any(dim=1)
    return leader, slack, can_win


def _classes_worth_scoring(
    class_rows: torch.Tensor, mask_logits: torch.Tensor, first: torch.Tensor, second: torch.Tensor, quarter: float
) -> list[tuple[torch.Tensor, float]]:
    """Per band of rows: the classes :func:`_leads` must score there, and a bound on the others.

    Args:
        class_rows: ``[C, Q]`` class probabilities.
        mask_logits: ``[Q, h, w]`` finite mask logits.
        first, second: the source rows of each 384-grid row (see :func:`_bilinear_taps`).
        quarter: the fraction of the best score a class must reach somewhere to win.

    Returns:
        One ``(classes, rest)`` per band: ``classes`` (long, ascending; all of them where
        none can be left out), and ``rest``, a bound on every other class's score in the band
        (0.0 when all are scored).

    A band's mask probabilities lie between the sigmoids of its source rows' smallest and
    largest logits (resizing stays within the range it reads), so each class's score has an
    upper and a lower bound there, from one small matrix product for all bands. Classes
    whose upper bound is under ``quarter`` of the largest lower bound (the best score is at
    least that everywhere in the band) cannot win there: they need no scores, and their
    largest bound stands in for them as "the best other class". On a trained head that is
    most of its classes; where masks are vague (random weights) nothing is left out.
    """
    row_high, row_low = mask_logits.amax(dim=2), mask_logits.amin(dim=2)  # [Q, h]
    high = torch.maximum(row_high[:, first], row_high[:, second])  # [Q, 384]
    low = torch.minimum(row_low[:, first], row_low[:, second])
    bands = -(-high.shape[1] // _SCORE_BAND_ROWS)
    padding = bands * _SCORE_BAND_ROWS - high.shape[1]
    high = F.pad(high, (0, padding), value=float("-inf")).view(-1, bands, _SCORE_BAND_ROWS).amax(dim=2)
    low = F.pad(low, (0, padding), value=float("inf")).view(-1, bands, _SCORE_BAND_ROWS).amin(dim=2)
    upper = (class_rows @ high.sigmoid()).mul_(1 + _BOUND_SLACK)  # [C, bands]
    floor = (class_rows @ low.sigmoid()).amax(dim=0).mul_(1 - _BOUND_SLACK)  # [bands]
    negligible = upper < quarter * floor
    result: list[tuple[torch.Tensor, float]] = []
    for band in range(bands):
        left_out = negligible[:, band]
        rest = float(upper[left_out, band].max()) if bool(left_out.any()) else 0.0
        result.append(((~left_out).nonzero().flatten(), rest))
    return result


def _best_other(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[rows, W]``: the largest of ``scores [K, rows, W]`` without row ``k`` (zeros if K = 1)."""
    if len(scores) == 1:
        return torch.zeros_like(scores[0])
    if k == 0:
        return scores[1:].amax(dim=0)
    if k == len(scores) - 1:
        return scores[:-1].amax(dim=0)
    return torch.maximum(scores[:k].amax(dim=0), scores[k + 1 :].amax(dim=0))


def _logit_error(in_size: Sequence[int]) -> float:
    """Bound on |our resized mask logit - torch's| per unit of the largest |mask logit|
    (both bilinear to 384x384 from ``in_size``), see ``_SCORE_MARGIN``."""
    return 2.0**-18 * (max(in_size) + 1)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices ``first, second`` (long) and float32 ``weight`` of ``second`` (each
    ``[out_size]``) of a bilinear resize with ``align_corners=False``, as torch defines it."""
    position = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    first = position.floor().long().clamp(max=in_size - 1)
    second = (first + 1).clamp(max=in_size - 1)
    return first, second, (position - first).float()


def _window_max(values: torch.Tensor, window: int) -> torch.Tensor:
    """``[1, H, W]``: maximum of ``values [1, H, W]`` over the ``window x window`` pixels
    starting at each pixel (those inside the map)."""
    if window == 1:
        return values
    # Row maxima, then column maxima of those, over shifted views: exact, and for a
    # single-channel map many times faster than PyTorch's max_pool2d (6.4 -> 0.2 ms at 384x384).
    height, width = values.shape[-2:]
    padded = F.pad(values, (0, window - 1, 0, window - 1), value=float("-inf"))
    across = padded[..., :width]
    for shift in range(1, window):
        across = torch.maximum(across, padded[..., shift : shift + width])
    result = across[..., :height, :]
    for shift in range(1, window):
        result = torch.maximum(result, across[..., shift : shift + height, :])
    return result


def _source_window_starts(in_size: int, out_size: int, *, resized: bool) -> torch.Tensor:
    """``[out_size]`` long: for each output row (or column), the first of 4 source rows that
    include the two a bilinear resize (``align_corners=False``) reads for it; without resize,
    the row itself.

    The source position is computed in float64 here, not as torch's kernel does, so the
    window takes one row more on each side than the two it reads.
    """
    positions = torch.arange(out_size, dtype=torch.float64)
    if not resized:
        return positions.long()
    source = ((positions + 0.5) * (in_size / out_size) - 0.5).clamp(min=0).floor().long()
    return (source - 1).clamp(min=0)


# --------------------------------------------------------------------------- instance


def post_process_instance_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    return_coco_annotation: bool = False,
    return_binary_maps: bool = False,
    *,
    mask_size: MaskSize = REFERENCE_MASK_SIZE,
) -> list[dict[str, Any]]:
    """Instances: the top ``Q`` (query, class) pairs, scored by class probability times mask score.

    A pair's mask is its query's mask logits at ``mask_size`` binarised at 0; its mask score is the mean
    sigmoid inside that mask. Pairs with score >= ``threshold`` and a non-empty mask (after
    nearest resizing to the target size) become segments with ids 0, 1, ... in top-k order.
    ``mask_threshold`` and ``overlap_mask_area_threshold`` are accepted for API compatibility and,
    as in the reference, not used.

    Args:
        outputs: object with ``class_queries_logits [B, Q, C+1]`` and ``masks_queries_logits [B, Q, h, w]``.
        threshold: minimum segment score.
        target_sizes: one ``(height, width)`` per image; default ``mask_size``.
        return_coco_annotation: ``segmentation`` becomes the RLE list of
            :func:`convert_segmentation_to_rle` over the id map (background ``-1`` included).
        return_binary_maps: ``segmentation`` becomes float ``[N, H, W]`` 0/1 maps, one per segment
            (unchanged id map when there are none).
        mask_size: the size masks are resized to first (None: their own).

    Returns:
        One dict per image: ``segmentation`` (float32 ``[H, W]`` map of segment ids, ``-1`` where
        no segment; later segments overwrite earlier ones) and ``segments_info``: list of
        ``{"id", "label_id", "was_fused": False, "score"}`` (score rounded to 6 decimals).
    """
    del mask_threshold, overlap_mask_area_threshold  # unused by the reference either
    if return_coco_annotation and return_binary_maps:
        raise ValueError("return_coco_annotation and return_binary_maps can not be both set to True.")
    class_logits, mask_logits = _logits(outputs)
    batch_size, num_queries = class_logits.shape[:2]
    num_classes = class_logits.shape[-1] - 1
    _check_target_sizes(target_sizes, batch_size)
    grid = _grid_size(mask_logits, mask_size)

    results = []
    for i in range(batch_size):
        scores = class_logits[i].softmax(dim=-1)[:, :-1]  # [Q, C]
        top_scores, top_index = scores.flatten(0, 1).topk(num_queries, sorted=False)
        top_labels = top_index % num_classes
        top_queries = torch.div(top_index, num_classes, rounding_mode="floor")

        # A pair's final score is its class score times a mask score <= 1, so pairs below the
        # threshold already are out: only the rest need their (upsampled) masks.
        candidates = torch.nonzero(top_scores.double() >= threshold).flatten()
        size = _target_size(target_sizes, i) or grid
        rows, cols = _nearest_indices(grid, size, class_logits.device)
        segmentation = torch.full(size, -1.0, device=class_logits.device)
        segments: list[dict[str, Any]] = []
        kept = torch.zeros((0, *grid), dtype=torch.bool, device=class_logits.device)

        if candidates.numel() > 0:
            queries, pair_to_query = torch.unique(top_queries[candidates], return_inverse=True)
            binary, area, mask_scores = _binary_masks_and_scores(mask_logits[i], queries, mask_size)
            pair_scores = top_scores[candidates] * mask_scores[pair_to_query]
            # Score and emptiness (of the mask as nearest-resized to the output size) of each pair.
            passing = pair_scores.double() >= threshold  # Python-float comparison, as .item()
            sampled_rows, sampled_cols = rows.unique(), cols.unique()
            if (sampled_rows.numel(), sampled_cols.numel()) == grid:
                non_empty = area > 0  # every pixel survives the resize
            else:
                sampled = binary.index_select(1, sampled_rows).index_select(2, sampled_cols)
                non_empty = sampled.flatten(1).any(dim=1)
            non_empty = non_empty[pair_to_query]
            keep = torch.nonzero(passing & non_empty).flatten()
            if keep.numel() > 0:
                kept = binary.index_select(0, pair_to_query[keep])  # [K, *grid] in segment order
                labels_kept = top_labels[candidates[keep]].tolist()
                for seg_id, (label, score) in enumerate(zip(labels_kept, pair_scores[keep].tolist())):
                    segments.append({"id": seg_id, "label_id": int(label), "was_fused": False, "score": round(score, 6)})
                # Nearest resizing only gathers pixels, so painting at the mask size then gathering
                # equals painting the resized masks.
                segmentation = _paint_last_wins(kept)[rows[:, None], cols[None, :]]

        if return_coco_annotation:
            results.append({"segmentation": convert_segmentation_to_rle(segmentation), "segments_info": segments})
        elif return_binary_maps and kept.shape[0] > 0:
            binary_maps = kept[:, rows[:, None], cols[None, :]].to(torch.float32)
            results.append({"segmentation": binary_maps, "segments_info": segments})
        else:
            results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def post_process_topk_segments(
    outputs: Any,
    threshold: float | None = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    *,
    allowed_labels: Sequence[int] | None = None,
    relabel: Sequence[int] | None = None,
    return_coco_annotation: bool = False,
) -> list[dict[str, Any]]:
    """OneFormer's instance segments: the top ``Q`` (query, class) pairs as competing segments.

    Per image, the ``Q`` (query, class) pairs with the highest class probability (PyTorch's
    unsorted ``topk``, the reference's order) are kept when their probability is
    > ``threshold`` (``None``: all) and, with ``allowed_labels``, their class is one of them.
    They become segments as in :func:`compute_segments` with ``probabilities=False``: each
    pixel goes to the pair with the highest score x mask *logit* (at the model's mask size,
    resized to the target with antialiased bilinear, torchvision's default, as the reference
    does), nothing fused.

    Args:
        outputs: object with ``class_queries_logits [B, Q, C+1]`` and ``masks_queries_logits [B, Q, h, w]``.
        relabel: replaces each kept label by its index in this list (the reference's ADE20k
            renumbering of thing classes).
        return_coco_annotation: ``segmentation`` becomes the RLE list of
            :func:`convert_segmentation_to_rle`.

    Returns:
        One dict per image: ``segmentation`` (int32 ``[H, W]`` segment ids, 0 = none; float32
        filled with -1 when no pair is kept) and ``segments_info``.
    """
    class_logits, mask_logits = _logits(outputs)
    batch_size, num_queries = class_logits.shape[:2]
    num_classes = class_logits.shape[-1] - 1
    _check_target_sizes(target_sizes, batch_size)
    allowed = None if allowed_labels is None else torch.tensor(list(allowed_labels), dtype=torch.long)
    results = []
    for i in range(batch_size):
        scores = class_logits[i].softmax(dim=-1)[:, :-1]  # [Q, C]
        top_scores, top_index = scores.flatten(0, 1).topk(num_queries, sorted=False)
        labels = top_index % num_classes
        queries = torch.div(top_index, num_classes, rounding_mode="floor")
        keep = torch.ones_like(top_scores, dtype=torch.bool)
        if threshold is not None:
            keep &= top_scores > threshold
        if allowed is not None:
            keep &= torch.isin(labels, allowed.to(labels.device))
        top_scores, labels, queries = top_scores[keep], labels[keep], queries[keep]
        target = _target_size(target_sizes, i)
        if queries.numel() == 0:
            size = target or _grid_size(mask_logits, None)
            result = {"segmentation": torch.full(size, -1.0, device=class_logits.device), "segments_info": []}
        else:
            if relabel is not None:
                order = list(relabel)
                labels = torch.tensor([order.index(label) for label in labels.tolist()], dtype=labels.dtype)
            result = compute_segments(
                mask_logits[i].index_select(0, queries),
                top_scores,
                labels,
                target,
                mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold,
                label_ids_to_fuse=set(),
                mask_size=None,
                probabilities=False,
                antialias=True,
            )
            if return_coco_annotation:  # not for an empty result, as in the reference
                result["segmentation"] = convert_segmentation_to_rle(result["segmentation"])
        results.append(result)
    return results


def _binary_masks_and_scores(
    mask_logits: torch.Tensor, queries: torch.Tensor, mask_size: MaskSize
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The instance masks of some queries, as the reference computes them.

    Args:
        mask_logits: ``[Q, h, w]`` one image's mask logits.
        queries: ``[U]`` indices of the queries wanted.
        mask_size: the size masks are resized to first (None: their own).

    Returns:
        ``binary [U, *mask_size]`` (bool, logits > 0 at that size), ``area [U]``
        (int32, pixels in the mask) and ``mask_scores [U]`` (mean sigmoid inside the mask:
        the reference's ``(sigmoid * binary).sum() / (area + 1e-6)``, same float32 sums).
        Computed a chunk of queries at a time, so the float maps stay small and in cache.
    """
    count = queries.numel()
    binary = torch.empty((count, *_grid_size(mask_logits, mask_size)), dtype=torch.bool, device=mask_logits.device)
    area = torch.empty(count, dtype=torch.int32, device=mask_logits.device)
    inside = mask_logits.new_empty(count)
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        logits = _to_mask_size(mask_logits.index_select(0, queries[start:stop]), mask_size)  # [k, *mask_size]
        chunk = torch.gt(logits, 0, out=binary[start:stop])
        area[start:stop] = chunk.flatten(1).sum(1, dtype=torch.int32)
        inside[start:stop] = logits.sigmoid_().mul_(chunk).flatten(1).sum(1)
    return binary, area, inside / (area.to(inside.dtype) + 1e-6)


def _paint_last_wins(masks: torch.Tensor) -> torch.Tensor:
    """float32 ``[H, W]``: index of the last of ``masks [K, H, W]`` (bool) covering each pixel, else -1."""
    count = masks.shape[0]
    dtype = torch.uint8 if count < 256 else torch.int32
    ids = torch.arange(1, count + 1, device=masks.device).to(dtype).view(-1, 1, 1)
    painted = (masks.to(dtype) * ids).amax(dim=0)
    return painted.to(torch.float32) - 1.0


def _nearest_indices(
    in_size: tuple[int, int], out_size: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column source indices of torch's ``mode="nearest"`` resize (bit-identical)."""
    out = []
    for n_in, n_out in zip(in_size, out_size):
        grid = torch.arange(n_in, dtype=torch.float32, device=device).view(1, 1, n_in)
        out.append(F.interpolate(grid, size=n_out, mode="nearest").view(-1).long())
    return out[0], out[1]


# --------------------------------------------------------------------------- panoptic


def post_process_panoptic_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Iterable[int] | None = None,
    target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    *,
    mask_size: MaskSize = REFERENCE_MASK_SIZE,
    antialias: bool = False,
) -> list[dict[str, Any]]:
    """Panoptic segments: each pixel goes to the kept query with the highest score x mask prob.

    Queries are kept when their best class is not "no object" and its probability is
    > ``threshold``. A kept query becomes a segment when it wins at least one pixel, has pixels
    with score x prob >= ``mask_threshold``, and (won area / that area) > ``overlap_mask_area_threshold``.
    Segment ids start at 1 in query order; segments of a class in ``label_ids_to_fuse`` share
    the id of the first segment of that class. Exactly as in the reference, reusing a fused id
    also resets the running counter to it, so the next new segment continues from there (its id
    can then repeat an earlier one).

    Args:
        outputs: object with ``class_queries_logits [B, Q, C+1]`` and ``masks_queries_logits [B, Q, h, w]``.
        target_sizes: one ``(height, width)`` per image; default ``mask_size``.
        mask_size: the size masks are resized to first (None: their own).
        antialias: resize to the target with antialiased bilinear (torchvision's default,
            which OneFormer's reference uses) rather than plain bilinear.

    Returns:
        One dict per image: ``segmentation`` (int32 ``[H, W]`` segment ids, 0 = none; float32
        filled with -1 when no query is kept) and ``segments_info``: list of
        ``{"id", "label_id", "was_fused", "score"}`` (score rounded to 6 decimals; a fused class
        appears once per contributing query, with the shared id).
    """
    fuse = set(label_ids_to_fuse) if label_ids_to_fuse is not None else set()
    class_logits, mask_logits = _logits(outputs)
    batch_size = class_logits.shape[0]
    num_labels = class_logits.shape[-1] - 1
    _check_target_sizes(target_sizes, batch_size)
    pred_scores, pred_labels = class_logits.softmax(dim=-1).max(dim=-1)  # [B, Q]

    results = []
    for i in range(batch_size):
        keep = pred_labels[i].ne(num_labels) & (pred_scores[i] > threshold)
        target = _target_size(target_sizes, i)
        if not bool(keep.any()):
            size = target or _grid_size(mask_logits, mask_size)
            results.append({"segmentation": torch.full(size, -1.0, device=class_logits.device), "segments_info": []})
            continue
        kept_logits = mask_logits[i].index_select(0, torch.nonzero(keep).flatten())
        results.append(
            compute_segments(
                kept_logits,
                pred_scores[i][keep],
                pred_labels[i][keep],
                target,
                mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold,
                label_ids_to_fuse=fuse,
                mask_size=mask_size,
                antialias=antialias,
            )
        )
    return results


def compute_segments(
    mask_logits: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    size: tuple[int, int] | None,
    *,
    mask_threshold: float,
    overlap_mask_area_threshold: float,
    label_ids_to_fuse: set[int],
    mask_size: MaskSize = REFERENCE_MASK_SIZE,
    probabilities: bool = True,
    antialias: bool = False,
) -> dict[str, Any]:
    """Segments of some queries: each pixel goes to the query with the highest score x mask
    value (see :func:`post_process_panoptic_segmentation` for the rules and the result).

    Args:
        mask_logits: ``[K, h, w]`` the queries' mask logits.
        scores, labels: ``[K]`` each query's class score and class id.
        size: output ``(height, width)``; None for the mask size.
        probabilities: the mask values are the logits' sigmoid (panoptic); False: the raw
            logits (OneFormer's instance post-processing, as its reference does).
        antialias: resize with antialiased bilinear (see :func:`post_process_panoptic_segmentation`).
    """
    count = scores.shape[0]
    owner, own_area = _panoptic_owners(
        mask_logits, scores, size, mask_threshold, mask_size, probabilities=probabilities, antialias=antialias
    )
    won_area = torch.bincount(owner.flatten(), minlength=count)
    ratio = won_area / own_area  # the reference's float32 division, compared as a Python float
    exists = ((won_area > 0) & (own_area > 0) & (ratio.double() > overlap_mask_area_threshold)).tolist()
    label_list, score_list = labels.tolist(), scores.tolist()
    segment_of_query = [0] * count
    segments: list[dict[str, Any]] = []
    fused_ids: dict[int, int] = {}
    current = 0
    for k in range(count):
        if not exists[k]:
            continue
        label = label_list[k]
        should_fuse = label in label_ids_to_fuse
        # As in the reference, reusing a fused id also resets the running counter to it.
        if label in fused_ids:
            current = fused_ids[label]
        else:
            current += 1
        seg_id = current
        segment_of_query[k] = seg_id
        segments.append({"id": seg_id, "label_id": label, "was_fused": should_fuse, "score": round(score_list[k], 6)})
        if should_fuse:
            fused_ids[label] = seg_id
    lut = torch.tensor(segment_of_query, dtype=torch.int32, device=owner.device)
    return {"segmentation": lut[owner], "segments_info": segments}


def _panoptic_owners(
    mask_logits: torch.Tensor,
    scores: torch.Tensor,
    size: tuple[int, int] | None,
    mask_threshold: float,
    mask_size: MaskSize = REFERENCE_MASK_SIZE,
    *,
    probabilities: bool = True,
    antialias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which query owns each pixel, and each query's own mask area, for panoptic segments.

    With ``probs = resize(sigmoid(_to_mask_size(mask_logits, mask_size)), size) * scores`` (what the
    reference builds for all queries at once), returns ``probs.argmax(0)`` and the count of
    pixels with ``probs >= mask_threshold`` per query: the same numbers, computed a few
    queries at a time, by :mod:`omniseg.ops.scored_argmax` where numba is installed and
    otherwise with PyTorch operations (see :func:`_chunked_first_argmax`).

    Args:
        mask_logits: ``[K, h, w]`` logits of the kept queries.
        scores: ``[K]`` their class scores.
        size: output ``(height, width)``; None for the mask size.
        mask_size: the size masks are resized to first (None: their own).
        probabilities: take the sigmoid of the logits (else the logits themselves, resized
            and scaled the same way).
        antialias: resize with antialiased bilinear (PyTorch's, before the reduction).

    Returns:
        ``owner [H, W]`` (long, query index) and ``own_area [K]`` (long).
    """
    count = mask_logits.shape[0]

    if scored_argmax.available(mask_logits):  # resizes to ``size`` itself
        height, width = size or _grid_size(mask_logits, mask_size)
        best = torch.empty(height, width)
        owner = torch.empty(height, width, dtype=torch.long)
        own_area = torch.empty(count, dtype=torch.long)
        for start in range(0, count, _CHUNK):
            stop = min(start + _CHUNK, count)
            probs = _mask_values(mask_logits[start:stop], mask_size, probabilities)  # [k, *mask_size]
            if antialias and (height, width) != tuple(probs.shape[1:]):
                # The kernel resizes plain bilinear only: it gets the resized maps to reduce.
                probs = _resize(probs, (height, width), antialias=True)
            scored_argmax.update(probs, scores[start:stop], start, mask_threshold, best, owner, own_area)
        return owner, own_area

    # Only queries that might reach the mask threshold somewhere need counting: resizing
    # never leaves the range of the logits, so score * sigmoid(max logit) bounds a query's
    # probabilities (with a margin for float rounding; the logit itself for raw logits).
    peak = mask_logits.flatten(1).amax(1)  # NaN if the query has a NaN logit
    margin = 1e-5 * (peak.abs() + 1)
    peak_value = (peak + margin).sigmoid() if probabilities else (peak + margin)
    bound = scores * peak_value * (1 + 1e-5)
    reachable = ((bound >= mask_threshold) | bound.isnan()).tolist()
    own_area = torch.zeros(count, dtype=torch.long, device=mask_logits.device)

    def scaled_values(start: int, stop: int) -> torch.Tensor:
        probs = _mask_values(mask_logits[start:stop], mask_size, probabilities)  # [k, *mask_size]
        if size is not None:
            probs = _resize(probs, size, antialias=antialias)
        probs.mul_(scores[start:stop].view(-1, 1, 1))
        for k in range(start, stop):
            if reachable[k]:
                own_area[k] = torch.count_nonzero(probs[k - start] >= mask_threshold)
        return probs

    may_be_nan = not _all_finite(peak, mask_logits.flatten(1).amin(1), scores)
    return _chunked_first_argmax(scaled_values, count, may_be_nan=may_be_nan), own_area


def _resize(maps: torch.Tensor, size: tuple[int, int], *, antialias: bool) -> torch.Tensor:
    """``[k, h, w]`` -> ``[k, *size]``, bilinear (``align_corners=False``)."""
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]


def _mask_values(mask_logits: torch.Tensor, mask_size: MaskSize, probabilities: bool) -> torch.Tensor:
    """``[k, h, w]`` logits at ``mask_size`` (a new tensor), as probabilities or left as logits."""
    values = _to_mask_size(mask_logits, mask_size)
    return values.sigmoid_() if probabilities else values


# Maps resized together by _chunked_first_argmax: few enough that a chunk's full-size maps
# stay in cache and their memory is reused (all 100 queries of a 640x480 image at once are
# 120 MB of fresh memory, whose page faults cost as much as the resize itself).
_CHUNK = 8


def _chunked_first_argmax(
    values: Callable[[int, int], torch.Tensor], count: int, *, may_be_nan: bool
) -> torch.Tensor:
    """``argmax(dim=0)`` of ``count`` maps that are made (or read) a few at a time.

    Args:
        values: ``values(start, stop)`` returns maps ``start`` to ``stop - 1``, ``[k, H, W]``.
        count: number of maps.
        may_be_nan: whether a map can hold NaN (which argmax ranks above everything).

    Returns:
        ``[H, W]`` long: the first index of the maximum (the first NaN, if any), as
        ``torch.cat([values(...) ...]).argmax(0)`` would give.

    PyTorch's argmax over the first dimension is a slow strided reduction, while max
    reductions over it are fast. So each map ``k`` gets the rank ``count - k`` (a small
    integer), the winner of a chunk is the largest rank among its maxima, and a running
    maximum over chunks keeps the earlier map on ties (only a strictly greater value wins).
    """
    rank_dtype = torch.uint8 if count < 2**8 else torch.int16 if count < 2**15 else torch.int32
    best = rank = None
    for start in range(0, count, _CHUNK):
        stop = min(start + _CHUNK, count)
        chunk = values(start, stop)
        ranks = torch.arange(count - start, count - stop, -1, device=chunk.device).to(rank_dtype).view(-1, 1, 1)
        chunk_best = chunk.amax(dim=0)
        # ">=" is "==" here (no map exceeds the maximum; NaN compares false both ways), and
        # PyTorch's CPU kernel for it is faster.
        chunk_rank = _as_rank(chunk >= chunk_best, rank_dtype).mul_(ranks).amax(dim=0)
        if may_be_nan:
            # A NaN maximum equals nothing; argmax takes the first NaN.
            nan = chunk_best.isnan()
            nan_rank = _as_rank(chunk.isnan(), rank_dtype).mul_(ranks).amax(dim=0)
            chunk_rank = torch.where(nan, nan_rank, chunk_rank)
        if best is None:
            best, rank = chunk_best, chunk_rank
            continue
        # Strictly greater: on ties the earlier map keeps the pixel.
        better = chunk_best > best
        if may_be_nan:
            better |= nan & ~best.isnan()
        rank = torch.where(better, chunk_rank, rank)
        best = torch.maximum(best, chunk_best)  # NaN-propagating, like argmax
    return count - rank.long()


def _as_rank(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool tensor as 0/1 integers of ``dtype`` (a free view for uint8)."""
    return mask.view(torch.uint8) if dtype == torch.uint8 else mask.to(dtype)


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite: the minimum and maximum propagate NaN and show any
    infinity, and ``aminmax`` is one fast pass (``isfinite(t).all()`` took 10x as long on
    100 mask maps)."""
    for tensor in tensors:
        if tensor.numel():
            low, high = torch.aminmax(tensor)
            if not (math.isfinite(low) and math.isfinite(high)):
                return False
    return True
