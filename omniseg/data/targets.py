"""Instance / panoptic targets from semantic label maps, and their binary-mask encoding.

A semantic dataset (CamVid, ADE20k-style folders) has class ids per pixel but no instance
ids. For instance or panoptic training, each connected component of a *thing* class is taken
as one instance (the usual approximation) and each *stuff* class present is one segment.
The result is an instance-id map plus ``instance_id_to_semantic_id``, the pair the
Mask2Former image processor (:mod:`omniseg.processing.mask2former`) encodes into
``mask_labels`` / ``class_labels``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage
from torch import Tensor


def instances_from_semantic(
    label_map: np.ndarray | Tensor,
    thing_ids: Iterable[int],
    *,
    ignore_index: int = 255,
    connectivity: int = 8,
) -> tuple[np.ndarray, dict[int, int]]:
    """Split a semantic label map into segments.

    Args:
        label_map: ``[H, W]`` integer class ids; ``ignore_index`` marks unlabelled pixels.
        thing_ids: class ids of countable classes; every connected component of one of
            them becomes its own instance. Every other class present is one segment.
        ignore_index: value of unlabelled pixels, kept as is in the output.
        connectivity: 8 (diagonal neighbours connect) or 4.

    Returns:
        ``(instance_map, instance_id_to_semantic_id)``: an int32 ``[H, W]`` map whose
        pixels hold a segment id (``ignore_index`` where unlabelled), and the class of each
        segment id. Ids are assigned from 0 upward in class order (then component order,
        scanning rows top to bottom), skipping ``ignore_index`` so it stays unambiguous.
    """
    labels = np.asarray(label_map.cpu() if isinstance(label_map, Tensor) else label_map)
    if labels.ndim != 2:
        raise ValueError(f"expected a [H, W] label map, got shape {labels.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    things = {int(t) for t in thing_ids}
    out = np.full(labels.shape, ignore_index, dtype=np.int32)
    mapping: dict[int, int] = {}
    next_id = 0

    def new_id() -> int:
        nonlocal next_id
        if next_id == ignore_index:
            next_id += 1
        value = next_id
        next_id += 1
        return value

    for class_id in np.unique(labels).tolist():
        if class_id == ignore_index:
            continue
        region = labels == class_id
        if class_id in things:
            components, count = ndimage.label(region, structure=structure)
            for component in range(1, count + 1):
                segment = new_id()
                out[components == component] = segment
                mapping[segment] = int(class_id)
        else:
            segment = new_id()
            out[region] = segment
            mapping[segment] = int(class_id)
    return out, mapping

