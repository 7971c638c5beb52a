"""MaskFormer for universal (semantic, instance, panoptic) segmentation.

``pixel_values`` -> Swin backbone (4 maps, strides 4..32) -> FPN pixel decoder (stride-4 mask
features) and, from the stride-32 map, the DETR transformer decoder (learned queries) -> per
query: class logits (``num_labels`` + "no object") and a mask embedding, whose dot product with
the mask features gives its mask logits at stride 4.

Submodule names mirror the reference implementation, so ``state_dict`` keys are the hub
checkpoints' (``model.pixel_level_module.encoder.*`` backbone,
``model.pixel_level_module.decoder.*`` FPN, ``model.transformer_module.*`` decoder,
``class_predictor.*``, ``mask_embedder.*``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from omniseg.models.base import PretrainedModel
from omniseg.models.mask2former.transformer_decoder import MLPPredictionHead
from omniseg.models.maskformer.backbone import IGNORE_ON_LOAD as BACKBONE_IGNORE_ON_LOAD
from omniseg.models.maskformer.backbone import MaskFormerSwinBackbone
from omniseg.models.maskformer.config import MaskFormerConfig
from omniseg.models.maskformer.criterion import MaskFormerCriterion
from omniseg.models.maskformer.pixel_decoder import ConvNormReLU, FPNLayer, MaskFormerPixelDecoder
from omniseg.models.maskformer.transformer_decoder import MaskFormerTransformerModule
from omniseg.ops.linear import Linear


@dataclasses.dataclass
class MaskFormerOutput:
    """What :class:`MaskFormerForInstanceSegmentation` returns.

    Attributes:
        class_queries_logits: ``[B, Q, num_labels + 1]``; the last class is "no object".
        masks_queries_logits: ``[B, Q, H / 4, W / 4]`` for ``pixel_values`` of ``[B, 3, H, W]``.
        auxiliary_logits: with ``config.use_auxiliary_loss`` and when requested, one dict per
            intermediate prediction (see :meth:`MaskFormerForInstanceSegmentation.forward`).
        loss: the training loss, when targets are given (``None`` otherwise).
    """

    class_queries_logits: Tensor
    masks_queries_logits: Tensor
    auxiliary_logits: list[dict[str, Tensor]] | None = None
    loss: Tensor | None = None


class MaskFormerPixelLevelModule(nn.Module):
    """Backbone (``encoder``) and FPN pixel decoder (``decoder``)."""

    def __init__(self, config: MaskFormerConfig) -> None:
        super().__init__()
        self.encoder = MaskFormerSwinBackbone(config.backbone_config)
        self.decoder = MaskFormerPixelDecoder(
            feature_channels=self.encoder.channels,
            feature_size=config.fpn_feature_size,
            mask_feature_size=config.mask_feature_size,
        )

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` -> stride-32 backbone map ``[B, 8C, H/32, W/32]`` and mask
        features ``[B, M, H/4, W/4]``."""
        maps = self.encoder(pixel_values)
        return maps[-1], self.decoder(maps)


class MaskFormerModel(nn.Module):
    """Pixel-level module and transformer module (checkpoint prefix ``model``)."""

    def __init__(self, config: MaskFormerConfig) -> None:
        super().__init__()
        self.pixel_level_module = MaskFormerPixelLevelModule(config)
        self.transformer_module = MaskFormerTransformerModule(
            in_channels=self.pixel_level_module.encoder.channels[-1], config=config.decoder_config
        )

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """``[B, 3, H, W]`` -> final query states ``[B, Q, C]``, the decoder layers' inputs
        (each ``[B, Q, C]``) and the mask features ``[B, M, H/4, W/4]``."""
        image_features, mask_features = self.pixel_level_module(pixel_values)
        queries, layer_inputs = self.transformer_module(image_features)
        return queries, layer_inputs, mask_features


class MaskFormerForInstanceSegmentation(PretrainedModel):
    """MaskFormer with its class and mask heads; loads and saves hub
    ``MaskFormerForInstanceSegmentation`` checkpoints.

    Example::

        model = MaskFormerForInstanceSegmentation.from_pretrained(path)
        with torch.inference_mode():
            out = model(pixel_values)  # out.class_queries_logits, out.masks_queries_logits
    """

    config_class = MaskFormerConfig
    architecture = "MaskFormerForInstanceSegmentation"
    # The criterion's class weights are derived from the config (the reference saves them).
    ignore_on_load = BACKBONE_IGNORE_ON_LOAD + ("criterion.empty_weight",)

    config: MaskFormerConfig

    def __init__(self, config: MaskFormerConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_dim
        self.model = MaskFormerModel(config)
        self.class_predictor = Linear(hidden, config.num_labels + 1)
        self.mask_embedder = MLPPredictionHead(hidden, hidden, config.mask_feature_size)
        self.criterion = MaskFormerCriterion.from_config(config)
        self._init_weights()

    def forward(
        self,
        pixel_values: Tensor,
        pixel_mask: Tensor | None = None,
        output_auxiliary_logits: bool | None = None,
        mask_labels: list[Tensor] | None = None,
        class_labels: list[Tensor] | None = None,
    ) -> MaskFormerOutput:
        """
        Args:
            pixel_values: ``[B, 3, H, W]`` normalised images (padded to a common size).
            pixel_mask: ``[B, H, W]``; accepted for API compatibility and ignored, as by the
                reference (padding is seen as normalised zeros).
            output_auxiliary_logits: also return the intermediate predictions (only made
                with ``config.use_auxiliary_loss``); defaults to ``config.output_auxiliary_logits``.
            mask_labels: training targets, per image ``[T_i, H, W]`` binary masks; with
                ``class_labels`` the output carries ``loss``.
            class_labels: per image ``[T_i]`` class ids of ``mask_labels``.

        Returns:
            :class:`MaskFormerOutput`. With ``use_auxiliary_loss``, the intermediate
            predictions are the reference's: from the first decoder layer's input (zeros)
            and from every layer's output but the last, before the final LayerNorm.
        """
        del pixel_mask  # see the docstring
        if output_auxiliary_logits is None:
            output_auxiliary_logits = bool(self.config.output_auxiliary_logits)
        queries, layer_inputs, mask_features = self.model(pixel_values)
        states = [queries]
        if self.config.use_auxiliary_loss:
            states = layer_inputs + states
        stacked = torch.stack(states)  # [L, B, Q, C]
        classes = self.class_predictor(stacked)
        embeddings = self.mask_embedder(stacked)  # [L, B, Q, M]
        batch, channels, height, width = mask_features.shape
        masks = torch.matmul(embeddings, mask_features.reshape(batch, channels, height * width))
        masks = masks.view(*embeddings.shape[:3], height, width)  # [L, B, Q, h, w]
        auxiliary = [
            {"masks_queries_logits": mask, "class_queries_logits": cls}
            for mask, cls in zip(masks[:-1], classes[:-1])
        ]
        loss = None
        if mask_labels is not None and class_labels is not None:
            losses = self.criterion(classes[-1], masks[-1], mask_labels, class_labels, auxiliary=auxiliary or None)
            loss = sum(losses.values())
        return MaskFormerOutput(
            class_queries_logits=classes[-1],
            masks_queries_logits=masks[-1],
            auxiliary_logits=auxiliary if output_auxiliary_logits and self.config.use_auxiliary_loss else None,
            loss=loss,
        )

    def reference_only_tensors(self) -> dict[str, Tensor]:
        # The reference keeps the criterion's class weights and each Swin block's relative
        # position index as saved buffers, and its backbone the final LayerNorm of its
        # classification model (never used here).
        width = self.config.backbone_config.hidden_size
        prefix = "model.pixel_level_module.encoder.model."
        tensors = {
            "criterion.empty_weight": self.criterion.empty_weight,
            prefix + "layernorm.weight": torch.ones(width),
            prefix + "layernorm.bias": torch.zeros(width),
        }
        for name, buffer in self.model.pixel_level_module.encoder.model.named_buffers():
            if name.endswith("relative_position_index"):
                tensors[prefix + name] = buffer
        return tensors

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Training-from-scratch initialisation of everything but the backbone (which
        initialises itself), following the reference: N(0, init_std) linear weights, zero
        biases, N(0, init_std) embeddings, Xavier FPN convs, input projection and mask MLP."""
        config = self.config
        gain = config.init_xavier_std
        heads = [self.model.pixel_level_module.decoder, self.model.transformer_module, self.class_predictor]
        for head in heads:
            for module in head.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    nn.init.normal_(module.weight, std=config.init_std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, std=config.init_std)
                elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        fpn = self.model.pixel_level_module.decoder.fpn
        for module in fpn.modules():
            if isinstance(module, ConvNormReLU):
                nn.init.xavier_uniform_(module[0].weight, gain=gain)
            elif isinstance(module, FPNLayer):
                nn.init.xavier_uniform_(module.proj[0].weight, gain=gain)
        projection = self.model.transformer_module.input_projection
        if projection is not None:
            nn.init.xavier_uniform_(projection.weight, gain=gain)
            nn.init.zeros_(projection.bias)
        for module in self.mask_embedder.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=gain)
                nn.init.zeros_(module.bias)

