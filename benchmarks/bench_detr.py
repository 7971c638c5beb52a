"""omniseg vs the reference implementation on the same DETR panoptic weights and photo.

Builds the facebook/detr-resnet-50-panoptic architecture (ResNet-50, d_model 256, 6 encoder
and 6 decoder layers, 100 queries, 250 classes; the reference's own ResNet layout, since the
reference cannot build timm backbones without torchvision) with random weights, and a
640x480 CamVid photo (resized by the processor to 800x1066, as the hub model is used). Then,
interleaved in one process, medians of: preprocessing, forward (every query's mask), each
post-processing path on the forward's outputs, and the panoptic pipeline; peak memory of one
pipeline call in fresh processes.

    python benchmarks/bench_detr.py [--repeats 5] [--threshold 0.9] [--threads N] [--quick]

Answers are checked first (pipeline segments: labels and pixels; preprocessing; logits,
boxes and masks). Random weights give every query nearly the same state, so the heads are set
to read what differs between queries on the photo (``make_queries_distinct`` of
tests/reference_detr.py). ``--threshold`` is the pipeline's (0.9 by default); the number of
kept queries is printed: omniseg decodes the masks of kept queries only, the forward row
times all 100.

Needs the test extra (``transformers``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import (  # noqa: E402
    peak_rss_rise_mb,
    perturb,
    photo,
    post_processing_stages,
    print_stage_table,
    relative_errors,
    same_segments,
    time_stages,
)
from reference_detr import make_queries_distinct  # noqa: E402


def build_checkpoint(directory: Path, *, quick: bool) -> None:
    from transformers import DetrConfig, DetrForSegmentation, ResNetConfig
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    backbone = ResNetConfig(
        depths=[1, 1, 1, 1] if quick else [3, 4, 6, 3], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    config = DetrConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        num_queries=100,
        id2label={i: f"class_{i}" for i in range(250)},
    )
    torch.manual_seed(0)
    model = DetrForSegmentation(config).eval()
    perturb(model)
    processor = DetrImageProcessorPil()  # shortest edge 800, longest 1333
    # Random init gives every query nearly the same state, class and mask (near-ties at every
    # pixel, which float rounding flips); set the heads to read what differs between queries
    # on this photo, as tests/reference_detr.py does for the tests' photo model.
    make_queries_distinct(model, processor(images=[photo()], return_tensors="pt"))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="ResNet with one block per stage, for a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = parser.parse_args()

    import warnings

    import transformers

    import omniseg

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = photo()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_checkpoint(directory, quick=args.quick)
        ours = omniseg.pipeline("image-segmentation", model=directory)
        ref = transformers.pipeline("image-segmentation", model=str(directory), device="cpu")

        # Same answers first: a speed-up that changes the answer does not count.
        kwargs = dict(subtask="panoptic", threshold=args.threshold)
        a, b = ours(image, **kwargs), ref(image, **kwargs)
        labels_same, pixels_same = same_segments(a, b)
        ref_inputs = ref.image_processor(images=[image], return_tensors="pt")
        our_inputs = ours.processor(images=[image], return_tensors="pt")
        with torch.inference_mode():
            ref_out = ref.model(**ref_inputs)
            our_out = ours.model(**our_inputs)
            errors = relative_errors(our_out, ref_out, ("logits", "pred_boxes", "pred_masks"))
        scores, labels = ref_out.logits.softmax(-1).max(-1)
        kept = int(((labels != ref_out.logits.shape[-1] - 1) & (scores > args.threshold)).sum())
        target = [(image.height, image.width)]
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
        print(f"model: random DETR ResNet-{'quick' if args.quick else '50'} panoptic architecture, "
              f"input {tuple(our_inputs['pixel_values'].shape[-2:])}")
        print(f"photo 640x480, panoptic threshold {args.threshold}: {kept} of 100 queries kept, "
              f"{len(a)} segments (reference {len(b)})")
        print(f"- pipeline answers: labels identical {labels_same}, pixels with the same label {pixels_same:.6f}")
        print(f"- preprocessing bit-identical: {torch.equal(our_inputs['pixel_values'], ref_inputs['pixel_values'])}")
        print("- forward, max |ours - reference| / max |reference|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))

        def forward_all_masks(model, inputs):
            with torch.inference_mode():
                return model(**inputs).pred_masks

        stages = {
            "preprocess": (
                lambda: ours.processor(images=[image], return_tensors="pt"),
                lambda: ref.image_processor(images=[image], return_tensors="pt"),
            ),
            "forward (all 100 masks)": (
                lambda: forward_all_masks(ours.model, our_inputs),
                lambda: forward_all_masks(ref.model, ref_inputs),
            ),
            **post_processing_stages(ours.processor, ref.image_processor, our_out, ref_out, target, args.threshold),
            "pipeline (panoptic)": (lambda: ours(image, **kwargs), lambda: ref(image, **kwargs)),
        }
        rows = time_stages(stages, args.repeats)

        print()
        print_stage_table(rows)

        if not args.no_memory:
            ours_mb = peak_rss_rise_mb("omniseg", directory, args.threshold, args.threads)
            ref_mb = peak_rss_rise_mb("reference", directory, args.threshold, args.threads)
            print(f"\npeak RSS rise over the first pipeline call after loading (fresh process each): "
                  f"omniseg {ours_mb:.0f} MB, reference {ref_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
