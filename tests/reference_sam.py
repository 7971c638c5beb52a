"""Tiny random SAM checkpoints built with the reference implementation (transformers).

A helper module for tests, not a test file (see reference_models.py for the pattern)::

    from reference_sam import TINY_SAM_CONFIGS, build_reference_sam

    path = build_reference_sam(tmp_path / "sam", **TINY_SAM_CONFIGS["windowed"])

Each builder writes ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``
(the processor resizes to ``image_size`` and pads to it). Every parameter gets seeded
Gaussian noise so that parity checks see every weight (random initialisation leaves the
relative positions and absolute positions at zero).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from reference_models import seeded_reference_model

# Two shapes that differ in depth, window size (one that does not divide the grid, so
# windows are padded), global-attention layers, heads and widths.
TINY_SAM_CONFIGS: dict[str, dict[str, Any]] = {
    "windowed": dict(
        image_size=128,
        patch_size=16,
        vision_hidden=32,
        vision_layers=3,
        vision_heads=2,
        window_size=3,
        global_attn_indexes=(1,),
        hidden=32,
        decoder_layers=2,
        decoder_heads=1,
    ),
    "deep": dict(
        image_size=96,
        patch_size=8,
        vision_hidden=48,
        vision_layers=4,
        vision_heads=4,
        window_size=4,
        global_attn_indexes=(0, 3),
        hidden=64,
        decoder_layers=3,
        decoder_heads=4,
    ),
}


def reference_sam_config(
    *,
    image_size: int = 128,
    patch_size: int = 16,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 2,
    window_size: int = 3,
    global_attn_indexes: tuple[int, ...] = (1,),
    hidden: int = 32,
    decoder_layers: int = 2,
    decoder_heads: int = 2,
):
    """A ``transformers.SamConfig`` of a tiny model (``hidden`` is the prompt/mask width)."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=vision_hidden,
        output_channels=hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        window_size=window_size,
        global_attn_indexes=list(global_attn_indexes),
        num_pos_feats=hidden // 2,
        mlp_dim=2 * vision_hidden,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=hidden, image_size=image_size, patch_size=patch_size, mask_input_channels=8
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=hidden,
        mlp_dim=2 * hidden,
        num_hidden_layers=decoder_layers,
        num_attention_heads=decoder_heads,
        iou_head_hidden_dim=hidden,
    )
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def reference_sam_processor(image_size: int):
    """The reference's SAM image processor, resizing and padding to ``image_size``."""
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    mask_size = image_size // 4
    return SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_size},
        mask_pad_size={"height": mask_size, "width": mask_size},
    )


def build_reference_sam(directory: str | Path, *, seed: int = 0, perturb: float = 0.1, **config_kwargs: Any) -> Path:
    """Build, perturb and save a tiny reference ``SamModel`` and its processor; returns the
    directory (loadable by ``transformers`` and by ``omniseg.load_model``)."""
    from transformers import SamModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = reference_sam_config(**config_kwargs)
    model = seeded_reference_model(SamModel, config, seed=seed, perturb=perturb)
    model.save_pretrained(directory)
    reference_sam_processor(config.vision_config.image_size).save_pretrained(directory)
    return directory


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression from its definition, one box at a time.

    Boxes ``[K, 4]`` as ``x0, y0, x1, y1``; in order of decreasing score (ties: lower
    index first), a box is kept unless its IoU with a kept box exceeds ``iou_threshold``.
    Returns the kept indices in that order (what ``torchvision.ops.nms`` returns).
    """
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    boxes = boxes.tolist()

    def iou(a: list[float], b: list[float]) -> float:
        width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = width * height
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    kept: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64)


def reference_batched_nms(boxes, scores, idxs, iou_threshold):
    """``torchvision.ops.batched_nms`` from its definition: NMS within each ``idxs`` class."""
    kept = []
    for value in torch.unique(idxs).tolist():
        members = (idxs == value).nonzero().flatten()
        kept.extend(members[reference_nms(boxes[members], scores[members], iou_threshold)].tolist())
    kept = torch.tensor(kept, dtype=torch.int64)
    return kept[torch.argsort(-scores[kept], stable=True)]


@contextlib.contextmanager
def torchvision_nms_for_reference():
    """Let the reference's mask-generation post-processing run without torchvision (no CPU
    wheel here): it imports ``torchvision.ops.boxes.batched_nms``, which this provides
    (:func:`reference_batched_nms`) while the context is active, and its availability
    check is bypassed (the checked method's own code runs)."""
    import sys
    import types

    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    checked = SamImageProcessorPil.__dict__["post_process_for_mask_generation"]

    names = ("torchvision", "torchvision.ops", "torchvision.ops.boxes")
    saved = {name: sys.modules.get(name) for name in names}
    package, ops, boxes = (types.ModuleType(name) for name in names)
    boxes.batched_nms = reference_batched_nms
    package.ops, ops.boxes = ops, boxes
    sys.modules.update(dict(zip(names, (package, ops, boxes))))
    SamImageProcessorPil.post_process_for_mask_generation = checked.__wrapped__
    try:
        yield
    finally:
        SamImageProcessorPil.post_process_for_mask_generation = checked
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
