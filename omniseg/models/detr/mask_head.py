"""DETR's mask head: per query, an attention map over the encoder's output refined by an
FPN-style stack of convolutions into mask logits at stride 4.

For each query, ``bbox_attention`` gives a softmax over (heads x pixels) of the query's
attention to the encoder output at stride 32, ``[heads, h, w]``. The mask head concatenates
it with the projected backbone map (``C`` channels, the same for every query), runs two 3x3
convs (each GroupNorm + ReLU), then three fusion stages that upsample (nearest) to the next
backbone map (strides 16, 8, 4), add that map through a 1x1 ``adapter`` and refine it with a
3x3 conv + GroupNorm + ReLU; a last 3x3 conv gives one logit per pixel.

The reference runs all of this on ``B x Q`` copies of the image's maps. Here what does not
depend on the query is computed once per image (:meth:`MaskHeadSmallConv.image_context`):

* the first conv is linear in its input, so its part over the ``C`` image channels (with
  the bias) is one conv of the image map; per query only its ``heads`` attention channels
  are convolved and added (``C + heads`` -> ``heads`` input channels per query);
* the adapters (1x1 convs of 256-1024 channels at strides 16-4) see only the image's maps.

The query maps are kept in channels-last memory, where PyTorch's CPU convolutions run about
20% faster on these shapes (10 queries at 800x1066 input: 0.82-0.91 against 1.06-1.10 s,
busy shared machine), with :class:`GroupNorm`'s exact statistics on that layout.
Queries then go through the rest a chunk at a time, so memory stays bounded, and only the
queries asked for are computed (:meth:`DetrForSegmentation` uses that to decode just the
masks that post-processing can keep). Names mirror the hub checkpoints (``lay1``..``lay5``,
``gn1``..``gn5``, ``adapter1``..``adapter3``, ``out_lay``; ``q_linear``, ``k_linear``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.ops.group_norm import GroupNorm
from omniseg.ops.linear import Linear

# Queries decoded together: a chunk's stride-4 maps (16-32 channels) stay a few tens of MB
# at 800x1066 inputs, where all 100 queries at once would take over a GB.
QUERY_CHUNK = 10


class MHAttentionMap(nn.Module):
    """Attention weights (no values) of queries over a feature map, softmax over heads and
    pixels together. Checkpoint names ``q_linear``, ``k_linear``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scaling = (dim // num_heads) ** -0.5
        self.q_linear = Linear(dim, dim)
        self.k_linear = Linear(dim, dim)

    def forward(self, queries: Tensor, keys: Tensor, padding: Tensor | None) -> Tensor:
        """
        Args:
            queries: ``[B, K, C]`` decoder outputs.
            keys: ``[B, h*w, C]`` encoder outputs (row-major pixels).
            padding: ``[B, 1, 1, h*w]`` additive mask (0, or the dtype's minimum on padded
                pixels), or None.

        Returns:
            ``[B, K, heads, h*w]`` weights summing to 1 over the last two dimensions.
        """
        batch, count, dim = queries.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q_linear(queries).view(batch, count, heads, head_dim).transpose(1, 2)  # [B, n, K, d]
        k = self.k_linear(keys).view(batch, -1, heads, head_dim).permute(0, 2, 3, 1)  # [B, n, d, hw]
        logits = torch.matmul(q * self.scaling, k)  # [B, n, K, hw]
        if padding is not None:
            logits = logits + padding
        logits = logits.transpose(1, 2)  # [B, K, n, hw]
        return logits.flatten(2).softmax(-1).view(batch, count, heads, -1)


@dataclasses.dataclass
class ImageContext:
    """What the mask head needs of one image, computed once for all its queries.

    Attributes:
        first_conv: ``[1, C + heads, h, w]`` the first conv's image part plus its bias.
        adapted: three ``[1, c_i, H_i, W_i]`` adapted backbone maps (strides 16, 8, 4).
    """

    first_conv: Tensor
    adapted: list[Tensor]


class MaskHeadSmallConv(nn.Module):
    """The conv stack that turns attention maps into mask logits (see the module docstring).

    Args:
        dim: ``d_model + heads`` (input channels of the first conv).
        fpn_dims: channels of the backbone maps at strides 16, 8, 4.
        context_dim: ``d_model``.
    """

    def __init__(self, *, dim: int, fpn_dims: list[int], context_dim: int) -> None:
        super().__init__()
        widths = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.image_channels = context_dim
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, widths[1], 3, padding=1)
        self.gn2 = GroupNorm(min(8, widths[1]), widths[1])
        self.lay3 = nn.Conv2d(widths[1], widths[2], 3, padding=1)
        self.gn3 = GroupNorm(min(8, widths[2]), widths[2])
        self.lay4 = nn.Conv2d(widths[2], widths[3], 3, padding=1)
        self.gn4 = GroupNorm(min(8, widths[3]), widths[3])
        self.lay5 = nn.Conv2d(widths[3], widths[4], 3, padding=1)
        self.gn5 = GroupNorm(min(8, widths[4]), widths[4])
        self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], widths[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], widths[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], widths[3], 1)

    def image_context(self, features: Tensor, fpn_maps: list[Tensor]) -> ImageContext:
        """``features [1, C, h, w]`` (projected backbone map) and ``fpn_maps`` (backbone maps
        at strides 16, 8, 4, each ``[1, c, H, W]``) -> the per-image parts of the head."""
        image_weight = self.lay1.weight[:, : self.image_channels]
        first = F.conv2d(features, image_weight, self.lay1.bias, padding=1)
        adapters = (self.adapter1, self.adapter2, self.adapter3)
        adapted = [adapter(m).contiguous(memory_format=torch.channels_last) for adapter, m in zip(adapters, fpn_maps)]
        return ImageContext(first_conv=first.contiguous(memory_format=torch.channels_last), adapted=adapted)

    def forward(self, context: ImageContext, attention: Tensor) -> Tensor:
        """``attention [K, heads, h, w]`` of ``K >= 1`` queries of one image -> mask logits
        ``[K, H_4, W_4]`` (the size of the stride-4 backbone map)."""
        return torch.cat([self._decode(context, chunk) for chunk in attention.split(QUERY_CHUNK)])

    def _decode(self, context: ImageContext, attention: Tensor) -> Tensor:
        attention_weight = self.lay1.weight[:, self.image_channels :]
        attention = attention.contiguous(memory_format=torch.channels_last)
        x = F.conv2d(attention, attention_weight, padding=1) + context.first_conv
        x = F.relu(self.gn1(x))
        x = F.relu(self.gn2(self.lay2(x)))
        for adapted, conv, norm in zip(
            context.adapted, (self.lay3, self.lay4, self.lay5), (self.gn3, self.gn4, self.gn5)
        ):
            x = adapted + F.interpolate(x, size=adapted.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return self.out_lay(x)[:, 0]
