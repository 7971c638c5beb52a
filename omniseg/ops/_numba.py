"""numba, the compiler of the ``fast`` extra's kernels: the module, or None when the extra is
not installed (callers then keep their PyTorch paths); and what the kernels share."""

from __future__ import annotations

import torch

try:
    import numba
except ImportError:
    numba = None


def kernels_apply(
    *tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,), differentiable: bool = False
) -> bool:
    """Whether a numba kernel can stand in for PyTorch on ``tensors``: numba installed, all
    on the CPU with one dtype of ``dtypes``, and no gradient needed unless the kernel has a
    backward (``differentiable``). With no tensors: whether numba is installed."""
    return (
        numba is not None
        and all(t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors)
        and (not tensors or tensors[0].dtype in dtypes)
        and (differentiable or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
    )


def use_torch_threads() -> None:
    """Run numba's parallel loops on as many threads as PyTorch's intra-op pool."""
    threads = torch.get_num_threads()
    wanted = min(threads, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    # numba's OpenMP layer sizes the OpenMP pool when it starts (above, once per process);
    # where PyTorch uses the same OpenMP runtime that resizes PyTorch's pool too.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


if numba is not None:
    from numba.extending import intrinsic

    @intrinsic
    def fma32(typing_context, a, b, c):  # pragma: no cover - compiled
        """``a * b + c`` in float32, rounded once (a fused multiply-add), inside kernels."""
        signature = numba.float32(numba.float32, numba.float32, numba.float32)

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return signature, codegen

else:
    fma32 = None
