"""``omniseg segment --task everything`` and ``--points`` / ``--box``: Segment Anything masks
through the ``segment`` command's batch, resume and error machinery.

:class:`MaskSegmenter` answers like the image-segmentation pipeline that command drives
(``resolve_subtask``, ``id2label``, and a call returning ``{"score", "label", "mask"}``
segments per image), so the per-image JSON (COCO RLE masks, scores, boxes), the label map
(mask number per pixel) and the overlay (a distinct colour and an outline per mask) are
written by the same code as for every other model.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniseg.errors import InputError

# Masks are numbered by decreasing score; each number is its own "class" so that the
# overlay gives every mask its own colour. More masks than this in one image fail it.
MAX_MASKS = 1000
MASK_LABELS = {number: f"mask_{number}" for number in range(1, MAX_MASKS + 1)}


def parse_points(text: str) -> list[list[float]]:
    """``"x,y;x,y"`` -> ``[[x, y], [x, y]]`` (argparse type)."""
    points = []
    for part in text.split(";"):
        values = _numbers(part, 2, "a point", "x,y")
        points.append(values)
    return points


def parse_box(text: str) -> list[float]:
    """``"x0,y0,x1,y1"`` -> ``[x0, y0, x1, y1]`` (argparse type)."""
    box = _numbers(text, 4, "a box", "x0,y0,x1,y1")
    if box[2] < box[0] or box[3] < box[1]:
        raise argparse.ArgumentTypeError(f"box {text!r} has x1 < x0 or y1 < y0; give the top-left corner first")
    return box


def _numbers(text: str, count: int, what: str, form: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"{what} must be {form} ({count} numbers), got {text!r}")
    return values


class MaskSegmenter:
    """All masks of each image (``mask-generation``), or the masks of one point/box prompt."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "cpu",
        points: Sequence[Sequence[float]] | None = None,
        box: Sequence[float] | None = None,
    ) -> None:
        import omniseg

        self.generator = omniseg.pipeline("mask-generation", model=model, device=device)
        self.points = None if points is None else [list(p) for p in points]
        self.box = None if box is None else list(box)

    @property
    def prompted(self) -> bool:
        return self.points is not None or self.box is not None

    @property
    def id2label(self) -> dict[int, str]:
        return MASK_LABELS

    def resolve_subtask(self, subtask: str | None) -> str:
        """The task recorded in each JSON: ``everything``, or the prompt (so that a re-run
        with another prompt redoes the image)."""
        if subtask not in (None, "everything"):
            raise ValueError("a Segment Anything model gives masks, not classes: use --task everything")
        if not self.prompted:
            return "everything"
        parts = []
        if self.points is not None:
            parts.append("points=" + ";".join(",".join(f"{v:g}" for v in p) for p in self.points))
        if self.box is not None:
            parts.append("box=" + ",".join(f"{v:g}" for v in self.box))
        return "prompt " + " ".join(parts)

    def __call__(
        self, images: Sequence[Any], *, subtask: str | None = None, batch_size: int = 1, threshold: float | None = None
    ) -> list[list[dict[str, Any]]]:
        """Per image, the masks as segments ``{"score", "label": "mask_N", "mask"}``,
        numbered by decreasing score. ``threshold`` is the minimum predicted IoU
        (``pred_iou_thresh``) of ``everything``; prompts return all three candidates."""
        answers = []
        for image in images:
            if self.prompted:
                masks, scores = self._prompted(image)
            else:
                options = {} if threshold is None else {"pred_iou_thresh": threshold}
                result = self.generator(image, **options)
                masks, scores = result["masks"], result["scores"].tolist()
            if len(masks) > MAX_MASKS:
                raise InputError("<image>", f"{len(masks)} masks, more than the {MAX_MASKS} one output holds")
            answers.append(
                [
                    {"score": float(score), "label": MASK_LABELS[number], "mask": np.asarray(mask, dtype=bool)}
                    for number, (mask, score) in enumerate(zip(masks, scores), start=1)
                ]
            )
        return answers

    @torch.inference_mode()
    def _prompted(self, image: Any) -> tuple[list[np.ndarray], list[float]]:
        processor, model = self.generator.processor, self.generator.model
        points = None if self.points is None else [[self.points]]
        boxes = None if self.box is None else [[self.box]]
        inputs = processor(image, input_points=points, input_boxes=boxes).to(self.generator.device)
        outputs = model(**inputs)
        masks = processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0][0]  # [3, H, W]
        scores = outputs.iou_scores[0, 0].cpu()
        order = torch.argsort(scores, descending=True, stable=True)
        return [masks[i].numpy() for i in order.tolist()], scores[order].tolist()
