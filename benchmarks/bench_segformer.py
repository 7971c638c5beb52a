"""omniseg vs the reference implementation on the same SegFormer weights and photo.

Builds the published MiT-b0 architecture (hidden sizes 32-64-160-256, depths 2-2-2-2,
decoder 256) with 19 Cityscapes-sized labels and random weights, saves it once with the
reference, loads it in both libraries and times, interleaved in one process: the model
forward at 512x512, preprocessing of a real photo, and the whole image-segmentation
pipeline. Also prints the largest logit difference.

    python benchmarks/bench_segformer.py [--repeats 7] [--size 512] [--batch 1] [--threads N]

Needs the test extra (``transformers``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CAMVID_FRAME = REPO.parent / "shared" / "datasets" / "camvid" / "images" / "val" / "0016E5_07959.png"


def build_checkpoint(directory: Path, size: int) -> None:
    import transformers

    config = transformers.SegformerConfig(
        hidden_sizes=[32, 64, 160, 256],
        depths=[2, 2, 2, 2],
        decoder_hidden_size=256,
        id2label={i: f"class_{i}" for i in range(19)},
    )
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(directory)
    processor_class = getattr(transformers, "SegformerImageProcessorPil", transformers.SegformerImageProcessor)
    processor_class(size={"height": size, "width": size}).save_pretrained(directory)


def photo() -> Image.Image:
    if CAMVID_FRAME.is_file():
        return Image.open(CAMVID_FRAME).convert("RGB")
    return Image.new("RGB", (480, 360), (90, 120, 150))


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import omniseg

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_checkpoint(directory, args.size)
        reference = transformers.SegformerForSemanticSegmentation.from_pretrained(directory).eval()
        reference_processor = transformers.AutoImageProcessor.from_pretrained(directory)
        reference_pipeline = transformers.pipeline("image-segmentation", model=str(directory), device="cpu")
        ours = omniseg.load_model(directory)
        processor = omniseg.load_processor(directory)
        pipeline = omniseg.pipeline("image-segmentation", model=directory)

        pixels = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        image = photo()
        with torch.inference_mode():
            diff = (reference(pixel_values=pixels).logits - ours(pixels).logits).abs().max().item()

        def forward(model):
            def run():
                with torch.inference_mode():
                    model(pixel_values=pixels)

            return run

        rows = [
            (f"forward {args.batch}x3x{args.size}x{args.size}", forward(reference), forward(ours)),
            (
                f"preprocess {image.width}x{image.height} photo",
                lambda: reference_processor(image, return_tensors="pt"),
                lambda: processor(image, return_tensors="pt"),
            ),
            ("pipeline, one photo", lambda: reference_pipeline(image), lambda: pipeline(image)),
        ]
        print(f"torch threads: {torch.get_num_threads()}; max |logit difference|: {diff:.2e}")
        print(f"{'':34s} {'reference (median/min ms)':>26s} {'omniseg (median/min ms)':>24s} {'speed-up':>9s}")
        for name, theirs, mine in rows:
            ref_med, ref_min = timed(theirs, args.repeats)
            our_med, our_min = timed(mine, args.repeats)
            print(
                f"{name:34s} {ref_med * 1e3:14.1f} / {ref_min * 1e3:7.1f} "
                f"{our_med * 1e3:14.1f} / {our_min * 1e3:7.1f} {ref_med / our_med:8.2f}x"
            )


if __name__ == "__main__":
    main()
