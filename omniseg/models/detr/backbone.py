"""DETR's convolutional backbone: a bottleneck ResNet (50/101/152) with frozen batch norm.

The four stage maps (strides 4, 8, 16, 32) come out; DETR's transformer reads the last, its
mask head all four. Batch norm is frozen: fixed statistics and affine parameters, kept as
buffers (never trained), as in the reference.

Checkpoints store this backbone in one of two layouts, chosen by the config:

* the reference's own ResNet (``use_timm_backbone: false``, ``backbone_config.model_type``
  ``resnet``), the module names used here::

      embedder.embedder.{convolution, normalization}
      encoder.stages.<s>.layers.<l>.shortcut.{convolution, normalization}
      encoder.stages.<s>.layers.<l>.layer.<0|1|2>.{convolution, normalization}

* timm's ResNet (``use_timm_backbone: true``, the hub's DETR checkpoints)::

      conv1, bn1, layer<s+1>.<l>.{conv1, bn1, conv2, bn2, conv3, bn3}, layer<s+1>.<l>.downsample.{0, 1}

:func:`timm_key_to_resnet` / :func:`resnet_key_to_timm` translate one name to the other; the
model applies them when it reads and writes a timm-layout checkpoint, so one module serves
both layouts.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.detr.config import ResNetConfig


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics: ``x * scale + shift`` per channel, where
    ``scale = weight / sqrt(running_var + 1e-5)`` and ``shift = bias - running_mean * scale``.

    All four tensors are buffers, named as in ``nn.BatchNorm2d`` (and the checkpoints).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """``[C]`` scale and shift, computed as the reference does (same rounding)."""
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class ConvLayer(nn.Module):
    """Conv (no bias, ``padding = kernel // 2``), frozen batch norm, optional ReLU.

    Checkpoint names ``convolution``, ``normalization``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, stride: int = 1, relu: bool = True):
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.normalization = FrozenBatchNorm2d(out_channels)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalization(self.convolution(x))
        return F.relu(x) if self.relu else x


class Embedder(nn.Module):
    """7x7 stride-2 conv + norm + ReLU, then 3x3 stride-2 max pool: stride 4."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.embedder = ConvLayer(config.num_channels, config.embedding_size, kernel_size=7, stride=2)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return F.max_pool2d(self.embedder(pixel_values), kernel_size=3, stride=2, padding=1)


class Shortcut(nn.Module):
    """1x1 (strided) conv + norm projecting the residual. Names ``convolution``, ``normalization``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.normalization = FrozenBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalization(self.convolution(x))


class Bottleneck(nn.Module):
    """1x1 reduce (by 4), 3x3, 1x1 expand; plus the (projected) input; ReLU.

    The stride sits on the 3x3 conv, or on the first 1x1 with ``downsample_in_bottleneck``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, downsample_in_bottleneck: bool) -> None:
        super().__init__()
        inner = out_channels // 4
        self.shortcut = (
            Shortcut(in_channels, out_channels, stride)
            if in_channels != out_channels or stride != 1
            else nn.Identity()
        )
        self.layer = nn.Sequential(
            ConvLayer(in_channels, inner, kernel_size=1, stride=stride if downsample_in_bottleneck else 1),
            ConvLayer(inner, inner, kernel_size=3, stride=1 if downsample_in_bottleneck else stride),
            ConvLayer(inner, out_channels, kernel_size=1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.layer(x) + self.shortcut(x))


class Stage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, depth: int, stride: int, downsample_in_bottleneck: bool):
        super().__init__()
        self.layers = nn.Sequential(
            *(
                Bottleneck(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    stride=stride if i == 0 else 1,
                    downsample_in_bottleneck=downsample_in_bottleneck,
                )
                for i in range(depth)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Encoder(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        widths = [config.embedding_size, *config.hidden_sizes]
        self.stages = nn.ModuleList(
            Stage(
                widths[i],
                widths[i + 1],
                depth=depth,
                stride=2 if i > 0 or config.downsample_in_first_stage else 1,
                downsample_in_bottleneck=config.downsample_in_bottleneck,
            )
            for i, depth in enumerate(config.depths)
        )


class ResNetBackbone(nn.Module):
    """Bottleneck ResNet returning every stage's map.

    Example::

        backbone = ResNetBackbone(config.backbone_config)
        maps = backbone(pixel_values)  # [B, 256, H/4, W/4] ... [B, 2048, H/32, W/32] for ResNet-50
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.embedder = Embedder(config)
        self.encoder = Encoder(config)
        self.channels = list(config.hidden_sizes)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """``[B, C_in, H, W]`` -> one ``[B, hidden_sizes[i], H_i, W_i]`` map per stage."""
        hidden = self.embedder(pixel_values)
        maps = []
        for stage in self.encoder.stages:
            hidden = stage(hidden)
            maps.append(hidden)
        return maps


# ----------------------------------------------------------------------------- timm layout

_TIMM_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(.+)$")
_TIMM_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_RESNET_BLOCK = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(layer\.[012]|shortcut)\.(convolution|normalization)\.(.+)$")
_RESNET_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$")


def timm_key_to_resnet(name: str) -> str | None:
    """A timm ResNet tensor name (relative to the backbone) as this module's, or ``None`` for
    names it has no place for (the classifier ``fc``, batch-norm ``num_batches_tracked``)."""
    if name.endswith("num_batches_tracked") or name.startswith("fc."):
        return None
    stem = _TIMM_STEM.match(name)
    if stem:
        part = "convolution" if stem.group(1) == "conv1" else "normalization"
        return f"embedder.embedder.{part}.{stem.group(2)}"
    block = _TIMM_BLOCK.match(name)
    if not block:
        raise KeyError(name)
    stage, index, layer, tensor = int(block.group(1)) - 1, block.group(2), block.group(3), block.group(4)
    if layer.startswith("downsample"):
        where = "shortcut." + ("convolution" if layer.endswith("0") else "normalization")
    else:
        position = int(layer[-1]) - 1
        where = f"layer.{position}." + ("convolution" if layer.startswith("conv") else "normalization")
    return f"encoder.stages.{stage}.layers.{index}.{where}.{tensor}"


def resnet_key_to_timm(name: str) -> str:
    """The inverse of :func:`timm_key_to_resnet` for this module's tensor names."""
    stem = _RESNET_STEM.match(name)
    if stem:
        return ("conv1." if stem.group(1) == "convolution" else "bn1.") + stem.group(2)
    block = _RESNET_BLOCK.match(name)
    if not block:
        raise KeyError(name)
    stage, index, where, kind, tensor = block.groups()
    prefix = f"layer{int(stage) + 1}.{index}."
    if where == "shortcut":
        return prefix + ("downsample.0." if kind == "convolution" else "downsample.1.") + tensor
    position = int(where[-1]) + 1
    return prefix + (f"conv{position}." if kind == "convolution" else f"bn{position}.") + tensor
