"""Tiny random DETR panoptic checkpoints built with the reference implementation (transformers).

A helper module for tests, not a test file (as ``reference_maskformer.py`` is for MaskFormer)::

    from reference_detr import TINY_DETR_CONFIGS, build_reference_detr

    path = build_reference_detr(tmp_path / "detr", **TINY_DETR_CONFIGS["deep"])

The reference cannot build timm backbones here (timm needs torchvision), so these use its own
ResNet (``use_timm_backbone=False``); the timm layout is tested by renaming (test_detr.py).
Everything is seeded; every parameter and every frozen batch-norm buffer gets seeded noise,
so parity checks are sensitive to each of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from reference_models import label_kwargs, seeded_reference_model

# Two tiny shapes that differ in what a DETR implementation can get wrong: ResNet depths,
# widths and where the bottleneck strides, transformer depth and heads (the mask head's
# attention channels are the encoder's heads), the decoder normalising between layers
# (auxiliary_loss), query and label counts, and the processor's resize.
TINY_DETR_CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(
        embedding_size=16,
        hidden_sizes=(16, 32, 64, 128),
        depths=(1, 1, 2, 1),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=8,
        decoder_attention_heads=4,
        num_queries=7,
        num_labels=4,
    ),
    "deep": dict(
        embedding_size=8,
        hidden_sizes=(16, 32, 48, 64),
        depths=(2, 1, 1, 2),
        downsample_in_bottleneck=True,
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=8,
        decoder_attention_heads=2,
        num_queries=9,
        num_labels=6,
        auxiliary_loss=True,
        shortest_edge=72,
        longest_edge=112,
    ),
}


def reference_detr_config(
    *,
    embedding_size: int = 16,
    hidden_sizes: Sequence[int] = (16, 32, 64, 128),
    depths: Sequence[int] = (1, 1, 2, 1),
    downsample_in_bottleneck: bool = False,
    d_model: int = 32,
    encoder_layers: int = 1,
    decoder_layers: int = 2,
    encoder_attention_heads: int = 8,
    decoder_attention_heads: int = 4,
    ffn_dim: int = 64,
    num_queries: int = 7,
    num_labels: int = 4,
    auxiliary_loss: bool = False,
    id2label: dict[int, str] | None = None,
):
    """A ``transformers.DetrConfig`` for a tiny DETR panoptic model (dropout off)."""
    from transformers import DetrConfig, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=embedding_size,
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        downsample_in_bottleneck=downsample_in_bottleneck,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return DetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=encoder_attention_heads,
        decoder_attention_heads=decoder_attention_heads,
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        num_queries=num_queries,
        dropout=0.0,
        auxiliary_loss=auxiliary_loss,
        **label_kwargs(num_labels, id2label),
    )


def reference_detr_processor(*, shortest_edge: int = 64, longest_edge: int = 96):
    """A reference ``DetrImageProcessor`` (the PIL one) resizing to small sizes."""
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    return DetrImageProcessorPil(size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})


def perturb_frozen_batch_norms(model: torch.nn.Module, *, seed: int = 0) -> None:
    """Give every frozen batch norm seeded statistics and affine values (they are buffers, so
    :func:`reference_models.perturb_parameters` does not reach them; at their defaults they would be identities)."""
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, buffer in sorted(model.named_buffers()):
            if name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            elif name.endswith(("running_mean", "normalization.weight", "normalization.bias")):
                buffer.add_(torch.randn(buffer.shape, generator=generator) * 0.1)


def build_reference_detr(
    directory: str | Path,
    *,
    seed: int = 0,
    perturb: float = 0.1,
    shortest_edge: int = 64,
    longest_edge: int = 96,
    **config_kwargs: Any,
) -> Path:
    """Build a tiny random reference ``DetrForSegmentation`` and save it with its processor;
    ``config_kwargs`` are :func:`reference_detr_config`'s (e.g. an entry of
    :data:`TINY_DETR_CONFIGS`). Returns the directory."""
    from transformers import DetrForSegmentation

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = reference_detr_config(**config_kwargs)
    model = seeded_reference_model(DetrForSegmentation, config, seed=seed, perturb=perturb)
    perturb_frozen_batch_norms(model, seed=seed)
    with torch.no_grad():
        # The mask head's first conv sees the unnormalised projected backbone map: biases of
        # the size of the other weights' noise would not move its output by 1e-5.
        bias = model.mask_head.conv1.conv.bias
        bias.add_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)) * 20.0)
    model.save_pretrained(directory)
    reference_detr_processor(shortest_edge=shortest_edge, longest_edge=longest_edge).save_pretrained(directory)
    return directory



def build_photo_detr(directory: str | Path, id2label: dict[int, str], photo: Image.Image, *, seed: int = 4) -> Path:
    """A tiny random reference DETR that gives ``photo`` several segments of several classes,
    saved with its processor (short side 120).

    At random initialisation every DETR query ends with nearly the same state, class and mask
    (the decoder's states differ by a few percent, the encoder's output varies little across
    pixels, and the mask head's 8 attention channels are drowned by its 256 image channels).
    So the heads are set, from one forward pass on the photo, to read what does differ: the
    class head and the attention map's queries read the decoder states' deviations from their
    mean, its keys the encoder output's deviations from its mean (each along their top 6
    principal directions), and the mask head's first conv is led by the attention maps.
    Exact mask equality needs pixels where two queries' score x probability do not nearly tie
    (the implementations' logits differ by ~1e-6 relative): of seeds 0-7, 6 has one (semantic)
    on the first CamVid val frame; seed 4 gives 3 panoptic segments and 2 semantic classes
    there.
    """
    from transformers import DetrForSegmentation

    directory = Path(directory)
    config = reference_detr_config(num_queries=12, id2label=id2label)
    model = seeded_reference_model(DetrForSegmentation, config, seed=seed, perturb=0.1)
    perturb_frozen_batch_norms(model, seed=seed)
    processor = reference_detr_processor(shortest_edge=120, longest_edge=200)
    make_queries_distinct(model, processor(images=[photo], return_tensors="pt"), seed=seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def make_queries_distinct(model: torch.nn.Module, inputs: dict[str, torch.Tensor], *, seed: int = 0) -> None:
    """Set a reference ``DetrForSegmentation``'s heads, in place, so that the image of ``inputs``
    gets queries of different classes, scores and masks (see :func:`build_photo_detr`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.detr.model.decoder.layers:
            layer.encoder_attn.q_proj.weight.mul_(8.0)
            layer.encoder_attn.k_proj.weight.mul_(8.0)
            layer.encoder_attn.v_proj.weight.mul_(5.0)
        first = model(**inputs)
        states, memory = first.last_hidden_state[0], first.encoder_last_hidden_state[0]  # [Q, C], [hw, C]
        channels = states.shape[1]

        def reading_deviations(rows: int, values: torch.Tensor, gain: float) -> tuple[torch.Tensor, torch.Tensor]:
            deviations = values - values.mean(0)
            directions = torch.linalg.svd(deviations, full_matrices=False).Vh[:6]
            weight = torch.randn(rows, channels, generator=generator) @ (directions.T @ directions)
            weight *= gain / deviations.norm(dim=1).mean()
            return weight, -weight @ values.mean(0)

        head = model.detr.class_labels_classifier
        head.weight.copy_(reading_deviations(head.weight.shape[0], states, 1.5)[0])
        head.weight[-1].zero_()
        head.bias.copy_(-head.weight @ states.mean(0))
        head.bias[-1] = -1.0
        for projection, values, gain in (
            (model.bbox_attention.q_proj, states, 2.0),
            (model.bbox_attention.k_proj, memory, 1.0),
        ):
            weight, bias = reading_deviations(channels, values, gain)
            projection.weight.copy_(weight)
            projection.bias.copy_(bias)
        model.mask_head.conv1.conv.weight[:, channels:].mul_(300.0)
        model.mask_head.conv1.conv.weight[:, :channels].mul_(0.01)
        for stage in model.mask_head.fpn_stages:
            stage.fpn_adapter.weight.mul_(0.05)
            stage.fpn_adapter.bias.mul_(0.05)
