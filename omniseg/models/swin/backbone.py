"""The Swin Transformer backbone of Mask2Former / MaskFormer checkpoints.

State-dict keys and shapes are those of the hub checkpoints (what the reference
``transformers.SwinBackbone`` writes with ``save_pretrained``, and what published
Mask2Former checkpoints hold under ``model.pixel_level_module.encoder.``)::

    embeddings.patch_embeddings.projection.{weight,bias}
    embeddings.norm.{weight,bias}
    embeddings.position_embeddings                       (use_absolute_embeddings only)
    encoder.layers.<s>.blocks.<b>.layernorm_before.{weight,bias}
    encoder.layers.<s>.blocks.<b>.attention.self.{query,key,value}.{weight,bias}
    encoder.layers.<s>.blocks.<b>.attention.self.relative_position_bias_table
    encoder.layers.<s>.blocks.<b>.attention.output.dense.{weight,bias}
    encoder.layers.<s>.blocks.<b>.layernorm_after.{weight,bias}
    encoder.layers.<s>.blocks.<b>.intermediate.dense.{weight,bias}
    encoder.layers.<s>.blocks.<b>.output.dense.{weight,bias}
    encoder.layers.<s>.downsample.{norm.weight,norm.bias,reduction.weight}
    hidden_states_norms.<stage>.{weight,bias}

Checkpoints may also hold tensors this module does not use; see :data:`IGNORE_ON_LOAD`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models.swin.blocks import SwinStage
from omniseg.models.swin.config import SwinConfig

IGNORE_ON_LOAD: tuple[str, ...] = (
    # Published checkpoints (saved by older reference versions) store this index buffer;
    # it depends only on the window size, so it is rebuilt, never loaded.
    "attention.self.relative_position_index",
    # The reference backbone carries the final LayerNorm of its classification model and
    # saves it, but never uses it for feature maps (published Mask2Former checkpoints lack it).
    "swin.layernorm.weight",
    "swin.layernorm.bias",
)
"""Suffixes of checkpoint tensor names that :class:`SwinBackbone` has no place for and
ignores on load (``omniseg.models.base.PretrainedModel.ignore_on_load`` format)."""


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


class SwinPatchEmbeddings(nn.Module):
    """Non-overlapping ``patch x patch`` convolution. Checkpoint name: ``projection``."""

    def __init__(self, *, num_channels: int, embed_dim: int, patch_size: tuple[int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(
            num_channels, embed_dim, kernel_size=patch_size, stride=patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, C, ceil(H/p), ceil(W/p)]`` (zero-padded bottom/right)."""
        height, width = pixel_values.shape[-2:]
        pad_h = -height % self.patch_size[0]
        pad_w = -width % self.patch_size[1]
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        return self.projection(pixel_values)


class SwinEmbeddings(nn.Module):
    """Patch embedding, LayerNorm, optional absolute position embedding, dropout."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        patch_size = _pair(config.patch_size)
        image_size = _pair(config.image_size)
        self.patch_embeddings = SwinPatchEmbeddings(
            num_channels=config.num_channels, embed_dim=config.embed_dim, patch_size=patch_size
        )
        # The reference uses LayerNorm's default eps here, not config.layer_norm_eps.
        self.norm = nn.LayerNorm(config.embed_dim)
        if config.use_absolute_embeddings:
            num_patches = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
            self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches, config.embed_dim))
        else:
            self.position_embeddings = None
        dropout = config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> channels-last tokens ``[B, ceil(H/p), ceil(W/p), C]``."""
        embeddings = self.norm(self.patch_embeddings(pixel_values).permute(0, 2, 3, 1))
        if self.position_embeddings is not None:
            batch, height, width, channels = embeddings.shape
            num_positions = self.position_embeddings.shape[1]
            if height * width != num_positions:
                # The reference adds the table as is (no interpolation) and fails the same way.
                raise ValueError(
                    f"absolute position embeddings cover {num_positions} patches but the input "
                    f"gives {height}x{width}; use images of the configured image_size"
                )
            embeddings = embeddings + self.position_embeddings.view(1, height, width, channels)
        return self.dropout(embeddings)


class SwinEncoder(nn.Module):
    """The stages. Checkpoint name: ``layers.<s>``."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        depths = config.depths
        total = sum(depths)
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks.
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList(
            SwinStage(
                int(config.embed_dim * 2**stage),
                depth=depths[stage],
                num_heads=config.num_heads[stage],
                window_size=config.window_size,
                drop_path=rates[sum(depths[:stage]) : sum(depths[: stage + 1])],
                downsample=stage < len(depths) - 1,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                hidden_act=config.hidden_act,
                layer_norm_eps=config.layer_norm_eps,
                hidden_dropout=config.hidden_dropout_prob,
                attention_dropout=config.attention_probs_dropout_prob,
            )
            for stage in range(len(depths))
        )


class SwinBackbone(nn.Module):
    """Swin Transformer returning the feature maps of ``config.out_features``.

    Example::

        backbone = SwinBackbone(SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"]))
        maps = backbone(pixel_values)  # [B, 96, H/4, W/4], [B, 192, H/8, W/8], ...

    Any input size works: the image is zero-padded to whole patches, each block's map to
    whole windows, and odd maps before patch merging, exactly as in the reference.
    """

    ignore_on_load: tuple[str, ...] = IGNORE_ON_LOAD

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        self.out_features = list(config.out_features)
        stage_channels = config.stage_channels
        self.channels = [stage_channels[name] for name in self.out_features]
        self.embeddings = SwinEmbeddings(config)
        self.encoder = SwinEncoder(config)
        # One LayerNorm per returned stage; default eps, as in the reference.
        self.hidden_states_norms = nn.ModuleDict(
            {name: nn.LayerNorm(stage_channels[name]) for name in self.out_features}
        )
        # Stages after the last requested one need not run (their weights still load).
        self._last_stage = max(config.stage_names.index(name) for name in self.out_features)

    def forward(
        self, pixel_values: torch.Tensor, *, always_partition: bool = True
    ) -> list[torch.Tensor]:
        """Args:
            pixel_values: ``[B, num_channels, H, W]``.
            always_partition: keep the configured window at every stage (the reference
                backbone's behaviour, and Mask2Former's). False clamps the window to maps no
                larger than it, as the reference ``SwinModel`` does.

        Returns:
            One ``[B, C_i, H_i, W_i]`` map (channels-last memory) per name in
            ``config.out_features``, in that order, after its ``hidden_states_norms``
            LayerNorm. ``stem`` is
            ``ceil(H/patch)`` high; each later stage halves (rounding up).
        """
        features = self.embeddings(pixel_values)
        maps = []
        if "stem" in self.hidden_states_norms:
            maps.append(self._to_map("stem", features))
        for index, stage in enumerate(self.encoder.layers, start=1):
            if index > self._last_stage:
                break
            output, features = stage(features, always_partition=always_partition)
            name = f"stage{index}"
            if name in self.hidden_states_norms:
                maps.append(self._to_map(name, output))
        return maps

    def _to_map(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """Normalise ``[B, H, W, C]`` and return it as ``[B, C, H, W]`` in channels-last
        memory (a permuted view: the pixel decoder works channels-last)."""
        return self.hidden_states_norms[name](features).permute(0, 3, 1, 2)
