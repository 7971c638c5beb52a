"""Tiny random Mask2Former checkpoints built with the reference implementation (transformers).

A helper module for tests, not a test file. Each builder writes a complete model directory
in the hub layout (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) and
returns its path, so omniseg's loaders, processors, pipelines and CLI can be tested against
the reference without network access::

    from reference_models import TINY_MASK2FORMER_CONFIGS, build_reference_mask2former  # tests/ is on sys.path under pytest

    path = build_reference_mask2former(tmp_path / "m2f")                    # default tiny model
    path = build_reference_mask2former(tmp_path / "m2f", **TINY_MASK2FORMER_CONFIGS["wide"])

Everything is seeded: the same arguments give the same weights. Random initialisation makes
Mask2Former's outputs nearly constant (zero sampling offsets and attention weights in the
pixel decoder, for example), so by default every parameter gets seeded Gaussian noise
(``perturb``) to make parity checks sensitive to every weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Three tiny shapes that differ in every dimension a Mask2Former implementation can get wrong:
# Swin depths and window size (including windows larger than some feature maps), query and
# label counts, number of decoder layers (so the level cycle wraps), attention heads, and
# the processor's resize (so inputs differ in size and aspect). Each entry holds keyword
# arguments of :func:`build_reference_mask2former`.
TINY_MASK2FORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        window_size=4,
        embed_dim=16,
        num_queries=10,
        num_labels=5,
        decoder_layers=4,
        encoder_layers=1,
        hidden_dim=32,
        num_attention_heads=2,
    ),
    "deep": dict(
        depths=(2, 2, 2, 1),
        num_heads=(2, 2, 4, 4),
        window_size=3,
        embed_dim=16,
        num_queries=7,
        num_labels=3,
        decoder_layers=5,
        encoder_layers=2,
        hidden_dim=32,
        num_attention_heads=4,
        shortest_edge=72,
        longest_edge=112,
    ),
    "wide": dict(
        depths=(1, 1, 2, 1),
        num_heads=(2, 2, 4, 8),
        window_size=7,
        embed_dim=24,
        num_queries=16,
        num_labels=9,
        decoder_layers=3,
        encoder_layers=2,
        hidden_dim=64,
        num_attention_heads=4,
        shortest_edge=96,
        longest_edge=128,
    ),
}


def reference_mask2former_config(
    *,
    depths: Sequence[int] = (1, 1, 1, 1),
    num_heads: Sequence[int] = (1, 1, 2, 2),
    window_size: int = 4,
    embed_dim: int = 16,
    num_queries: int = 10,
    num_labels: int = 5,
    decoder_layers: int = 4,
    encoder_layers: int = 1,
    hidden_dim: int = 32,
    num_attention_heads: int = 2,
    dim_feedforward: int = 64,
    encoder_feedforward_dim: int = 64,
    pre_norm: bool = False,
    feature_size: int | None = None,
    mask_feature_size: int | None = None,
):
    """A ``transformers.Mask2FormerConfig`` for a tiny Swin-backed model.

    ``feature_size`` (pixel decoder width) and ``mask_feature_size`` default to
    ``hidden_dim`` (transformer decoder width); a ``feature_size`` other than ``hidden_dim``
    adds the transformer decoder's input projections. ``feature_size`` must be a multiple
    of 32 (the pixel decoder's GroupNorm has 32 groups). Labels are named ``"label_0"``, ...
    """
    from transformers import Mask2FormerConfig

    feature_size = hidden_dim if feature_size is None else feature_size
    mask_feature_size = hidden_dim if mask_feature_size is None else mask_feature_size
    if feature_size % 32:
        raise ValueError(f"feature_size must be a multiple of 32, got {feature_size}")
    return Mask2FormerConfig(
        backbone_config=tiny_swin_backbone(
            depths=depths, num_heads=num_heads, window_size=window_size, embed_dim=embed_dim
        ),
        feature_size=feature_size,
        mask_feature_size=mask_feature_size,
        hidden_dim=hidden_dim,
        encoder_feedforward_dim=encoder_feedforward_dim,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        num_attention_heads=num_attention_heads,
        dim_feedforward=dim_feedforward,
        pre_norm=pre_norm,
        num_queries=num_queries,
        **label_kwargs(num_labels),
    )


def reference_image_processor(*, shortest_edge: int = 64, longest_edge: int = 96):
    """A reference ``Mask2FormerImageProcessor`` resizing to small sizes, padded to /32."""
    from transformers.models.mask2former.image_processing_pil_mask2former import (
        Mask2FormerImageProcessorPil,
    )

    return Mask2FormerImageProcessorPil(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
        size_divisor=32,
        ignore_index=255,
    )


def tiny_swin_backbone(*, depths: Sequence[int], num_heads: Sequence[int], window_size: int, embed_dim: int):
    """A ``transformers.SwinConfig`` for a tiny backbone with its four stages out (drop path off)."""
    from transformers import SwinConfig

    return SwinConfig(
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=list(num_heads),
        window_size=window_size,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def label_kwargs(num_labels: int, id2label: dict[int, str] | None = None) -> dict[str, dict]:
    """The ``id2label`` and ``label2id`` arguments of a reference config: ``id2label`` when
    given, else ``num_labels`` labels named ``"label_0"``, ..."""
    id2label = id2label or {i: f"label_{i}" for i in range(num_labels)}
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def seeded_reference_model(model_class: type, config: Any, *, seed: int, perturb: float) -> torch.nn.Module:
    """``model_class(config)`` initialised after ``torch.manual_seed(seed)``, every parameter
    then moved by ``perturb`` times seeded Gaussian noise (none when 0); in eval mode."""
    torch.manual_seed(seed)
    model = model_class(config)
    if perturb:
        perturb_parameters(model, seed=seed, scale=perturb)
    return model.eval()


@torch.no_grad()
def perturb_parameters(model: torch.nn.Module, *, seed: int = 0, scale: float = 0.1) -> None:
    """Add seeded Gaussian noise (``scale`` times N(0, 1)) to every parameter, in place."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def build_reference_mask2former(
    directory: str | Path,
    *,
    seed: int = 0,
    perturb: float = 0.1,
    shortest_edge: int = 64,
    longest_edge: int = 96,
    **config_kwargs: Any,
) -> Path:
    """Build a tiny random reference ``Mask2FormerForUniversalSegmentation`` and save it.

    Args:
        directory: where to write the model directory (created if needed).
        seed: seeds the random initialisation and the weight noise.
        perturb: scale of the Gaussian noise added to every parameter (0 disables it).
        shortest_edge, longest_edge: resize sizes of the saved image processor.
        **config_kwargs: any keyword of :func:`reference_mask2former_config` (``depths``,
            ``num_heads``, ``window_size``, ``embed_dim``, ``num_queries``, ``num_labels``,
            ``decoder_layers``, ``encoder_layers``, ``hidden_dim``, ``num_attention_heads``,
            ``dim_feedforward``, ``encoder_feedforward_dim``, ``pre_norm``, ``feature_size``,
            ``mask_feature_size``), e.g. one entry
            of :data:`TINY_MASK2FORMER_CONFIGS`.

    Returns:
        The model directory, loadable by ``transformers`` and by ``omniseg.load_model``.
    """
    from transformers import Mask2FormerForUniversalSegmentation

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = reference_mask2former_config(**config_kwargs)
    model = seeded_reference_model(Mask2FormerForUniversalSegmentation, config, seed=seed, perturb=perturb)
    model.save_pretrained(directory)
    reference_image_processor(
        shortest_edge=shortest_edge, longest_edge=longest_edge
    ).save_pretrained(directory)
    return directory
