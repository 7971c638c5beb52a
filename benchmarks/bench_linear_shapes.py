"""The speed of each linear-layer shape of the Mask2Former forward on this CPU, on the two
paths a float32 product can take: oneDNN's matmul with packed weights (omniseg's inference
path) and ``F.linear`` (an MKL ``sgemm``: the reference's path).

The shapes are read from a profiled pipeline call on the random Swin-T COCO-panoptic
checkpoint of ``bench_pipeline.py`` (the same photo, 384x512 after resizing); each is then
timed alone on random data, medians of 7. This tells why the pipeline's ratio differs from
machine to machine: where MKL takes a generic code path (AMD CPUs) and oneDNN runs the CPU's
full vector width, the products alone differ by 2x.

    python benchmarks/bench_linear_shapes.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import machine_report, photo
from bench_pipeline import build_checkpoint


def linear_shapes(directory: Path) -> dict[tuple[tuple[int, ...], tuple[int, ...]], int]:
    """``(input shape, weight shape) -> calls`` of oneDNN's linear op in one pipeline call."""
    import omniseg
    from torch.profiler import ProfilerActivity, profile

    seg = omniseg.pipeline("image-segmentation", model=directory)
    image = photo()
    seg(image)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        seg(image)
    calls: dict = defaultdict(int)
    for event in prof.events():
        if event.name == "mkldnn::_linear_pointwise":
            calls[tuple(tuple(shape) for shape in event.input_shapes[:2])] += 1
    return dict(calls)


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("\n".join(machine_report()))
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), quick=False)
        shapes = linear_shapes(Path(tmp))
    if not shapes:
        print("omniseg's linear layers do not run on oneDNN here (see the products line above)")
        return 1

    print("\n| input x weight | calls | oneDNN packed (ms, GFLOP/s) | F.linear (ms, GFLOP/s) |")
    print("|---|---|---|---|")
    totals = [0.0, 0.0]
    for (input_shape, weight_shape), count in sorted(shapes.items(), key=lambda item: -item[1] * torch.Size(item[0][0]).numel()):
        rows = torch.Size(input_shape).numel() // input_shape[-1]
        x = torch.randn(rows, input_shape[-1])
        weight = torch.randn(*weight_shape) * 0.05
        bias = torch.randn(weight_shape[0])
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, max(rows, 64))
        with torch.inference_mode():
            onednn = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""))
            blas = median_ms(lambda: F.linear(x, weight, bias))
        gflop = 2 * rows * weight_shape[0] * weight_shape[1] / 1e9
        totals[0] += onednn * count
        totals[1] += blas * count
        print(f"| `[{rows}, {input_shape[-1]}] x {list(weight_shape)}` | {count} | "
              f"{onednn:.2f}, {gflop / onednn * 1e3:.0f} | {blas:.2f}, {gflop / blas * 1e3:.0f} |")
    print(f"| all {len(shapes)} shapes, weighted by calls | | {totals[0]:.0f} ms | {totals[1]:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
