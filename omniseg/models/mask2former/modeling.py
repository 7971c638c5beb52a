"""Mask2Former for universal (semantic, instance, panoptic) segmentation.

``pixel_values`` -> Swin backbone (4 maps, strides 4..32) -> pixel decoder (deformable
encoder on strides 32/16/8, FPN to the stride-4 mask features) -> masked-attention
transformer decoder (learned queries) -> per query: class logits (``num_labels`` + "no
object") and mask logits at stride 4.

Submodule names mirror the reference implementation, so ``state_dict`` keys are the hub
checkpoints' (``model.pixel_level_module.encoder.*`` backbone,
``model.pixel_level_module.decoder.*`` pixel decoder, ``model.transformer_module.*``,
``class_predictor.*``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from omniseg.models.base import PretrainedModel
from omniseg.models.mask2former.config import Mask2FormerConfig
from omniseg.models.mask2former.criterion import Mask2FormerCriterion
from omniseg.models.mask2former.pixel_decoder import Mask2FormerPixelDecoder, MultiscaleDeformableAttention
from omniseg.models.mask2former.transformer_decoder import (
    MaskedAttentionDecoderLayer,
    MaskedCrossAttention,
    Mask2FormerTransformerModule,
    MLPPredictionHead,
)
from omniseg.models.swin import IGNORE_ON_LOAD as SWIN_IGNORE_ON_LOAD
from omniseg.models.swin import SwinBackbone
from omniseg.ops.linear import Linear


@dataclasses.dataclass
class Mask2FormerOutput:
    """What :class:`Mask2FormerForUniversalSegmentation` returns.

    Attributes:
        class_queries_logits: ``[B, Q, num_labels + 1]``; the last class is "no object".
        masks_queries_logits: ``[B, Q, H / 4, W / 4]`` for ``pixel_values`` of ``[B, 3, H, W]``.
        auxiliary_logits: when requested, one dict per intermediate prediction (the initial
            queries', then every decoder layer's but the last), with the same two keys.
        loss: the training loss, when targets are given (``None`` otherwise).
    """

    class_queries_logits: Tensor
    masks_queries_logits: Tensor
    auxiliary_logits: list[dict[str, Tensor]] | None = None
    loss: Tensor | None = None


class Mask2FormerPixelLevelModule(nn.Module):
    """Backbone (``encoder``) and pixel decoder (``decoder``)."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.encoder = SwinBackbone(config.backbone_config)
        self.decoder = Mask2FormerPixelDecoder(config, feature_channels=self.encoder.channels)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor], list[tuple[int, int]]]:
        """See :meth:`Mask2FormerPixelDecoder.forward`."""
        return self.decoder(self.encoder(pixel_values))


class Mask2FormerModel(nn.Module):
    """Pixel-level module and transformer module (checkpoint prefix ``model``)."""

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__()
        self.pixel_level_module = Mask2FormerPixelLevelModule(config)
        self.transformer_module = Mask2FormerTransformerModule(config)

    def forward(self, pixel_values: Tensor, intermediate_masks: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """``[B, 3, H, W]`` -> per prediction (initial, then each decoder layer): the
        normalised query states ``[B, Q, C]`` and the mask logits ``[B, Q, H / 4, W / 4]``
        (only the final prediction's unless ``intermediate_masks``)."""
        pixel_features, multi_scale, spatial_shapes = self.pixel_level_module(pixel_values)
        return self.transformer_module(
            multi_scale,
            spatial_shapes,
            pixel_features,
            self.pixel_level_module.decoder.mask_projection,
            intermediate_masks=intermediate_masks,
        )


class Mask2FormerForUniversalSegmentation(PretrainedModel):
    """Mask2Former with its class head; loads and saves hub ``Mask2FormerForUniversalSegmentation``
    checkpoints.

    Example::

        model = Mask2FormerForUniversalSegmentation.from_pretrained(path)
        with torch.inference_mode():
            out = model(pixel_values)  # out.class_queries_logits, out.masks_queries_logits
    """

    config_class = Mask2FormerConfig
    architecture = "Mask2FormerForUniversalSegmentation"
    # The criterion's class weights are derived from the config (the reference saves them).
    ignore_on_load = SWIN_IGNORE_ON_LOAD + ("criterion.empty_weight",)

    config: Mask2FormerConfig

    def __init__(self, config: Mask2FormerConfig) -> None:
        super().__init__(config)
        self.model = Mask2FormerModel(config)
        self.class_predictor = Linear(config.hidden_dim, config.num_labels + 1)
        self.criterion = Mask2FormerCriterion.from_config(config)
        self._init_weights()

    def forward(
        self,
        pixel_values: Tensor,
        pixel_mask: Tensor | None = None,
        output_auxiliary_logits: bool | None = None,
        mask_labels: list[Tensor] | None = None,
        class_labels: list[Tensor] | None = None,
    ) -> Mask2FormerOutput:
        """
        Args:
            pixel_values: ``[B, 3, H, W]`` normalised images (padded to a common size).
            pixel_mask: ``[B, H, W]``, 1 on real pixels, 0 on padding. Accepted for API
                compatibility and ignored: like the reference, Mask2Former sees padding
                as (normalised) zeros.
            output_auxiliary_logits: also return the intermediate predictions; defaults to
                ``config.output_auxiliary_logits``.
            mask_labels: training targets, per image ``[T_i, H, W]`` binary masks (as the
                processor encodes them); with ``class_labels`` the output carries ``loss``.
            class_labels: per image ``[T_i]`` class ids of ``mask_labels``.

        Returns:
            :class:`Mask2FormerOutput`.
        """
        del pixel_mask  # see the docstring
        if output_auxiliary_logits is None:
            output_auxiliary_logits = bool(self.config.output_auxiliary_logits)
        with_loss = mask_labels is not None and class_labels is not None
        need_auxiliary = output_auxiliary_logits or (with_loss and self.config.use_auxiliary_loss)
        # Training keeps the full-size intermediate masks (the original computation) even
        # without auxiliary losses; only inference takes the low-resolution shortcut.
        states, masks = self.model(pixel_values, intermediate_masks=need_auxiliary or with_loss or self.training)
        auxiliary = None
        if need_auxiliary:
            auxiliary = [
                {"masks_queries_logits": mask, "class_queries_logits": self.class_predictor(state)}
                for state, mask in zip(states[:-1], masks[:-1])
            ]
        class_queries_logits = self.class_predictor(states[-1])
        loss = None
        if with_loss:
            # Weighted Mask2Former loss of the last layer plus every intermediate one, as
            # the reference computes it (see criterion.py).
            losses = self.criterion(
                class_queries_logits,
                masks[-1],
                mask_labels,
                class_labels,
                auxiliary=auxiliary if self.config.use_auxiliary_loss else None,
            )
            loss = sum(losses.values())
        return Mask2FormerOutput(
            class_queries_logits=class_queries_logits,
            masks_queries_logits=masks[-1],
            auxiliary_logits=auxiliary if output_auxiliary_logits else None,
            loss=loss,
        )

    def reference_only_tensors(self) -> dict[str, Tensor]:
        # The reference keeps the criterion's class weights as a saved buffer, and its Swin
        # backbone has a final layer norm that feature maps never go through.
        width = self.config.backbone_config.hidden_size
        prefix = "model.pixel_level_module.encoder.swin.layernorm."
        return {
            "criterion.empty_weight": self.criterion.empty_weight,
            prefix + "weight": torch.ones(width),
            prefix + "bias": torch.zeros(width),
        }

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Training-from-scratch initialisation of everything but the backbone (which
        initialises itself), following the reference: N(0, init_std) linear and conv
        weights with zero biases, Xavier decoder layers, Deformable DETR's sampling
        offsets, N(0, 1) embeddings, PyTorch's default for the mask MLP."""
        config = self.config
        heads = [self.model.pixel_level_module.decoder, self.model.transformer_module, self.class_predictor]
        for head in heads:
            for module in head.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    nn.init.normal_(module.weight, std=config.init_std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight)
            for module in head.modules():
                if isinstance(module, MultiscaleDeformableAttention):
                    module.reset_parameters()
                elif isinstance(module, MaskedAttentionDecoderLayer):
                    for param in module.parameters():
                        if param.dim() > 1:
                            nn.init.xavier_uniform_(param, gain=config.init_xavier_std)
                elif isinstance(module, MaskedCrossAttention):
                    nn.init.zeros_(module.in_proj_bias)
                elif isinstance(module, MLPPredictionHead):
                    for linear in module.modules():
                        if isinstance(linear, nn.Linear):
                            linear.reset_parameters()
        nn.init.normal_(self.model.pixel_level_module.decoder.level_embed)
        for projection in self.model.transformer_module.input_projections:
            if isinstance(projection, nn.Conv2d):
                nn.init.xavier_uniform_(projection.weight, gain=config.init_xavier_std)
                nn.init.zeros_(projection.bias)
