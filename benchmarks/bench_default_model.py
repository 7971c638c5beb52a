"""Latency of the bundled default model through ``omniseg.pipeline`` on 480x360 CamVid frames.

Times whole pipeline calls (load image as PIL -> preprocess -> model -> post-process ->
PIL masks), one frame per call, cycling over CamVid val frames, after a warm-up, and prints
the median wall time per subtask (and the median process CPU time, which is less
disturbed by other load on a shared machine). The target is a median of at most 0.35 s
with 2 threads.

    python benchmarks/bench_default_model.py [--threads 2] [--repeats 15] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CAMVID_VAL = Path(os.environ.get("OMNISEG_SHARED", REPO.parent / "shared")) / "datasets" / "camvid" / "images" / "val"


def frames(count: int) -> list[Image.Image]:
    paths = sorted(CAMVID_VAL.glob("*.png"))[:count]
    if paths:
        return [Image.open(p).convert("RGB") for p in paths]
    # No dataset: random 480x360 frames (same cost, meaningless segments).
    generator = torch.Generator().manual_seed(0)
    return [
        Image.fromarray(torch.randint(0, 256, (360, 480, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--subtasks", default="semantic,instance,panoptic")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import omniseg

    seg = omniseg.pipeline("image-segmentation", model=args.model, device="cpu")
    images = frames(5)
    print(f"model: {args.model or 'bundled default'}; threads {args.threads}; {len(images)} frames "
          f"{images[0].size[0]}x{images[0].size[1]}; {args.repeats} timed calls per subtask; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for subtask in args.subtasks.split(","):
        for image in images[:2]:
            seg(image, subtask=subtask)  # warm-up
        wall, cpu = [], []
        for i in range(args.repeats):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            seg(images[i % len(images)], subtask=subtask)
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
        print(f"{subtask:9s} median {statistics.median(wall):.3f} s wall "
              f"(min {min(wall):.3f}, max {max(wall):.3f}); median CPU time {statistics.median(cpu):.3f} s")


if __name__ == "__main__":
    main()
