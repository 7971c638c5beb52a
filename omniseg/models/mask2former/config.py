"""Configuration of Mask2Former, as stored in a hub ``config.json``.

Field names and defaults are the reference implementation's (``transformers.Mask2FormerConfig``),
so a config omniseg writes loads there unchanged and vice versa. The backbone's own config
is nested under ``backbone_config``; omniseg implements the Swin backbone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omniseg.models.config import ModelConfig
from omniseg.models.swin import SwinConfig, pop_swin_backbone

# The reference's backbone when ``backbone_config`` is missing (Swin-B-like, 4 stages out).
_DEFAULT_BACKBONE = {
    "model_type": "swin",
    "depths": [2, 2, 18, 2],
    "drop_path_rate": 0.3,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}


@dataclasses.dataclass
class Mask2FormerConfig(ModelConfig):
    """Hyper-parameters of Mask2Former (backbone, pixel decoder, transformer decoder, loss).

    The loss fields (``no_object_weight``, ``class_weight``, ``mask_weight``, ``dice_weight``,
    ``train_num_points``, ``oversample_ratio``, ``importance_sample_ratio``,
    ``use_auxiliary_loss``) and the init fields (``init_std``, ``init_xavier_std``) are
    read by training, not by inference.
    """

    model_type = "mask2former"

    backbone_config: SwinConfig = dataclasses.field(
        default_factory=lambda: SwinConfig.from_dict(_DEFAULT_BACKBONE)
    )
    feature_size: int = 256
    mask_feature_size: int = 256
    hidden_dim: int = 256
    encoder_feedforward_dim: int = 1024
    activation_function: str = "relu"
    encoder_layers: int = 6
    decoder_layers: int = 10
    num_attention_heads: int = 8
    dropout: float = 0.0
    dim_feedforward: int = 2048
    pre_norm: bool = False
    enforce_input_projection: bool = False
    common_stride: int = 4
    ignore_value: int = 255
    num_queries: int = 100
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    use_auxiliary_loss: bool = True
    feature_strides: list[int] = dataclasses.field(default_factory=lambda: [4, 8, 16, 32])
    output_auxiliary_logits: bool | None = None

    def __post_init__(self) -> None:
        self.feature_strides = list(self.feature_strides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Mask2FormerConfig":
        """Parse a ``config.json`` dict; raises :class:`UnsupportedModelError` for a backbone
        omniseg does not implement (anything but Swin, or a timm / by-name backbone)."""
        data = dict(data)
        backbone = pop_swin_backbone(data, "Mask2Former", _DEFAULT_BACKBONE)
        config = super().from_dict(data)
        config.backbone_config = SwinConfig.from_dict(backbone)
        return config
