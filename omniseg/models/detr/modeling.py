"""DETR for panoptic segmentation (``DetrForSegmentation``).

``pixel_values`` -> ResNet (4 maps, strides 4..32) -> 1x1 ``input_projection`` of the
stride-32 map -> transformer encoder (sine positions of the unpadded area, padding masked)
-> DETR decoder over learned query positions -> per query: class logits (``num_labels`` +
"no object"), a box (``[cx, cy, w, h]`` in [0, 1]) and, through the mask head, mask logits at
stride 4.

Submodule names mirror the hub checkpoints (``detr.model.backbone.conv_encoder.model.*``,
``detr.model.{input_projection, query_position_embeddings, encoder, decoder}``,
``detr.{class_labels_classifier, bbox_predictor}``, ``bbox_attention``, ``mask_head``). When
the config says the backbone is timm's, ``state_dict`` and ``load_state_dict`` use timm's
names for it (see :mod:`omniseg.models.detr.backbone`), so checkpoints move both ways in
either layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.base import PretrainedModel
from omniseg.models.detr.backbone import ResNetBackbone, resnet_key_to_timm, timm_key_to_resnet
from omniseg.models.detr.config import DetrConfig
from omniseg.models.detr.encoder import DetrEncoder, masked_sine_position_embedding
from omniseg.models.detr.mask_head import MaskHeadSmallConv, MHAttentionMap
from omniseg.models.maskformer.transformer_decoder import DetrDecoder
from omniseg.ops.linear import Linear, PointwiseConv2d

BACKBONE_PREFIX = "detr.model.backbone.conv_encoder.model."


class DetrSegmentationOutput:
    """What :class:`DetrForSegmentation` returns.

    Attributes:
        logits: ``[B, Q, num_labels + 1]`` class logits; the last class is "no object".
        pred_boxes: ``[B, Q, 4]`` boxes ``(cx, cy, w, h)`` relative to the padded input.
        pred_masks: ``[B, Q, H / 4, W / 4]`` mask logits (the size of the stride-4 backbone
            map), decoded on first access.

    The mask head is most of DETR's work, and post-processing keeps only confident queries:
    :meth:`masks_of` decodes the masks of chosen queries of one image only (the same
    numbers as the rows of ``pred_masks``).
    """

    def __init__(self, logits: Tensor, pred_boxes: Tensor, decode_masks: Callable[[int, Tensor], Tensor]) -> None:
        self.logits = logits
        self.pred_boxes = pred_boxes
        self._decode_masks = decode_masks
        self._pred_masks: Tensor | None = None

    @property
    def pred_masks(self) -> Tensor:
        if self._pred_masks is None:
            every_query = torch.arange(self.logits.shape[1], device=self.logits.device)
            self._pred_masks = torch.stack(
                [self._decode_masks(i, every_query) for i in range(self.logits.shape[0])]
            )
        return self._pred_masks

    def masks_of(self, image: int, queries: Tensor) -> Tensor:
        """Mask logits ``[K, H / 4, W / 4]`` of ``queries`` (``[K]`` indices) of image ``image``."""
        if self._pred_masks is not None:
            return self._pred_masks[image].index_select(0, queries)
        return self._decode_masks(image, queries)


class ConvEncoder(nn.Module):
    """The backbone (checkpoint prefix ``conv_encoder.model``)."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.model = ResNetBackbone(config.resnet)


class DetrBackbone(nn.Module):
    """The backbone and the padding mask at its last stride (checkpoint prefix ``backbone``)."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.conv_encoder = ConvEncoder(config)

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> tuple[list[Tensor], Tensor]:
        """``[B, 3, H, W]`` and ``[B, H, W]`` (1 = real pixel) -> the four maps and the
        stride-32 mask ``[B, h, w]`` (bool, nearest-downsampled as the reference does)."""
        maps = self.conv_encoder.model(pixel_values)
        size = maps[-1].shape[-2:]
        mask = F.interpolate(pixel_mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()
        return maps, mask


class DetrModel(nn.Module):
    """Backbone, input projection, query positions, encoder, decoder (prefix ``detr.model``)."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.backbone = DetrBackbone(config)
        self.input_projection = PointwiseConv2d(config.resnet.hidden_sizes[-1], config.d_model)
        self.query_position_embeddings = nn.Embedding(config.num_queries, config.d_model)
        self.encoder = DetrEncoder(config)
        self.decoder = DetrDecoder(config)


class BoxHead(nn.Module):
    """Three linear layers (ReLU between), checkpoint names ``layers.{0,1,2}``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Linear(dim, dim), Linear(dim, dim), Linear(dim, 4)])

    def forward(self, x: Tensor) -> Tensor:
        """``[..., C]`` -> ``[..., 4]`` (before the sigmoid)."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class DetrDetector(nn.Module):
    """The detection model and its heads (checkpoint prefix ``detr``)."""

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.model = DetrModel(config)
        self.class_labels_classifier = Linear(config.d_model, config.num_labels + 1)
        self.bbox_predictor = BoxHead(config.d_model)


class DetrForSegmentation(PretrainedModel):
    """DETR with its class, box and mask heads; loads and saves hub ``DetrForSegmentation``
    checkpoints (ResNet backbone in the reference's or timm's layout).

    Example::

        model = DetrForSegmentation.from_pretrained(path)
        with torch.inference_mode():
            out = model(pixel_values, pixel_mask)  # out.logits, out.pred_boxes, out.pred_masks
    """

    config_class = DetrConfig
    architecture = "DetrForSegmentation"
    # timm's layout may carry batch-norm counters; frozen batch norm has no use for them.
    ignore_on_load = ("num_batches_tracked",)

    config: DetrConfig

    def __init__(self, config: DetrConfig) -> None:
        super().__init__(config)
        dim, heads = config.d_model, config.encoder_attention_heads
        self.detr = DetrDetector(config)
        self.bbox_attention = MHAttentionMap(dim, heads)
        widths = config.resnet.hidden_sizes
        self.mask_head = MaskHeadSmallConv(dim=dim + heads, fpn_dims=widths[2::-1], context_dim=dim)
        if config.timm_layout:
            self.register_state_dict_post_hook(_backbone_names_to_timm)
            self.register_load_state_dict_pre_hook(_backbone_names_from_timm)

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None) -> DetrSegmentationOutput:
        """
        Args:
            pixel_values: ``[B, 3, H, W]`` normalised images (padded to a common size).
            pixel_mask: ``[B, H, W]``, 1 on real pixels and 0 on padding (default: all real).
                Padding is left out of the position embedding and of every attention.

        Returns:
            :class:`DetrSegmentationOutput` (masks decoded when asked for).
        """
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.long, device=pixel_values.device)
        model = self.detr.model
        maps, mask = model.backbone(pixel_values, pixel_mask)
        projected = model.input_projection(maps[-1])  # [B, C, h, w]
        features = projected.flatten(2).transpose(1, 2)  # [B, hw, C]
        positions = masked_sine_position_embedding(mask, self.config.d_model // 2, dtype=pixel_values.dtype)
        flat_mask = mask.flatten(1)
        key_mask = None if bool(flat_mask.all()) else flat_mask[:, None, None, :]
        memory = model.encoder(features, positions, key_mask)
        query_positions = model.query_position_embeddings.weight[None]  # [1, Q, C]
        queries = torch.zeros(batch, *query_positions.shape[1:], dtype=memory.dtype, device=memory.device)
        queries, _ = model.decoder(queries, query_positions, memory, memory + positions, key_mask)
        logits = self.detr.class_labels_classifier(queries)
        boxes = self.detr.bbox_predictor(queries).sigmoid()
        padding = None
        if key_mask is not None:
            padding = torch.zeros(key_mask.shape, dtype=memory.dtype, device=memory.device)
            padding.masked_fill_(~key_mask, torch.finfo(memory.dtype).min)
        decode = functools.partial(
            self._decode_masks,
            queries=queries,
            memory=memory,
            padding=padding,
            projected=projected,
            fpn_maps=[maps[2], maps[1], maps[0]],
            grad_enabled=torch.is_grad_enabled(),
            contexts={},
        )
        return DetrSegmentationOutput(logits, boxes, decode)

    def _decode_masks(
        self,
        image: int,
        query_indices: Tensor,
        *,
        queries: Tensor,
        memory: Tensor,
        padding: Tensor | None,
        projected: Tensor,
        fpn_maps: list[Tensor],
        grad_enabled: bool,
        contexts: dict[int, Any],
    ) -> Tensor:
        """Mask logits ``[K, H/4, W/4]`` of some queries of one image of a forward pass."""
        if query_indices.numel() == 0:
            return projected.new_zeros(0, *fpn_maps[-1].shape[-2:])
        with torch.set_grad_enabled(grad_enabled):
            if image not in contexts:
                contexts[image] = self.mask_head.image_context(
                    projected[image : image + 1], [m[image : image + 1] for m in fpn_maps]
                )
            height, width = projected.shape[-2:]
            attention = self.bbox_attention(
                queries[image : image + 1].index_select(1, query_indices),
                memory[image : image + 1],
                None if padding is None else padding[image : image + 1],
            )  # [1, K, heads, hw]
            attention = attention[0].unflatten(-1, (height, width))
            return self.mask_head(contexts[image], attention)


def _backbone_names_to_timm(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """``state_dict`` post-hook: the backbone's tensors under timm's names."""
    start = prefix + BACKBONE_PREFIX
    for name in [n for n in state if n.startswith(start)]:
        state[start + resnet_key_to_timm(name[len(start) :])] = state.pop(name)


def _backbone_names_from_timm(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: timm's backbone names to this module's."""
    start = prefix + BACKBONE_PREFIX
    for name in [n for n in state if n.startswith(start)]:
        tensor = state.pop(name)
        renamed = timm_key_to_resnet(name[len(start) :])
        if renamed is not None:
            state[start + renamed] = tensor
