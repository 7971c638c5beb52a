"""Configuration of OneFormer, as stored in a hub ``config.json``.

Field names and defaults are the reference implementation's (``transformers.OneFormerConfig``),
so a config omniseg writes loads there unchanged and vice versa. The Swin backbone's own
config is nested under ``backbone_config``.

OneFormer's pixel decoder and masked-attention decoder are Mask2Former's; only some settings
are spelled differently (``conv_dim`` for ``feature_size``, ``mask_dim`` for
``mask_feature_size``, ``strides`` for ``feature_strides``). :meth:`OneFormerConfig.mask2former_view`
gives the Mask2Former config those shared modules are built from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omniseg.errors import UnsupportedModelError
from omniseg.models.config import ModelConfig
from omniseg.models.mask2former.config import Mask2FormerConfig
from omniseg.models.swin import SwinConfig, pop_swin_backbone

# The reference's backbone when ``backbone_config`` is missing (Swin-T-like, 4 stages out).
_DEFAULT_BACKBONE = {
    "model_type": "swin",
    "drop_path_rate": 0.3,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}


@dataclasses.dataclass
class OneFormerConfig(ModelConfig):
    """Hyper-parameters of OneFormer (backbone, pixel decoder, task-conditioned decoder, text
    mapper, loss).

    Read by inference: the backbone, ``conv_dim``, ``mask_dim``, ``hidden_dim``,
    ``encoder_*``, ``decoder_layers``, ``query_dec_layers``, ``num_attention_heads``,
    ``dim_feedforward``, ``pre_norm``, ``enforce_input_proj``, ``common_stride``, ``strides``,
    ``num_queries``, ``task_seq_len``, ``use_task_norm``, ``layer_norm_eps``. The ``text_encoder_*``
    fields shape the text mapper (its weights are held, not run: it serves training only);
    the loss and init fields are kept for the reference.
    """

    model_type = "oneformer"

    backbone_config: SwinConfig = dataclasses.field(
        default_factory=lambda: SwinConfig.from_dict(_DEFAULT_BACKBONE)
    )
    ignore_value: int = 255
    num_queries: int = 150
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    contrastive_weight: float = 0.5
    contrastive_temperature: float = 0.07
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    layer_norm_eps: float = 1e-05
    is_training: bool = False
    use_auxiliary_loss: bool = True
    output_auxiliary_logits: bool = True
    strides: list[int] = dataclasses.field(default_factory=lambda: [4, 8, 16, 32])
    task_seq_len: int = 77
    text_encoder_width: int = 256
    text_encoder_context_length: int = 77
    text_encoder_num_layers: int = 6
    text_encoder_vocab_size: int = 49408
    text_encoder_proj_layers: int = 2
    text_encoder_n_ctx: int = 16
    conv_dim: int = 256
    mask_dim: int = 256
    hidden_dim: int = 256
    encoder_feedforward_dim: int = 1024
    norm: str = "GN"
    encoder_layers: int = 6
    decoder_layers: int = 10
    use_task_norm: bool = True
    num_attention_heads: int = 8
    dropout: float = 0.1
    dim_feedforward: int = 2048
    pre_norm: bool = False
    enforce_input_proj: bool = False
    query_dec_layers: int = 2
    common_stride: int = 4

    def __post_init__(self) -> None:
        self.strides = list(self.strides)

    def mask2former_view(self) -> Mask2FormerConfig:
        """The settings of the pixel decoder and masked-attention decoder under Mask2Former's
        names (the modules are Mask2Former's).

        Dropout is off: omniseg runs OneFormer for inference only (the reference's decoder
        layers never drop; its pixel decoder drops whenever ``is_training`` is set, even in
        eval mode, which makes such a model's answers random there).
        """
        return Mask2FormerConfig(
            backbone_config=self.backbone_config,
            feature_size=self.conv_dim,
            mask_feature_size=self.mask_dim,
            hidden_dim=self.hidden_dim,
            encoder_feedforward_dim=self.encoder_feedforward_dim,
            activation_function="relu",
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            num_attention_heads=self.num_attention_heads,
            dropout=0.0,
            dim_feedforward=self.dim_feedforward,
            pre_norm=self.pre_norm,
            enforce_input_projection=self.enforce_input_proj,
            common_stride=self.common_stride,
            num_queries=self.num_queries,
            feature_strides=self.strides,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OneFormerConfig":
        """Parse a ``config.json`` dict; raises :class:`UnsupportedModelError` for a backbone
        omniseg does not implement (anything but Swin, or a timm / by-name backbone), a
        normalisation other than group norm, or widths the reference cannot load either."""
        data = dict(data)
        backbone = pop_swin_backbone(data, "OneFormer", _DEFAULT_BACKBONE)
        config = super().from_dict(data)
        config.backbone_config = SwinConfig.from_dict(backbone)
        if config.norm != "GN":
            raise UnsupportedModelError("config", f"OneFormer norm {config.norm!r} is not supported (only 'GN')")
        if config.conv_dim != config.hidden_dim or config.enforce_input_proj:
            # The reference keeps the decoder's input projections in a plain list: never
            # saved, freshly random at every load, so no checkpoint can define them.
            raise UnsupportedModelError(
                "config",
                "OneFormer with decoder input projections (conv_dim != hidden_dim or enforce_input_proj) "
                f"is not supported: the reference does not save them (conv_dim {config.conv_dim}, "
                f"hidden_dim {config.hidden_dim})",
            )
        if config.mask_dim != config.conv_dim:
            # The query transformer projects the mask features with a conv_dim-input conv.
            raise UnsupportedModelError(
                "config", f"OneFormer needs mask_dim == conv_dim (got {config.mask_dim} and {config.conv_dim})"
            )
        return config
