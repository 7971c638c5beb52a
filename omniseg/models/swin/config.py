"""Configuration of the Swin Transformer backbone, as stored in a hub ``config.json``.

Mask2Former / MaskFormer checkpoints keep this under ``backbone_config``. Field names and
defaults are the reference implementation's (``transformers.SwinConfig``), so a config we
write loads there unchanged and vice versa.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omniseg.errors import UnsupportedModelError
from omniseg.models.config import ModelConfig

# Keys the reference writes but derives from ``depths`` / ``embed_dim``: read back from a
# file they could be stale, so they are recomputed rather than kept in ``extra``.
_DERIVED_KEYS = ("stage_names", "num_layers", "hidden_size")


@dataclasses.dataclass
class SwinConfig(ModelConfig):
    """Hyper-parameters of a Swin backbone.

    ``out_features`` / ``out_indices`` select which stages the backbone returns; stage names
    are ``"stem"`` (the patch embeddings) then ``"stage1"`` ... ``"stageN"``. Either may be
    given; the other is derived, and with neither the last stage is returned (the
    reference's rule).
    """

    model_type = "swin"

    image_size: int | list[int] = 224
    patch_size: int | list[int] = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = dataclasses.field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    layer_norm_eps: float = 1e-5
    out_features: list[str] | None = None
    out_indices: list[int] | None = None

    def __post_init__(self) -> None:
        self.depths = list(self.depths)
        self.num_heads = list(self.num_heads)
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} "
                "must have one entry per stage"
            )
        for stage, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**stage
            if dim % heads:
                raise ValueError(
                    f"SwinConfig: stage {stage + 1} width {dim} is not divisible by its "
                    f"{heads} attention heads"
                )
        self._align_out_features()

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    @property
    def num_layers(self) -> int:
        return len(self.depths)

    @property
    def hidden_size(self) -> int:
        """Channels after the last stage."""
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @property
    def stage_channels(self) -> dict[str, int]:
        """Channels of every stage's feature map, by stage name."""
        widths = [self.embed_dim] + [int(self.embed_dim * 2**i) for i in range(len(self.depths))]
        return dict(zip(self.stage_names, widths))

    def _align_out_features(self) -> None:
        names = self.stage_names
        features = None if self.out_features is None else list(self.out_features)
        indices = None if self.out_indices is None else list(self.out_indices)
        if indices is not None:
            if any(not -len(names) <= i < len(names) for i in indices):
                raise ValueError(
                    f"SwinConfig: out_indices {indices} out of range for stages {names}"
                )
            from_indices = [names[i] for i in indices]
        if features is not None:
            unknown = [f for f in features if f not in names]
            if unknown:
                raise ValueError(f"SwinConfig: out_features {unknown} are not stages of {names}")
        if features is None and indices is None:
            features, indices = [names[-1]], [len(names) - 1]
        elif features is None:
            features = from_indices
        elif indices is None:
            indices = [names.index(f) for f in features]
        elif features != from_indices:
            raise ValueError(
                f"SwinConfig: out_features {features} and out_indices {indices} "
                "name different stages"
            )
        if len(set(features)) != len(features) or features != [n for n in names if n in features]:
            raise ValueError(
                f"SwinConfig: out_features {features} must be distinct and in stage order {names}"
            )
        self.out_features, self.out_indices = features, indices

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SwinConfig":
        # Older configs spell these with a leading underscore (the reference's attribute names).
        data = dict(data)
        for key in ("out_features", "out_indices"):
            if f"_{key}" in data:
                data.setdefault(key, data.pop(f"_{key}"))
        config = super().from_dict(data)
        for key in _DERIVED_KEYS:
            config.extra.pop(key, None)
        return config

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["stage_names"] = self.stage_names
        data["num_layers"] = self.num_layers
        data["hidden_size"] = self.hidden_size
        return data


def pop_swin_backbone(
    data: dict[str, Any],
    architecture: str,
    default: dict[str, Any],
    model_types: tuple[str, ...] = ("swin",),
) -> dict[str, Any]:
    """Remove and return the ``backbone_config`` dict of a model that omniseg builds on Swin.

    A missing ``backbone_config`` means the reference's ``default``, unless the config names
    a backbone to load by name or from timm instead: omniseg implements neither, nor a
    backbone whose ``model_type`` is not in ``model_types``; both raise
    :class:`UnsupportedModelError` naming ``architecture``.
    """
    backbone = data.pop("backbone_config", None)
    if backbone is None:
        if data.get("backbone") or data.get("use_timm_backbone"):
            raise UnsupportedModelError(
                "backbone_config",
                f"{architecture} with a backbone loaded by name ({data.get('backbone')!r}"
                f"{', from timm' if data.get('use_timm_backbone') else ''}) is not supported; "
                f"omniseg implements {architecture} with a Swin backbone given in backbone_config",
            )
        return default
    backbone_type = backbone.get("model_type")
    if backbone_type not in model_types:
        spelled = " or ".join(repr(name) for name in model_types)
        raise UnsupportedModelError(
            "backbone_config",
            f"{architecture} backbone {backbone_type!r} is not supported; "
            f"omniseg implements {architecture} with a Swin backbone (model_type {spelled})",
        )
    return backbone
