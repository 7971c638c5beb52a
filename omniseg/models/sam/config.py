"""Segment Anything configuration: the keys of a ``SamModel`` checkpoint's ``config.json``.

The reference (``transformers.SamConfig``) nests three sub-configs, one per part of the
model: ``vision_config`` (the ViT image encoder), ``prompt_encoder_config`` and
``mask_decoder_config``. Field names and defaults are the reference's (sam-vit-huge's
shape for the vision encoder), so what omniseg saves loads there unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from omniseg.models.config import ModelConfig


@dataclasses.dataclass
class SamPartConfig(ModelConfig):
    """Base of the three nested sub-configs: they carry no labels of their own."""

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if not self.id2label:
            data.pop("id2label")
            data.pop("label2id")
        return data


@dataclasses.dataclass
class SamVisionConfig(SamPartConfig):
    """The ViT image encoder: ``image_size / patch_size`` square grid of tokens, windowed
    attention (``window_size``) except in the ``global_attn_indexes`` layers, and a neck
    projecting to ``output_channels``."""

    model_type: ClassVar[str] = "sam_vision_model"

    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: list[int] = dataclasses.field(default_factory=lambda: [2, 5, 8, 11])
    num_pos_feats: int = 128
    mlp_dim: int | None = None

    def __post_init__(self) -> None:
        if self.mlp_dim is None:
            self.mlp_dim = int(self.hidden_size * self.mlp_ratio)
        self.global_attn_indexes = [int(i) for i in self.global_attn_indexes]
        # Derived by the reference and written to its config.json: not an input.
        self.extra.pop("scale", None)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"SamVisionConfig: hidden_size {self.hidden_size} is not divisible by "
                f"{self.num_attention_heads} heads"
            )

    @property
    def grid_size(self) -> int:
        """Tokens per side of the encoder's grid (64 for the hub models)."""
        return self.image_size // self.patch_size

    @property
    def scale(self) -> int:
        """Standard deviation of the random-Fourier features' initialisation."""
        return self.hidden_size // 2

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["scale"] = self.scale
        return data


@dataclasses.dataclass
class SamPromptEncoderConfig(SamPartConfig):
    """Points, boxes and mask prompts to ``hidden_size`` embeddings."""

    model_type: ClassVar[str] = "sam_prompt_encoder"

    hidden_size: int = 256
    image_size: int = 1024
    patch_size: int = 16
    mask_input_channels: int = 16
    num_point_embeddings: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.extra.pop("image_embedding_size", None)

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["image_embedding_size"] = self.image_embedding_size
        return data


@dataclasses.dataclass
class SamMaskDecoderConfig(SamPartConfig):
    """The two-way transformer and the mask / IoU heads."""

    model_type: ClassVar[str] = "sam_mask_decoder"

    hidden_size: int = 256
    hidden_act: str = "relu"
    mlp_dim: int = 2048
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    layer_norm_eps: float = 1e-6


@dataclasses.dataclass
class SamConfig(ModelConfig):
    """Segment Anything: image encoder, prompt encoder, mask decoder (defaults: sam-vit-huge's
    shape, as the reference). ``from_dict`` reads the nested sub-config dictionaries."""

    model_type: ClassVar[str] = "sam"

    vision_config: SamVisionConfig = dataclasses.field(default_factory=SamVisionConfig)
    prompt_encoder_config: SamPromptEncoderConfig = dataclasses.field(default_factory=SamPromptEncoderConfig)
    mask_decoder_config: SamMaskDecoderConfig = dataclasses.field(default_factory=SamMaskDecoderConfig)
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamConfig":
        data = dict(data)
        parts = {
            "vision_config": SamVisionConfig,
            "prompt_encoder_config": SamPromptEncoderConfig,
            "mask_decoder_config": SamMaskDecoderConfig,
        }
        nested = {}
        for name, part in parts.items():
            value = data.pop(name, None)
            nested[name] = part.from_dict(dict(value or {}))
        config = super().from_dict(data)
        for name, value in nested.items():
            setattr(config, name, value)
        config.check()
        return config

    def check(self) -> None:
        """Raise ``ValueError`` when the parts do not fit together."""
        vision, prompt, decoder = self.vision_config, self.prompt_encoder_config, self.mask_decoder_config
        if vision.output_channels != prompt.hidden_size or prompt.hidden_size != decoder.hidden_size:
            raise ValueError(
                "SamConfig: vision_config.output_channels, prompt_encoder_config.hidden_size and "
                f"mask_decoder_config.hidden_size must be equal, got {vision.output_channels}, "
                f"{prompt.hidden_size}, {decoder.hidden_size}"
            )
        if vision.grid_size != prompt.image_embedding_size:
            raise ValueError(
                "SamConfig: the vision encoder's grid "
                f"({vision.image_size}/{vision.patch_size}) and the prompt encoder's "
                f"({prompt.image_size}/{prompt.patch_size}) differ"
            )
        if 2 * vision.num_pos_feats != decoder.hidden_size:
            raise ValueError(
                f"SamConfig: 2 * vision_config.num_pos_feats ({2 * vision.num_pos_feats}) must equal "
                f"the mask decoder's hidden_size ({decoder.hidden_size})"
            )
