"""Configuration of MaskFormer, as stored in a hub ``config.json``.

Field names and defaults are the reference implementation's (``transformers.MaskFormerConfig``),
so a config omniseg writes loads there unchanged and vice versa. Two nested configs: the
Swin backbone's (``backbone_config``, model_type ``swin`` or ``maskformer-swin``) and the
DETR transformer decoder's (``decoder_config``, model_type ``detr``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omniseg.errors import UnsupportedModelError
from omniseg.models.config import ModelConfig
from omniseg.models.swin import SwinConfig, pop_swin_backbone

ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]

# The reference's backbone when ``backbone_config`` is missing (Swin-B, window 12).
_DEFAULT_BACKBONE = {
    "model_type": "swin",
    "depths": [2, 2, 18, 2],
    "drop_path_rate": 0.3,
    "image_size": 384,
    "embed_dim": 128,
    "num_heads": [4, 8, 16, 32],
    "window_size": 12,
    "out_features": ALL_STAGES,
}
_SWIN_TYPES = ("swin", "maskformer-swin")


@dataclasses.dataclass
class MaskFormerDecoderConfig(ModelConfig):
    """The DETR decoder settings MaskFormer reads from ``decoder_config`` (a full DETR config;
    the keys it does not read, such as DETR's own backbone, stay in ``extra``).

    ``auxiliary_loss`` changes inference too: every layer's output then goes through the
    final layer norm before the next layer, as in the reference.
    """

    model_type = "detr"

    d_model: int = 256
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    num_queries: int = 100
    auxiliary_loss: bool = False
    init_std: float = 0.02
    init_xavier_std: float = 1.0


@dataclasses.dataclass
class MaskFormerConfig(ModelConfig):
    """Hyper-parameters of MaskFormer (Swin backbone, FPN pixel decoder, DETR decoder, loss).

    The loss fields (``no_object_weight``, ``cross_entropy_weight``, ``mask_weight``,
    ``dice_weight``, ``use_auxiliary_loss``) and ``init_std`` / ``init_xavier_std`` are read
    by training, not by inference.
    """

    model_type = "maskformer"

    backbone_config: SwinConfig = dataclasses.field(
        default_factory=lambda: SwinConfig.from_dict(_DEFAULT_BACKBONE)
    )
    decoder_config: MaskFormerDecoderConfig = dataclasses.field(default_factory=MaskFormerDecoderConfig)
    fpn_feature_size: int = 256
    mask_feature_size: int = 256
    no_object_weight: float = 0.1
    use_auxiliary_loss: bool = False
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    dice_weight: float = 1.0
    cross_entropy_weight: float = 1.0
    mask_weight: float = 20.0
    output_auxiliary_logits: bool | None = None

    @property
    def hidden_dim(self) -> int:
        """Width of the queries (the decoder's ``d_model``)."""
        return self.decoder_config.d_model

    @property
    def num_queries(self) -> int:
        return self.decoder_config.num_queries

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MaskFormerConfig":
        """Parse a ``config.json`` dict; raises :class:`UnsupportedModelError` for a backbone
        omniseg does not implement for MaskFormer (anything but Swin) or decoder (not DETR)."""
        data = dict(data)
        decoder = data.pop("decoder_config", None)
        backbone = pop_swin_backbone(data, "MaskFormer", _DEFAULT_BACKBONE, _SWIN_TYPES)
        backbone_type = backbone["model_type"]
        backbone = dict(backbone, model_type="swin")
        if backbone_type == "swin":
            # The reference turns a plain Swin config into its MaskFormer variant with all
            # four stages out, whatever the config says.
            backbone["out_features"], backbone["out_indices"] = ALL_STAGES, None
            backbone.pop("_out_indices", None)
            backbone.pop("_out_features", None)
        if backbone.get("use_absolute_embeddings"):
            raise UnsupportedModelError(
                "backbone_config",
                "MaskFormer's Swin with absolute position embeddings is not supported",
            )
        decoder = {} if decoder is None else dict(decoder)
        if decoder.get("model_type", "detr") != "detr":
            raise UnsupportedModelError(
                "decoder_config",
                f"MaskFormer decoder {decoder.get('model_type')!r} is not supported (only 'detr')",
            )
        config = super().from_dict(data)
        config.backbone_config = SwinConfig.from_dict(backbone)
        if len(config.backbone_config.out_features) != len(ALL_STAGES):
            raise UnsupportedModelError(
                "backbone_config", "MaskFormer needs the backbone's four stages as out_features"
            )
        config.decoder_config = MaskFormerDecoderConfig.from_dict(decoder)
        return config
