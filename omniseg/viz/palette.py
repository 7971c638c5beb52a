"""A fixed colour per class id: the same class gets the same colour in every picture."""

from __future__ import annotations

import colorsys
import zlib

Color = tuple[int, int, int]

# Hand-picked, mutually distinct colours for the first class ids (after Sasha Trubetskoy's
# "20 distinct colours", reordered so neighbouring ids contrast). Most datasets' frequent
# classes have small ids, so these are the colours seen most.
BASE_COLORS: tuple[Color, ...] = (
    (230, 25, 75),    # red
    (60, 180, 75),    # green
    (0, 130, 200),    # blue
    (255, 225, 25),   # yellow
    (145, 30, 180),   # purple
    (245, 130, 48),   # orange
    (70, 240, 240),   # cyan
    (240, 50, 230),   # magenta
    (210, 245, 60),   # lime
    (0, 128, 128),    # teal
    (250, 190, 212),  # pink
    (170, 110, 40),   # brown
    (220, 190, 255),  # lavender
    (128, 0, 0),      # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),    # olive
    (255, 215, 180),  # apricot
    (0, 0, 128),      # navy
    (128, 128, 128),  # grey
    (255, 250, 200),  # beige
)

# Successive multiples of the golden ratio conjugate spread hues evenly for any count.
_GOLDEN = 0.618033988749895


def color_for(class_id: int) -> Color:
    """The colour of class ``class_id`` (any non-negative int), always the same."""
    if class_id < 0:
        raise ValueError(f"class ids are non-negative, got {class_id}")
    if class_id < len(BASE_COLORS):
        return BASE_COLORS[class_id]
    k = class_id - len(BASE_COLORS)
    hue = (0.11 + k * _GOLDEN) % 1.0
    # Cycle saturation and value too, so that colours whose hues land close stay apart.
    saturation = (0.85, 0.6, 0.95)[k % 3]
    value = (0.95, 0.8, 0.65)[(k // 3) % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))


def palette(count: int) -> list[Color]:
    """The colours of class ids ``0 .. count - 1``."""
    return [color_for(i) for i in range(count)]


def color_for_label(label: str) -> Color:
    """A stable colour for a class known only by name (no id): hashed, not order-dependent."""
    return color_for(zlib.crc32(label.encode("utf-8")) % 997)


# Blend amounts towards white (> 0) or black (< 0) for successive instances of one class:
# alternating and interleaved, so consecutive instances (often neighbours) contrast.
_SHADE_STEPS = (0.0, 0.3, -0.3, 0.55, -0.5, 0.15, -0.15, 0.42, -0.4, 0.68, -0.62, 0.22, -0.22)


def shade(color: Color, index: int) -> Color:
    """The ``index``-th shade of ``color``, to tell instances of one class apart.

    Shade 0 is the colour itself; later shades alternate lighter and darker by varying
    amounts, cycling after 13 shades (beyond that, outlines and numbers tell them apart).
    """
    amount = _SHADE_STEPS[index % len(_SHADE_STEPS)]
    target = 255 if amount > 0 else 0
    return tuple(round(c + (target - c) * abs(amount)) for c in color)  # type: ignore[return-value]


def text_color(background: Color) -> Color:
    """Black or white, whichever reads better on ``background`` (by perceived luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)
