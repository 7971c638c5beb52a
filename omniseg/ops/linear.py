"""Linear layers (and 1x1 convolutions) that run float32 CPU inference through oneDNN.

``F.linear`` on a float32 CPU tensor is an MKL ``sgemm``. The oneDNN matmul that PyTorch
also ships (``mkldnn``) runs the models' large projections faster: 20-40% on an AMD Zen 4
core (one thread, ``[4032, 256] x [256, 1024]``: 90-96 against 65-73 GFLOP/s), where MKL
does not pick its fastest kernels. Both compute the same float32 dot products; only the
summation order, hence the last bits, differs.

oneDNN's linear op has no backward, so it is used only when no gradient is needed (the
training path is unchanged), and only where it exists: x86-64 CPUs with PyTorch built with
oneDNN. Everywhere else this is ``F.linear``.

oneDNN computes with weights in its own blocked layout, and otherwise reorders a plain
weight on every call. The modules here keep that reordered copy (:class:`PackedWeights`),
remade whenever the weight changes: the same results bit for bit, 5-17% faster on the
models' shapes (one thread), for a second copy of the linear weights in memory.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ONEDNN_LINEAR = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


class PackedWeights:
    """A module's weights in oneDNN's blocked layout, for :func:`linear`.

    Entries are keyed on the weight's memory and shape and remade when its version counter
    moves (in-place updates, ``load_state_dict``); each keeps the weight's storage alive, so
    its address cannot come back as another tensor's, until a weight in other memory comes
    (slices of one parameter share an entry set). Not state: copies and pickles of a module
    start empty.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[Tensor, int, Tensor]] = {}

    def get(self, weight: Tensor, rows: int) -> Tensor:
        """``weight [out, in]`` (float32, CPU) reordered for inputs of about ``rows`` rows."""
        try:
            version = weight._version
        except RuntimeError:  # tensors made under inference_mode have no version counter
            return weight
        storage = weight.untyped_storage().data_ptr()
        key = (storage, weight.data_ptr(), tuple(weight.shape), weight.stride())
        entry = self._entries.get(key)
        if entry is None or entry[1] != version:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(rows, 64))
            entry = (weight.detach(), version, packed)
            # Entries of other memory belong to weights this module no longer has (replaced,
            # moved, or restacked): dropping them frees those weights and their copies. A
            # snapshot, filled and swapped in whole: threads running the module at once
            # never see a dictionary change under them (at worst one repacks again).
            kept = {k: e for k, e in list(self._entries.items()) if k[0] == storage}
            kept[key] = entry
            self._entries = kept
        return entry[2]

    def clear(self) -> None:
        """Drop every entry (and with it the weights they keep alive)."""
        self._entries = {}

    def __getstate__(self) -> dict:
        return {"_entries": {}}

    def __deepcopy__(self, memo: dict) -> PackedWeights:
        return PackedWeights()


class HoldsPackedWeights(nn.Module):
    """Base of modules that pass their weights to :func:`linear` with a ``packed_weights``
    cache. Converting or moving the module (``.to``, ``.cuda``, ``.half``, ... all go through
    ``_apply``) drops the cache, which would otherwise keep the old CPU weights and their
    copies alive for good."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packed_weights = PackedWeights()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> HoldsPackedWeights:
        self.packed_weights.clear()
        return super()._apply(fn, recurse)


# Activations oneDNN can apply to a product's output as it is written (its "post-ops"),
# bit-identical to PyTorch's own: name -> (post-op, algorithm, the PyTorch function).
_POST_OPS: dict[str, tuple[str, str, Callable[[Tensor], Tensor]]] = {
    "relu": ("relu", "", F.relu),
    "gelu": ("gelu", "none", F.gelu),  # erf GELU; oneDNN's tanh GELU rounds differently
}


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    packed: PackedWeights | None = None,
    activation: str | None = None,
) -> Tensor:
    """``F.linear(input, weight, bias)``: ``[..., in] -> [..., out]`` with ``weight [out, in]``,
    then ``activation`` (``"relu"`` or ``"gelu"``) if given.

    Runs on oneDNN for float32 CPU tensors when autograd does not need the result, with the
    weight taken from ``packed`` (reordered once) when given, and the activation applied as
    the output is written: no second pass over it (Swin-T's forward -2% for its GELUs).
    """
    if (
        _ONEDNN_LINEAR
        and torch.backends.mkldnn.enabled
        and input.device.type == "cpu"
        and input.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and not _needs_grad(input, weight, bias)
    ):
        if packed is not None:
            weight = packed.get(weight, input.numel() // max(input.shape[-1], 1))
        post_op, algorithm, _ = _POST_OPS[activation] if activation is not None else ("none", "", None)
        return torch.ops.mkldnn._linear_pointwise(input, weight, bias, post_op, [], algorithm)
    output = F.linear(input, weight, bias)
    return output if activation is None else _POST_OPS[activation][2](output)


def linear_and_activation(
    layer: nn.Module, input: Tensor, activation: str, activate: Callable[[Tensor], Tensor]
) -> Tensor:
    """``activate(layer(input))``, where ``activation`` is the name of ``activate``. When
    ``layer`` is a :class:`Linear` and oneDNN has that activation, it is fused into the
    product (see :func:`linear`); other layers (dynamically quantized ones, say) and other
    activations take the two steps."""
    if type(layer) is Linear and activation in _POST_OPS:
        return linear(input, layer.weight, layer.bias, packed=layer.packed_weights, activation=activation)
    return activate(layer(input))


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class Linear(HoldsPackedWeights, nn.Linear):
    """``nn.Linear`` computed with :func:`linear` (same parameters, same checkpoint keys).

    Module transforms that match the exact class ``nn.Linear`` (dynamic quantization) must
    first turn these into plain ``nn.Linear``s, see :func:`as_plain_linear`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias, packed=self.packed_weights)


def as_plain_linear(module: nn.Module) -> nn.Module:
    """Make every :class:`Linear` inside ``module`` (itself included) a plain ``nn.Linear``,
    in place (parameters untouched), and return ``module``."""
    for child in module.modules():
        if type(child) is Linear:
            child.__class__ = nn.Linear
    return module


class PointwiseConv2d(HoldsPackedWeights, nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters and checkpoint keys) computed as :func:`linear`
    over the channels of each pixel.

    Takes ``[B, C, H, W]`` and returns ``[B, C_out, H, W]`` in channels-last memory (a
    permuted view of a ``[B, H, W, C_out]`` result). With a channels-last input no copy is
    made; PyTorch's own 1x1 convolution takes its slow im2col path on such inputs.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        pixels = input.permute(0, 2, 3, 1)  # [B, H, W, C]
        return linear(pixels, self.weight.flatten(1), self.bias, packed=self.packed_weights).permute(0, 3, 1, 2)
