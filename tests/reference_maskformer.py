"""Tiny random MaskFormer checkpoints built with the reference implementation (transformers).

A helper module for tests, not a test file (as ``reference_models.py`` is for Mask2Former):
each builder writes a complete model directory in the hub layout and returns its path::

    from reference_maskformer import TINY_MASKFORMER_CONFIGS, build_reference_maskformer

    path = build_reference_maskformer(tmp_path / "mf", **TINY_MASKFORMER_CONFIGS["aux"])

Everything is seeded. Every parameter gets seeded Gaussian noise (``perturb``) so that parity
checks are sensitive to every weight (zero biases and unit norms would hide mistakes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reference_models import label_kwargs, seeded_reference_model, tiny_swin_backbone

# Two tiny shapes that differ in everything a MaskFormer implementation can get wrong: Swin
# depths and window (3 does not divide the maps, so windows pad), decoder depth and heads, an
# input projection (backbone width != d_model) or none, mask features narrower than the
# queries, the auxiliary predictions of the reference (use_auxiliary_loss), and the processor's
# resize. (DETR's normalisation between layers, the decoder's auxiliary_loss, is tested on its
# own: the reference fails with both auxiliary settings on.)
TINY_MASKFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        window_size=4,
        embed_dim=16,
        num_queries=10,
        num_labels=5,
        decoder_layers=2,
        d_model=32,
        decoder_attention_heads=2,
        fpn_feature_size=32,
        mask_feature_size=32,
    ),
    "aux": dict(
        depths=(2, 1, 2, 1),
        num_heads=(2, 2, 4, 4),
        window_size=3,
        embed_dim=8,
        num_queries=7,
        num_labels=3,
        decoder_layers=3,
        d_model=64,
        decoder_attention_heads=4,
        fpn_feature_size=64,
        mask_feature_size=16,
        use_auxiliary_loss=True,
        shortest_edge=72,
        longest_edge=112,
    ),
}


def reference_maskformer_config(
    *,
    depths: Sequence[int] = (1, 1, 1, 1),
    num_heads: Sequence[int] = (1, 1, 2, 2),
    window_size: int = 4,
    embed_dim: int = 16,
    num_queries: int = 10,
    num_labels: int = 5,
    decoder_layers: int = 2,
    d_model: int = 32,
    decoder_attention_heads: int = 2,
    decoder_ffn_dim: int = 64,
    fpn_feature_size: int = 32,
    mask_feature_size: int = 32,
    use_auxiliary_loss: bool = False,
    decoder_auxiliary_loss: bool = False,
    id2label: dict[int, str] | None = None,
):
    """A ``transformers.MaskFormerConfig`` for a tiny Swin-backed model (dropout off)."""
    from transformers import DetrConfig, MaskFormerConfig

    decoder = DetrConfig(
        d_model=d_model,
        decoder_layers=decoder_layers,
        decoder_attention_heads=decoder_attention_heads,
        decoder_ffn_dim=decoder_ffn_dim,
        num_queries=num_queries,
        dropout=0.0,
        auxiliary_loss=decoder_auxiliary_loss,
        use_timm_backbone=False,
    )
    return MaskFormerConfig(
        backbone_config=tiny_swin_backbone(
            depths=depths, num_heads=num_heads, window_size=window_size, embed_dim=embed_dim
        ),
        decoder_config=decoder.to_dict(),
        fpn_feature_size=fpn_feature_size,
        mask_feature_size=mask_feature_size,
        use_auxiliary_loss=use_auxiliary_loss,
        **label_kwargs(num_labels, id2label),
    )


def reference_maskformer_processor(*, shortest_edge: int = 64, longest_edge: int = 96):
    """A reference ``MaskFormerImageProcessor`` resizing to small sizes, padded to /32."""
    from transformers.models.maskformer.image_processing_pil_maskformer import MaskFormerImageProcessorPil

    return MaskFormerImageProcessorPil(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}, size_divisor=32, ignore_index=255
    )


def build_reference_maskformer(
    directory: str | Path,
    *,
    seed: int = 0,
    perturb: float = 0.1,
    shortest_edge: int = 64,
    longest_edge: int = 96,
    **config_kwargs: Any,
) -> Path:
    """Build a tiny random reference ``MaskFormerForInstanceSegmentation`` and save it with its
    processor; ``config_kwargs`` are :func:`reference_maskformer_config`'s (e.g. an entry of
    :data:`TINY_MASKFORMER_CONFIGS`). Returns the directory."""
    from transformers import MaskFormerForInstanceSegmentation

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = reference_maskformer_config(**config_kwargs)
    model = seeded_reference_model(MaskFormerForInstanceSegmentation, config, seed=seed, perturb=perturb)
    model.save_pretrained(directory)
    reference_maskformer_processor(shortest_edge=shortest_edge, longest_edge=longest_edge).save_pretrained(directory)
    return directory


def build_distinct_queries_maskformer(directory: str | Path, id2label: dict[int, str], *, seed: int = 0) -> Path:
    """A tiny random reference MaskFormer that gives several segments on a real photo, saved
    with its processor.

    A tiny random (even briefly fitted) MaskFormer gives every query nearly the same class and
    mask: its queries start at zero and differ only by their small position embeddings. Large
    seeded query embeddings and class weights (N(0, 25)) set them apart, so a photo yields
    segments of more than one class in every subtask.
    """
    from transformers import MaskFormerForInstanceSegmentation

    directory = Path(directory)
    config = reference_maskformer_config(num_queries=12, id2label=id2label)
    model = seeded_reference_model(MaskFormerForInstanceSegmentation, config, seed=seed, perturb=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for weight in (model.model.transformer_module.queries_embedder.weight, model.class_predictor.weight):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 5.0)
    model.save_pretrained(directory)
    reference_maskformer_processor().save_pretrained(directory)
    return directory
