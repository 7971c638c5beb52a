"""OneFormer for universal (semantic, instance, panoptic) segmentation, conditioned on a task.

``pixel_values`` -> Swin backbone -> Mask2Former's pixel decoder (deformable encoder, FPN,
stride-4 mask features); ``task_inputs`` (the tokenized "the task is {subtask}") -> task MLP
-> task token. The query transformer turns the task token into ``num_queries - 1`` object
queries (attending to the mask features); with the task token appended they go through
Mask2Former's masked-attention decoder; per query: class logits (``num_labels`` + "no
object") and mask logits at stride 4.

Checkpoint keys are the hub's (``model.pixel_level_module.*``, ``model.transformer_module.*``,
``model.task_encoder.*``, ``model.text_mapper.*``). Inside ``model.transformer_module.decoder``
the reused Mask2Former decoder layers name their parts differently; :data:`DECODER_RENAMES`
maps them both ways on load and save, so ``state_dict()`` always has the hub's names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from omniseg.models.base import PretrainedModel
from omniseg.models.mask2former.pixel_decoder import (
    NUM_ATTENTION_LEVELS,
    Mask2FormerPixelDecoder,
    sine_position_embedding,
)
from omniseg.models.mask2former.transformer_decoder import MaskedAttentionDecoder, MLPPredictionHead
from omniseg.models.oneformer.config import OneFormerConfig
from omniseg.models.oneformer.query_transformer import QueryTransformer
from omniseg.models.oneformer.text_mapper import OneFormerTextMapper
from omniseg.models.swin import IGNORE_ON_LOAD as SWIN_IGNORE_ON_LOAD
from omniseg.models.swin import SwinBackbone
from omniseg.ops.linear import Linear, linear

# (hub name, omniseg module name) under ``model.transformer_module.decoder.``; ``{i}`` is a
# layer number. The first rule that matches a name applies.
DECODER_RENAMES: tuple[tuple[str, str], ...] = (
    ("layers.{i}.cross_attn.multihead_attn.", "layers.{i}.cross_attn."),
    ("layers.{i}.cross_attn.norm.", "layers.{i}.cross_attn_layer_norm."),
    ("layers.{i}.self_attn.self_attn.", "layers.{i}.self_attn."),
    ("layers.{i}.self_attn.norm.", "layers.{i}.self_attn_layer_norm."),
    ("layers.{i}.ffn.linear1.", "layers.{i}.fc1."),
    ("layers.{i}.ffn.linear2.", "layers.{i}.fc2."),
    ("layers.{i}.ffn.norm.", "layers.{i}.final_layer_norm."),
    ("decoder_norm.", "layernorm."),
    ("mask_embed.layers.", "mask_predictor.mask_embedder."),
)

TEXT_MAPPER_PREFIX = "model.text_mapper."
LOGIT_SCALE = "criterion.logit_scale"


@dataclasses.dataclass
class OneFormerOutput:
    """What :class:`OneFormerForUniversalSegmentation` returns.

    Attributes:
        class_queries_logits: ``[B, Q, num_labels + 1]``; the last class is "no object".
        masks_queries_logits: ``[B, Q, H / 4, W / 4]`` for ``pixel_values`` of ``[B, 3, H, W]``.
        task_token: ``[B, hidden_dim]``, the task MLP's output (before the task norm).
        auxiliary_logits: when requested, one dict per intermediate prediction (the initial
            queries', then every decoder layer's but the last), with the same two keys.
    """

    class_queries_logits: Tensor
    masks_queries_logits: Tensor
    task_token: Tensor
    auxiliary_logits: list[dict[str, Tensor]] | None = None


class _Renamer:
    """Rewrites state-dict keys below a module's prefix by ordered ``(from, to)`` templates."""

    def __init__(self, rules: tuple[tuple[str, str], ...]) -> None:
        self.rules = [
            (re.compile(re.escape(source).replace(r"\{i\}", r"(\d+)")), target.replace("{i}", r"\1"))
            for source, target in rules
        ]

    def apply(self, state: dict[str, Any], prefix: str) -> None:
        for key in [k for k in state if k.startswith(prefix)]:
            local = key[len(prefix) :]
            for pattern, target in self.rules:
                if pattern.match(local):
                    state[prefix + pattern.sub(target, local, count=1)] = state.pop(key)
                    break


_TO_MODULE = _Renamer(DECODER_RENAMES)
_TO_HUB = _Renamer(tuple((target, source) for source, target in DECODER_RENAMES))


def _set_layer_norm_eps(module: nn.Module, eps: float) -> None:
    """The reused Mask2Former modules use LayerNorm's default eps; OneFormer's is configured."""
    for layer in module.modules():
        if isinstance(layer, nn.LayerNorm):
            layer.eps = eps


class OneFormerPixelLevelModule(nn.Module):
    """Backbone (``encoder``) and Mask2Former's pixel decoder (``decoder``)."""

    def __init__(self, config: OneFormerConfig) -> None:
        super().__init__()
        self.encoder = SwinBackbone(config.backbone_config)
        self.decoder = Mask2FormerPixelDecoder(config.mask2former_view(), feature_channels=self.encoder.channels)
        _set_layer_norm_eps(self.decoder, config.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor], list[tuple[int, int]]]:
        """See :meth:`Mask2FormerPixelDecoder.forward`."""
        return self.decoder(self.encoder(pixel_values))


class OneFormerTransformerDecoder(MaskedAttentionDecoder):
    """Mask2Former's masked-attention decoder (``layers``, ``layernorm`` = the hub's
    ``decoder_norm``, ``mask_predictor`` = ``mask_embed``) plus the parts the hub layout keeps
    beside it: ``query_transformer``, ``query_input_projection`` (conv 1x1 on the mask
    features, the query transformer's keys) and ``class_embed``."""

    def __init__(self, config: OneFormerConfig) -> None:
        super().__init__(config.mask2former_view())
        dim = config.hidden_dim
        self.query_transformer = QueryTransformer(
            dim=dim,
            num_heads=config.num_attention_heads,
            dim_feedforward=config.dim_feedforward,
            num_layers=config.query_dec_layers,
            pre_norm=config.pre_norm,
            eps=config.layer_norm_eps,
        )
        self.query_input_projection = nn.Conv2d(config.conv_dim, dim, kernel_size=1)
        self.class_embed = Linear(dim, config.num_labels + 1)
        _set_layer_norm_eps(self, config.layer_norm_eps)
        self.register_state_dict_post_hook(_hub_names)
        self.register_load_state_dict_pre_hook(_module_names)


def _hub_names(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    _TO_HUB.apply(state, prefix)


def _module_names(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    _TO_MODULE.apply(state, prefix)


class OneFormerTransformerModule(nn.Module):
    """Query positions, level embeddings and the decoder.

    Checkpoint names: ``queries_embedder``, ``level_embed``, ``decoder``. (The features reach
    the decoder unprojected: the configuration refuses the widths that would need the
    reference's input projections, which it never saves.)
    """

    def __init__(self, config: OneFormerConfig) -> None:
        super().__init__()
        dim = config.hidden_dim
        self.use_task_norm = config.use_task_norm
        self.position_features = dim // 2
        self.queries_embedder = nn.Embedding(config.num_queries, dim)
        self.decoder = OneFormerTransformerDecoder(config)
        self.level_embed = nn.Embedding(NUM_ATTENTION_LEVELS, dim)

    def forward(
        self,
        task_token: Tensor,
        multi_scale_features: list[Tensor],
        spatial_shapes: list[tuple[int, int]],
        pixel_features: Tensor,
        mask_projection: nn.Conv2d,
        intermediate_masks: bool,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            task_token: ``[B, C]``.
            multi_scale_features: per level ``[B, h_l * w_l, hidden_dim]``, lowest resolution first.
            spatial_shapes: per level ``(h_l, w_l)``.
            pixel_features: ``[B, conv_dim, H, W]`` (stride 4; the mask features are their
                ``mask_projection``).
            mask_projection: the pixel decoder's 1x1 conv to the mask features.
            intermediate_masks: also compute every intermediate prediction's full-size masks.

        Returns:
            See :meth:`MaskedAttentionDecoder.forward` (``num_queries`` queries: the object
            queries, then the task token).
        """
        decoder = self.decoder
        if self.use_task_norm:
            task_token = decoder.layernorm(task_token)
        features, positions = [], []
        for level, (sequence, (height, width)) in enumerate(zip(multi_scale_features, spatial_shapes)):
            features.append(sequence + self.level_embed.weight[level])
            positions.append(
                sine_position_embedding(
                    height, width, self.position_features, device=sequence.device, dtype=sequence.dtype
                )
            )

        batch, _, height, width = pixel_features.shape
        mask_features = mask_projection(pixel_features).permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        keys = linear(mask_features, decoder.query_input_projection.weight.flatten(1), decoder.query_input_projection.bias)
        memory = sine_position_embedding(
            height, width, self.position_features, device=keys.device, dtype=keys.dtype
        )
        initial = task_token if self.use_task_norm else torch.zeros_like(task_token)
        object_queries = decoder.query_transformer(
            initial, self.queries_embedder.weight[:-1], memory, keys.add_(memory)
        )
        queries = torch.cat([object_queries, task_token[:, None]], dim=1)
        return decoder(
            queries,
            self.queries_embedder.weight,
            features,
            positions,
            spatial_shapes,
            pixel_features,
            mask_projection,
            intermediate_masks=intermediate_masks,
        )


class OneFormerTaskModel(nn.Module):
    """``task_mlp``: a 2-layer MLP from the ``task_seq_len`` token ids to the task token."""

    def __init__(self, config: OneFormerConfig) -> None:
        super().__init__()
        self.task_mlp = _ReferenceMLP(config.task_seq_len, config.hidden_dim, 2)

    def forward(self, task_inputs: Tensor) -> Tensor:
        """``[B, task_seq_len]`` token ids -> ``[B, hidden_dim]``."""
        return self.task_mlp.layers(task_inputs.to(next(self.parameters()).dtype))


class _ReferenceMLP(nn.Module):
    """An MLP under ``layers`` (the reference's ``OneFormerMLPPredictionHead`` nesting)."""

    def __init__(self, input_dim: int, hidden_dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = MLPPredictionHead(input_dim, hidden_dim, hidden_dim, num_layers)


class OneFormerModel(nn.Module):
    """Checkpoint prefix ``model``: pixel-level module, transformer module, task encoder and,
    where the checkpoint has one, the training-only text mapper."""

    def __init__(self, config: OneFormerConfig, *, with_text_mapper: bool) -> None:
        super().__init__()
        self.pixel_level_module = OneFormerPixelLevelModule(config)
        self.transformer_module = OneFormerTransformerModule(config)
        self.task_encoder = OneFormerTaskModel(config)
        if with_text_mapper:
            self.text_mapper = OneFormerTextMapper(config)


class OneFormerLossTensors(nn.Module):
    """``logit_scale``: the contrastive loss's learned temperature (a trained parameter of the
    reference's loss, saved in its checkpoints; held here so it round-trips). float64, as the
    reference makes it."""

    def __init__(self, config: OneFormerConfig) -> None:
        super().__init__()
        initial = torch.tensor(1 / config.contrastive_temperature, dtype=torch.float64).log()
        self.logit_scale = nn.Parameter(initial)


class OneFormerForUniversalSegmentation(PretrainedModel):
    """OneFormer; loads and saves hub ``OneFormerForUniversalSegmentation`` checkpoints.

    Example::

        model = OneFormerForUniversalSegmentation.from_pretrained(path)
        inputs = load_processor(path)(images, task_inputs=["semantic"])
        with torch.inference_mode():
            out = model(**inputs)  # out.class_queries_logits, out.masks_queries_logits

    Args:
        config: the model's settings.
        with_text_mapper: build the training-only text mapper (to hold its weights); by
            default when ``config.is_training``, as the reference does. Loading builds it
            whenever the checkpoint has its tensors.
        with_logit_scale: hold the loss's ``criterion.logit_scale`` (the reference always
            saves it; loading holds it where the checkpoint has it).
    """

    config_class = OneFormerConfig
    architecture = "OneFormerForUniversalSegmentation"
    # The criterion's class weights are derived from the config.
    ignore_on_load = SWIN_IGNORE_ON_LOAD + ("criterion.empty_weight",)

    config: OneFormerConfig

    def __init__(
        self, config: OneFormerConfig, *, with_text_mapper: bool | None = None, with_logit_scale: bool = True
    ) -> None:
        super().__init__(config)
        if with_text_mapper is None:
            with_text_mapper = config.is_training
        self.model = OneFormerModel(config, with_text_mapper=with_text_mapper)
        if with_logit_scale:
            self.criterion = OneFormerLossTensors(config)

    @classmethod
    def for_checkpoint(cls, config: OneFormerConfig, state: Mapping[str, Tensor]) -> "OneFormerForUniversalSegmentation":
        """The text mapper and the loss's logit scale exist where the checkpoint has their
        tensors (hub checkpoints carry the text mapper with ``is_training`` off)."""
        carries_text_mapper = any(name.startswith(TEXT_MAPPER_PREFIX) for name in state)
        return cls(
            config,
            with_text_mapper=carries_text_mapper or config.is_training,
            with_logit_scale=LOGIT_SCALE in state,
        )

    def forward(
        self,
        pixel_values: Tensor,
        task_inputs: Tensor,
        pixel_mask: Tensor | None = None,
        output_auxiliary_logits: bool = False,
    ) -> OneFormerOutput:
        """
        Args:
            pixel_values: ``[B, 3, H, W]`` normalised images (padded to a common size).
            task_inputs: ``[B, task_seq_len]`` token ids of "the task is {subtask}" (see the
                processor).
            pixel_mask: ``[B, H, W]``; accepted for API compatibility and ignored (the
                reference ignores it too).
            output_auxiliary_logits: also return the intermediate predictions. Off by default
                (the reference's config turns them on): without them the decoder takes the
                low-resolution path for the intermediate masks, most of its time otherwise.

        Returns:
            :class:`OneFormerOutput`.
        """
        del pixel_mask  # see the docstring
        length = self.config.task_seq_len
        if task_inputs.ndim != 2 or task_inputs.shape[1] != length:
            # Else oneDNN's "could not create a primitive descriptor for the inner product
            # forward propagation primitive" from the task MLP, naming nothing.
            raise ValueError(
                f"task_inputs must be [batch, task_seq_len] = [B, {length}] token ids for this model "
                f"(config.json task_seq_len), got shape {list(task_inputs.shape)}; prepare them with "
                f"processor(images, task_inputs=..., task_seq_length={length})"
            )
        model = self.model
        pixel_features, multi_scale, spatial_shapes = model.pixel_level_module(pixel_values)
        task_token = model.task_encoder(task_inputs)
        states, masks = model.transformer_module(
            task_token,
            multi_scale,
            spatial_shapes,
            pixel_features,
            model.pixel_level_module.decoder.mask_projection,
            intermediate_masks=output_auxiliary_logits or self.training,
        )
        class_embed = model.transformer_module.decoder.class_embed
        auxiliary = None
        if output_auxiliary_logits:
            auxiliary = [
                {"class_queries_logits": class_embed(state), "masks_queries_logits": mask}
                for state, mask in zip(states[:-1], masks[:-1])
            ]
        return OneFormerOutput(
            class_queries_logits=class_embed(states[-1]),
            masks_queries_logits=masks[-1],
            task_token=task_token,
            auxiliary_logits=auxiliary,
        )

    def reference_only_tensors(self) -> dict[str, Tensor]:
        # The reference keeps its loss's class weights as a saved tensor (and its logit
        # scale, at its initial value where the loaded checkpoint had none), and its Swin
        # backbone has a final layer norm that feature maps never use.
        config = self.config
        empty_weight = torch.ones(config.num_labels + 1)
        empty_weight[-1] = config.no_object_weight
        width = config.backbone_config.hidden_size
        prefix = "model.pixel_level_module.encoder.swin.layernorm."
        tensors = {
            "criterion.empty_weight": empty_weight,
            prefix + "weight": torch.ones(width),
            prefix + "bias": torch.zeros(width),
        }
        if not hasattr(self, "criterion"):
            tensors[LOGIT_SCALE] = OneFormerLossTensors(config).logit_scale.detach()
        return tensors
