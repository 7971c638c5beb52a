"""3x3 convolutions in bfloat16 for the opt-in fast CPU mode (``quantize="int8"``).

Dynamic int8 quantization covers linear layers only. Once they are int8, the pixel
decoder's 3x3 convolution (256 -> 256 channels at stride 4: 14.5 GFLOP at 384x512, about a
fifth of the int8 forward) is the largest float32 product left. oneDNN runs it in bfloat16
about twice as fast on CPUs with bfloat16 dot products (AVX512-BF16: AMD Zen 4, Intel Cooper
Lake and later; AMX), with a relative error of about 4e-3 against float32, the same order
as int8's. Elsewhere oneDNN would emulate bfloat16, slower than float32, so nothing changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Convolutions with fewer input channels stay float32: the patch embedding, whose input is
# the image itself (3 channels), the one place where bfloat16's rounding meets raw pixels.
_MIN_IN_CHANNELS = 16


def native_bfloat16() -> bool:
    """Whether oneDNN computes bfloat16 products natively on this CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch build without the query
        return False


class Bfloat16Conv2d(nn.Module):
    """A float32 ``nn.Conv2d`` computed in bfloat16: ``[B, C_in, H, W]`` float32 in,
    ``[B, C_out, H', W']`` float32 out (channels-last in, channels-last out). Inference only.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv.to(torch.bfloat16, memory_format=torch.channels_last)

    def forward(self, input: Tensor) -> Tensor:
        return self.conv(input.to(torch.bfloat16)).float()


def convolutions_to_bfloat16(model: nn.Module) -> list[str]:
    """Replace, in place, the ``k x k`` (``k > 1``) convolutions of ``model`` with at least
    16 input channels by :class:`Bfloat16Conv2d`, where the CPU has native bfloat16; return
    the replaced modules' names (none elsewhere)."""
    if not native_bfloat16():
        return []
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Conv2d
        and module.kernel_size != (1, 1)
        and module.in_channels >= _MIN_IN_CHANNELS
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Bfloat16Conv2d(getattr(parent, child)))
    return targets
