"""Configuration of DETR for panoptic segmentation, as stored in a hub ``config.json``.

Field names and defaults are the reference implementation's (``transformers.DetrConfig``), so a
config omniseg writes loads there unchanged and vice versa. The decoder settings are the ones
MaskFormer's DETR decoder reads (:class:`MaskFormerDecoderConfig`, the same decoder); DETR adds
the encoder and the backbone.

The backbone is described in one of three ways, all kept as written:

* ``backbone_config: {"model_type": "resnet", ...}`` (the reference's ResNet,
  ``use_timm_backbone: false``): depths and widths read from it;
* ``backbone_config: {"model_type": "timm_backbone", "backbone": "resnet50", ...}``;
* no ``backbone_config``, ``use_timm_backbone`` true (the default) and ``backbone`` naming
  the timm model (the hub's DETR checkpoints).

Both timm forms store the backbone's weights under timm's names (see
:mod:`omniseg.models.detr.backbone`); omniseg builds the same ResNet for all three.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omniseg.errors import UnsupportedModelError
from omniseg.models.maskformer.config import MaskFormerDecoderConfig

# timm ResNets with DETR's bottleneck layout (plain stem, stride on the 3x3 conv): depths.
_TIMM_RESNET_DEPTHS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3], "resnet152": [3, 8, 36, 3]}
_ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]


@dataclasses.dataclass
class ResNetConfig:
    """The shape of a bottleneck ResNet (derived from the checkpoint's backbone settings)."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 512, 1024, 2048])
    depths: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 6, 3])
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False


@dataclasses.dataclass
class DetrConfig(MaskFormerDecoderConfig):
    """Hyper-parameters of ``DetrForSegmentation``.

    ``backbone_config`` is kept as the checkpoint wrote it (a dict, or ``None``);
    :attr:`resnet` is the ResNet it describes and :attr:`timm_layout` whether the weights use
    timm's names. The loss settings (``*_cost``, ``*_loss_coefficient``, ``eos_coefficient``)
    stay in ``extra``: omniseg does not train DETR.
    """

    model_type = "detr"

    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    num_channels: int = 3
    position_embedding_type: str = "sine"
    dilation: bool = False
    use_timm_backbone: bool = True
    backbone: str | None = None
    backbone_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.position_embedding_type != "sine":
            raise UnsupportedModelError(
                "position_embedding_type",
                f"DETR with {self.position_embedding_type!r} position embeddings is not supported (only 'sine')",
            )
        if self.dilation:
            raise UnsupportedModelError("dilation", "DETR with a dilated last stage (DC5) is not supported")
        if (self.d_model + self.encoder_attention_heads) % 8:
            raise UnsupportedModelError(
                "d_model", "DETR's mask head needs d_model + encoder_attention_heads divisible by 8"
            )
        self.resnet, self.timm_layout = _resnet_of(self)


def _resnet_of(config: DetrConfig) -> tuple[ResNetConfig, bool]:
    """The ResNet a DETR config describes, and whether its weights use timm's names."""
    raw = config.backbone_config
    if raw is None:
        if not config.use_timm_backbone:
            raise UnsupportedModelError(
                "backbone_config",
                "DETR without use_timm_backbone needs a backbone_config with all four ResNet stages",
            )
        raw = {"model_type": "timm_backbone", "backbone": config.backbone or "resnet50"}
    kind = raw.get("model_type")
    if kind == "timm_backbone":
        name = raw.get("backbone") or "resnet50"
        depths = _TIMM_RESNET_DEPTHS.get(name)
        if depths is None:
            supported = ", ".join(sorted(_TIMM_RESNET_DEPTHS))
            raise UnsupportedModelError("backbone", f"timm backbone {name!r} is not supported (supported: {supported})")
        out_indices = list(raw.get("out_indices") or [1, 2, 3, 4])
        if out_indices != [1, 2, 3, 4] or (raw.get("output_stride") or 32) != 32:
            raise UnsupportedModelError(
                "backbone_config", "DETR segmentation needs the four ResNet stages at strides 4-32 (out_indices 1-4)"
            )
        return ResNetConfig(num_channels=int(raw.get("num_channels", config.num_channels)), depths=depths), True
    if kind == "resnet":
        if raw.get("layer_type", "bottleneck") != "bottleneck" or raw.get("hidden_act", "relu") != "relu":
            raise UnsupportedModelError(
                "backbone_config", "only bottleneck ResNets with ReLU are supported as DETR backbones"
            )
        out_features = raw.get("out_features")
        if out_features is None and raw.get("out_indices") is not None:
            out_features = [f"stage{i}" for i in raw["out_indices"]]
        if list(out_features or []) != _ALL_STAGES:
            raise UnsupportedModelError(
                "backbone_config", f"DETR segmentation needs out_features {_ALL_STAGES}, got {out_features}"
            )
        defaults = ResNetConfig()
        resnet = ResNetConfig(
            num_channels=int(raw.get("num_channels", defaults.num_channels)),
            embedding_size=int(raw.get("embedding_size", defaults.embedding_size)),
            hidden_sizes=[int(v) for v in raw.get("hidden_sizes", defaults.hidden_sizes)],
            depths=[int(v) for v in raw.get("depths", defaults.depths)],
            downsample_in_first_stage=bool(raw.get("downsample_in_first_stage", False)),
            downsample_in_bottleneck=bool(raw.get("downsample_in_bottleneck", False)),
        )
        if len(resnet.depths) != 4 or len(resnet.hidden_sizes) != 4:
            raise UnsupportedModelError("backbone_config", "DETR segmentation needs a four-stage ResNet")
        return resnet, False
    raise UnsupportedModelError(
        "backbone_config", f"DETR backbone {kind!r} is not supported (a ResNet: 'resnet' or 'timm_backbone')"
    )
