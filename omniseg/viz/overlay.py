"""Pictures of segmentation results: masks blended over the image, outlined, with a legend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from omniseg.viz.palette import Color, color_for, color_for_label, shade, text_color

_PANEL_BACKGROUND = (246, 246, 246)
_PANEL_TEXT = (30, 30, 30)
_MAX_LEGEND_COLUMNS = 3
_MAX_LABEL_CHARS = 32


def draw_overlay(
    image: Image.Image,
    segments: Sequence[Mapping[str, Any]],
    *,
    alpha: float = 0.5,
    id2label: Mapping[int, str] | None = None,
    legend: bool = True,
) -> Image.Image:
    """Blend each segment's colour over ``image``, outline it, and add a legend panel.

    Args:
        image: the picture the segments belong to (any mode; drawn as RGB).
        segments: the pipeline's ``{"score", "label", "mask"}`` dicts (mask: PIL "L" or a
            boolean/0-255 array at the image's size), or the records of
            :func:`omniseg.io.results.segments_to_records`, whose ``"segmentation"`` RLE is
            used when there is no ``"mask"``. A ``"label_id"`` key, or ``id2label``, picks
            the class colour; otherwise the colour is derived from the label name.
        alpha: opacity of the colour over the image (0: invisible, 1: opaque).
        id2label: the model's class names, to colour segments by class id.
        legend: add the legend panel to the right of the image (colour, number, label,
            score; for segments without a score, the share of the image they cover).

    Instances of one class share its colour in different shades, are outlined in an opaque
    shade, and (when they have a score) are numbered on the image as in the legend.
    Overlapping masks are painted lowest score first, so the most confident one shows.
    Returns a new RGB image; ``image`` is not modified.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    width, height = base.size
    label2id = _invert(id2label)

    thickness = max(1, round(min(width, height) / 320))
    # Per segment only its bounding box (grown by the outline thickness) and the mask inside
    # it are kept: full-size masks of many segments on a large photo would not fit in memory.
    entries: list[_Entry] = []
    per_class_count: dict[Any, int] = {}
    for number, segment in enumerate(segments, start=1):
        mask = _mask_array(segment, (height, width))
        label = str(segment.get("label", ""))
        class_id = segment.get("label_id")
        if class_id is None:
            class_id = label2id.get(label)
        base_color = color_for(int(class_id)) if class_id is not None else color_for_label(label)
        key = class_id if class_id is not None else label
        instance = per_class_count.get(key, 0)
        per_class_count[key] = instance + 1
        box = _bounding_box(mask, margin=thickness)
        entries.append(
            _Entry(number, label, segment.get("score"), shade(base_color, instance),
                   box, None if box is None else mask[box])
        )

    # One uint8 colour layer; Pillow does the blending and compositing in C (a 12-megapixel
    # photo takes a fraction of a second where NumPy's masked float maths took seconds).
    colour_layer = np.zeros((height, width, 3), dtype=np.uint8)
    covered = np.zeros((height, width), dtype=bool)
    outline = np.zeros((height, width), dtype=bool)
    for entry in _paint_order(entries):
        if entry.box is None:
            continue
        part = entry.part
        colours = colour_layer[entry.box]
        colours[part] = entry.colour
        covered[entry.box] |= part
        outline[entry.box] &= ~part  # a segment painted later hides earlier outlines
        # The outline is the mask minus its erosion; border_value=1 keeps the image frame
        # from counting as an edge (the box's other sides lie outside the mask anyway).
        edge = part & ~ndimage.binary_erosion(part, iterations=thickness, border_value=1)
        outline[entry.box] |= edge
        colours[edge] = _darken(entry.colour)
    colour_image = Image.fromarray(colour_layer)
    fill = Image.fromarray(covered & ~outline)
    result = Image.composite(Image.blend(base, colour_image, alpha), base, fill)
    result = Image.composite(colour_image, result, Image.fromarray(outline))

    # Text scales with the picture so the legend stays readable on large photos.
    font = _font(max(11, min(72, round(max(width, height) / 40))))
    if any(entry.score is not None for entry in entries):
        _draw_numbers(result, entries, font)
    if not legend:
        return result
    return _with_legend(result, entries, font)


@dataclass
class _Entry:
    """One segment as drawn: legend number, label, score, colour, and its mask's box."""

    number: int
    label: str
    score: float | None
    colour: Color
    box: tuple[slice, slice] | None  # None: empty mask
    part: np.ndarray | None  # the mask inside ``box``

    @property
    def area(self) -> int:
        return 0 if self.part is None else int(self.part.sum())


def _invert(id2label: Mapping[int, str] | None) -> dict[str, int]:
    inverse: dict[str, int] = {}
    for class_id, label in sorted((int(k), v) for k, v in (id2label or {}).items()):
        inverse.setdefault(label, class_id)  # duplicate names: the lowest id wins
    return inverse


def _mask_array(segment: Mapping[str, Any], shape: tuple[int, int]) -> np.ndarray:
    if segment.get("mask") is not None:
        mask = np.asarray(segment["mask"])
        mask = mask > (127 if mask.dtype == np.uint8 else 0)
    elif segment.get("segmentation") is not None:
        from pycocotools import mask as mask_utils

        rle = dict(segment["segmentation"])
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        mask = mask_utils.decode(rle).astype(bool)
    else:
        raise ValueError("a segment needs a 'mask' or a 'segmentation' (COCO RLE)")
    if mask.shape != shape:
        raise ValueError(f"mask of shape {mask.shape} does not match the image ({shape})")
    return mask


def _paint_order(entries: list[_Entry]) -> list[_Entry]:
    # Stable sort: segments without a score keep their order; scored ones rise by score.
    return sorted(entries, key=lambda entry: -math.inf if entry.score is None else entry.score)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The slices of the mask's bounding box grown by ``margin`` (clipped), or None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (
        slice(max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, height)),
        slice(max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, width)),
    )


def _darken(colour: Color) -> Color:
    return tuple(round(c * 0.6) for c in colour)  # type: ignore[return-value]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _draw_numbers(canvas: Image.Image, entries: list[_Entry], font) -> None:
    """Write each segment's legend number at its most interior pixel, if the tag fits there."""
    draw = ImageDraw.Draw(canvas)
    for entry in entries:
        if entry.box is None:
            continue
        y, x, depth = _most_interior_point(entry.part)
        text = str(entry.number)
        tw, th = _text_size(draw, text, font)
        if depth * 2 < max(th, tw) * 0.8:
            continue  # too thin for a readable tag
        y, x = y + entry.box[0].start, x + entry.box[1].start
        tag = (x - tw // 2 - 3, y - th // 2 - 3, x + (tw + 1) // 2 + 3, y + (th + 1) // 2 + 3)
        draw.rectangle(tag, fill=entry.colour, outline=_darken(entry.colour))
        draw.text((x, y), text, fill=text_color(entry.colour), font=font, anchor="mm")


# Masks are searched for their most interior point at most this many pixels a side: the
# exact distance transform of a 12-megapixel mask takes about a second, and a number tag
# needs no finer placement.
_TAG_SEARCH_SIZE = 256


def _most_interior_point(mask: np.ndarray) -> tuple[int, int, float]:
    """``(row, column, depth)``: a pixel of ``mask`` (bool ``[H, W]``, not empty) far from its
    outside, and that distance in pixels (the frame counts as outside).

    Masks larger than ``_TAG_SEARCH_SIZE`` a side are searched on blocks of ``f x f``
    pixels that lie wholly inside the mask: the point is then a block centre and the depth
    a slight underestimate (by under ``f`` pixels)."""
    factor = max(1, math.ceil(max(mask.shape) / _TAG_SEARCH_SIZE))
    if factor > 1:
        height, width = mask.shape
        padded = np.zeros((-(-height // factor) * factor, -(-width // factor) * factor), dtype=bool)
        padded[:height, :width] = mask
        blocks = padded.reshape(padded.shape[0] // factor, factor, -1, factor).all(axis=(1, 3))
        if blocks.any():
            y, x, depth = _deepest_pixel(blocks)
            centre = factor // 2
            return min(y * factor + centre, height - 1), min(x * factor + centre, width - 1), (depth - 0.5) * factor
    return _deepest_pixel(mask)


def _deepest_pixel(mask: np.ndarray) -> tuple[int, int, float]:
    """The pixel of ``mask`` farthest from any pixel outside it (the frame counts as outside)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(y), int(x), float(depth[y, x])


def _with_legend(image: Image.Image, entries: list[_Entry], font) -> Image.Image:
    width, height = image.size
    probe = ImageDraw.Draw(image)
    total = float(width * height)
    texts = []
    for entry in entries:
        label = entry.label
        if len(label) > _MAX_LABEL_CHARS:
            label = label[: _MAX_LABEL_CHARS - 1] + "…"
        if entry.score is None:
            texts.append(f"{label}  {100.0 * entry.area / total:.1f}%")
        else:
            texts.append(f"{entry.number}  {label}  {entry.score:.2f}")
    if not texts:
        texts, colours = ["no segments"], [None]
    else:
        colours = [entry.colour for entry in entries]

    _, line_height = _text_size(probe, "Ag19", font)
    swatch = line_height + 2
    row = swatch + 6
    pad = 8
    rows_per_column = max(1, (height - 2 * pad) // row)
    columns = math.ceil(len(texts) / rows_per_column)
    if columns > _MAX_LEGEND_COLUMNS:
        # More entries than fit beside the image: grow the canvas downward instead.
        columns = _MAX_LEGEND_COLUMNS
        rows_per_column = math.ceil(len(texts) / columns)
    column_widths = []
    for c in range(columns):
        chunk = texts[c * rows_per_column : (c + 1) * rows_per_column]
        column_widths.append(swatch + 6 + max(_text_size(probe, t, font)[0] for t in chunk))
    panel_width = pad + sum(w + pad for w in column_widths)
    canvas_height = max(height, 2 * pad + rows_per_column * row - 6)

    canvas = Image.new("RGB", (width + panel_width, canvas_height), _PANEL_BACKGROUND)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.line([(width, 0), (width, canvas_height)], fill=(200, 200, 200))
    x0 = width + pad
    for c, column_width in enumerate(column_widths):
        for r in range(rows_per_column):
            index = c * rows_per_column + r
            if index >= len(texts):
                break
            y = pad + r * row
            if colours[index] is not None:
                draw.rectangle(
                    (x0, y, x0 + swatch - 1, y + swatch - 1),
                    fill=colours[index],
                    outline=_darken(colours[index]),
                )
            draw.text(
                (x0 + swatch + 6, y + swatch // 2), texts[index], fill=_PANEL_TEXT,
                font=font, anchor="lm",
            )
        x0 += column_width + pad
    return canvas
