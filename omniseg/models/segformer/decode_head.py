"""SegFormer's all-MLP decode head.

As the reference computes it::

    for every stage i:  e_i = upsample(linear_c[i](x_i))      # [B, D, H/4, W/4]
    fused = linear_fuse(cat(e_{n-1}, ..., e_1, e_0))            # 1x1 conv, 4D -> D, no bias
    logits = classifier(dropout(relu(batch_norm(fused))))

The per-stage linear layer, the 1x1 fuse convolution and (in eval mode) the batch norm are
all affine in the channels, and bilinear upsampling is linear in space with weights that
sum to one, so they commute. omniseg therefore composes them into one ``C_i -> D`` matrix
per stage, applies it at the stage's own (low) resolution and upsamples only the ``D``
channel results, which are summed. This is the same function with the same parameters
(``state_dict`` keys identical to the reference's), at a fraction of the cost: the
``4D -> D`` fuse convolution at 1/4 resolution dominates the reference head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models.segformer.config import SegformerConfig
from omniseg.ops.linear import Linear, linear


class StageProjection(nn.Module):
    """Per-stage linear map ``C_i -> decoder_hidden_size`` (``linear_c[i].proj``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = Linear(in_features, out_features)


class SegformerDecodeHead(nn.Module):
    """Multi-stage tokens -> per-pixel class logits at the first stage's resolution.

    Input: per stage ``(tokens [B, H_i * W_i, C_i], H_i, W_i)``, first stage first.
    Output: ``logits [B, num_labels, H_0, W_0]``.
    """

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        hidden = config.decoder_hidden_size
        self.linear_c = nn.ModuleList(StageProjection(size, hidden) for size in config.hidden_sizes)
        self.linear_fuse = nn.Conv2d(hidden * config.num_encoder_blocks, hidden, kernel_size=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(hidden)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(hidden, config.num_labels, kernel_size=1)

    def _composed_projections(self) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
        """Per-stage ``[D, C_i]`` matrices equal to ``fuse_slice_i @ linear_c[i]`` and the
        summed bias ``[D]``; the batch norm is folded in when it uses running statistics.

        Returns ``(weights, bias, bn_folded)``.
        """
        hidden = self.linear_fuse.out_channels
        fuse = self.linear_fuse.weight.flatten(1)  # [D, n * D]
        count = len(self.linear_c)
        weights = []
        bias = fuse.new_zeros(hidden)
        for stage, projection in enumerate(self.linear_c):
            # The reference concatenates the stages last-first.
            block = fuse[:, (count - 1 - stage) * hidden : (count - stage) * hidden]
            weights.append(block @ projection.proj.weight)
            bias = bias + block @ projection.proj.bias
        bn = self.batch_norm
        uses_running_stats = not bn.training and bn.running_mean is not None
        if uses_running_stats:
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weights = [scale[:, None] * w for w in weights]
            bias = scale * (bias - bn.running_mean) + bn.bias
            return weights, bias, True
        return weights, bias, False

    def forward(self, stages: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
        weights, bias, bn_folded = self._composed_projections()
        _, height, width = stages[0]
        fused = None
        for (tokens, stage_height, stage_width), weight in zip(stages, weights):
            # The summed bias rides on the first stage (already at the output resolution).
            projected = linear(tokens, weight, bias if fused is None else None)
            projected = projected.unflatten(1, (stage_height, stage_width)).permute(0, 3, 1, 2)
            if (stage_height, stage_width) != (height, width):
                projected = F.interpolate(projected, size=(height, width), mode="bilinear", align_corners=False)
            fused = projected if fused is None else fused.add_(projected)
        if not bn_folded:
            fused = self.batch_norm(fused)
        hidden = self.dropout(F.relu(fused, inplace=True))
        return self.classifier(hidden).contiguous()
