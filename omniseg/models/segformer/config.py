"""SegFormer configuration: the keys of a SegFormer checkpoint's ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from omniseg.models.config import ModelConfig

# Per-stage list fields; each must have one entry per encoder block.
STAGE_FIELDS = (
    "depths",
    "sr_ratios",
    "hidden_sizes",
    "patch_sizes",
    "strides",
    "num_attention_heads",
    "mlp_ratios",
)


def _stage_default(*values: int) -> Any:
    return dataclasses.field(default_factory=lambda: list(values))


@dataclasses.dataclass
class SegformerConfig(ModelConfig):
    """Mix Transformer encoder plus all-MLP decode head (defaults: MiT-b0, as the reference).

    Per-stage fields (``depths`` ... ``mlp_ratios``) hold one value per encoder block.

    Notes:
        ``layer_norm_eps`` is carried for round-trips only: the reference builds every
        LayerNorm with PyTorch's default eps (1e-5), and so does omniseg.
        ``reshape_last_stage`` only changes the layout of the reference encoder's last
        hidden state; the segmentation logits do not depend on it, so omniseg keeps it
        for round-trips only.
    """

    model_type: ClassVar[str] = "segformer"

    num_channels: int = 3
    num_encoder_blocks: int = 4
    depths: list[int] = _stage_default(2, 2, 2, 2)
    sr_ratios: list[int] = _stage_default(8, 4, 2, 1)
    hidden_sizes: list[int] = _stage_default(32, 64, 160, 256)
    patch_sizes: list[int] = _stage_default(7, 3, 3, 3)
    strides: list[int] = _stage_default(4, 2, 2, 2)
    num_attention_heads: list[int] = _stage_default(1, 2, 5, 8)
    mlp_ratios: list[int] = _stage_default(4, 4, 4, 4)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    decoder_hidden_size: int = 256
    semantic_loss_ignore_index: int = 255
    reshape_last_stage: bool = True

    def __post_init__(self) -> None:
        for name in STAGE_FIELDS:
            value = list(getattr(self, name))
            if len(value) != self.num_encoder_blocks:
                raise ValueError(
                    f"SegformerConfig.{name} has {len(value)} entries, "
                    f"expected num_encoder_blocks={self.num_encoder_blocks}"
                )
            setattr(self, name, value)
        for hidden, heads in zip(self.hidden_sizes, self.num_attention_heads):
            if hidden % heads:
                raise ValueError(
                    f"SegformerConfig: hidden size {hidden} is not divisible by {heads} heads"
                )
        if not self.id2label:
            # The reference's default is two generic labels; honour an explicit num_labels.
            count = int(self.extra.pop("num_labels", 2))
            self.id2label = {i: f"LABEL_{i}" for i in range(count)}
        else:
            self.extra.pop("num_labels", None)
