"""omniseg vs the reference implementation on the same SAM weights and photo.

Builds the SAM ViT-B architecture (the reference's default ``SamConfig``: 12 layers of
width 768, windows of 14, global attention in layers 2, 5, 8, 11) with random weights
(or loads ``--model DIR``), saves it once with the reference, loads it in both libraries
and times, interleaved in one process: the image encoder at 1024x1024, one prompted mask
from stored embeddings, and the whole ``mask-generation`` call on a 640x480 photo
(CamVid frame resized) for each ``--crops-n-layers``. Prints medians, the ratio, the peak
memory rise during each call, and whether the answers agree.

    python benchmarks/bench_sam.py [--threads 2] [--repeats 3] [--model DIR]
        [--points-per-side 32] [--crops-n-layers 0 1] [--pred-iou-thresh 0.88]
        [--generation-repeats 3] [--skip encoder prompt generation]

Needs the test extra (``transformers``). The reference's mask-generation post-processing
needs torchvision's ``batched_nms``; without torchvision it is given the definition's
NMS from tests/reference_sam.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
CAMVID_FRAME = REPO.parent / "shared" / "datasets" / "camvid" / "images" / "val" / "0016E5_07959.png"
PAGE = os.sysconf("SC_PAGE_SIZE")


def build_checkpoint(directory: Path) -> None:
    import transformers

    from reference_sam import reference_sam_processor

    torch.manual_seed(0)
    model = transformers.SamModel(transformers.SamConfig()).eval()
    model.save_pretrained(directory)
    reference_sam_processor(1024).save_pretrained(directory)


def photo() -> Image.Image:
    if CAMVID_FRAME.is_file():
        return Image.open(CAMVID_FRAME).convert("RGB").resize((640, 480), Image.BILINEAR)
    return Image.new("RGB", (640, 480), (90, 120, 150))


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakMemory:
    """Largest resident-set rise above the level at entry, sampled every 2 ms."""

    def __enter__(self) -> "PeakMemory":
        self.base = rss()
        self.peak = self.base
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def rise_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def interleaved(
    calls: dict[str, callable], repeats: int, *, warmup: bool = True
) -> dict[str, tuple[float, float, object]]:
    """``name -> (median seconds, largest memory rise MB, last answer)``, the calls
    alternating within each repeat (after one warm-up call each, with ``warmup``)."""
    answers = {name: call() for name, call in calls.items()} if warmup else {}
    times = {name: [] for name in calls}
    memory = {name: 0.0 for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            with PeakMemory() as peak:
                start = time.perf_counter()
                answers[name] = call()
                times[name].append(time.perf_counter() - start)
            memory[name] = max(memory[name], peak.rise_mb)
    return {name: (statistics.median(times[name]), memory[name], answers[name]) for name in calls}


def report(title: str, results: dict, agreement: str) -> None:
    ref_time, ref_mem, _ = results["reference"]
    our_time, our_mem, _ = results["omniseg"]
    print(
        f"| {title} | {ref_time * 1000:.0f} ms | {our_time * 1000:.0f} ms | {ref_time / our_time:.2f}x "
        f"| {ref_mem:.0f} MB | {our_mem:.0f} MB | {agreement} | {load_average()} |",
        flush=True,
    )


def compare_generation(expected: dict, actual: dict) -> str:
    if len(expected["masks"]) != len(actual["masks"]):
        return f"DIFFERENT: {len(expected['masks'])} vs {len(actual['masks'])} masks"
    if not expected["masks"]:
        return "same (0 masks)"
    differing = [int((a != b).sum()) for a, b in zip(actual["masks"], expected["masks"])]
    score_error = float((expected["scores"] - actual["scores"]).abs().max())
    return (
        f"{len(differing)} masks, {sum(d == 0 for d in differing)} identical, largest difference "
        f"{max(differing)} px; scores within {score_error:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None, help="a SAM checkpoint directory (default: random ViT-B)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--crops-n-layers", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--generation-repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["encoder", "prompt", "generation"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import omniseg
    from reference_sam import torchvision_nms_for_reference

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model
        if directory is None:
            directory = Path(tmp) / "sam-vit-b"
            build_checkpoint(directory)
        reference = transformers.SamModel.from_pretrained(directory).eval()
        ours = omniseg.load_model(directory)
        print(
            f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"model {args.model or 'random ViT-B'}, load average {load_average()} at start"
        )
        print(
            "| what | reference | omniseg | speed-up | ref. peak mem. rise | omniseg peak mem. rise | answers "
            "| load average after (1, 5, 15 min) |"
        )
        print("|---|---|---|---|---|---|---|---|")

        pixels = omniseg.load_processor(directory)(photo())["pixel_values"]
        with torch.inference_mode():
            embeddings = reference.get_image_embeddings(pixels)
            if "encoder" not in args.skip:
                results = interleaved(
                    {
                        "reference": lambda: reference.get_image_embeddings(pixels),
                        "omniseg": lambda: ours.get_image_embeddings(pixels),
                    },
                    args.repeats,
                )
                expected, actual = results["reference"][2], results["omniseg"][2]
                error = float((expected - actual).abs().max() / expected.abs().max())
                report("image encoder (1024x1024)", results, f"max rel. diff {error:.1e}")
            if "prompt" not in args.skip:
                points = torch.tensor([[[[300.0, 200.0]]]], dtype=torch.float64)
                results = interleaved(
                    {
                        "reference": lambda: reference(image_embeddings=embeddings, input_points=points),
                        "omniseg": lambda: ours(image_embeddings=embeddings, input_points=points),
                    },
                    max(args.repeats, 11),
                )
                expected, actual = results["reference"][2].pred_masks, results["omniseg"][2].pred_masks
                error = float((expected - actual).abs().max() / expected.abs().max())
                report("one prompted mask (stored embeddings)", results, f"max rel. diff {error:.1e}")

        if "generation" not in args.skip:
            image = photo()
            ref_pipe = transformers.pipeline("mask-generation", model=str(directory), device="cpu")
            our_pipe = omniseg.pipeline("mask-generation", model=directory)
            for layers in args.crops_n_layers:
                options = dict(
                    points_per_crop=args.points_per_side,
                    crops_n_layers=layers,
                    pred_iou_thresh=args.pred_iou_thresh,
                )

                def run_reference():
                    with torchvision_nms_for_reference():
                        return ref_pipe(image, **options)

                # Calls of seconds to minutes: the models are warm from the runs above.
                results = interleaved(
                    {"reference": run_reference, "omniseg": lambda: our_pipe(image, **options)},
                    args.generation_repeats,
                    warmup=False,
                )
                report(
                    f"mask-generation, 640x480, {args.points_per_side}x{args.points_per_side} points, "
                    f"crops_n_layers {layers}, pred_iou_thresh {args.pred_iou_thresh}",
                    results,
                    compare_generation(results["reference"][2], results["omniseg"][2]),
                )


if __name__ == "__main__":
    main()
