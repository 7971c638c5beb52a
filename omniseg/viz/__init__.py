"""Pictures of results: a fixed class palette and mask overlays with a legend."""

from omniseg.viz.overlay import draw_overlay
from omniseg.viz.palette import color_for, palette

__all__ = ["color_for", "draw_overlay", "palette"]
