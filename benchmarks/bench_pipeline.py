"""omniseg vs the reference implementation on the same Mask2Former weights and photo.

Builds the published Swin-T COCO-panoptic architecture (embed 96, depths 2-2-6-2, 133
classes, 100 queries) with random weights, saves it once, loads it in both libraries and
times, interleaved in one process: preprocessing, forward, each post-processing path,
the whole pipeline, and batch throughput. Peak memory is the rise of the process's peak
RSS over one pipeline call (Linux: /proc/self/clear_refs resets the peak).

    python benchmarks/bench_pipeline.py [--repeats 7] [--threshold 0] [--threads N] [--model DIR] [--quick]

Answers are checked first: the pipelines' segments (labels and mask pixels), preprocessing
(bit-identical), post-processing of the same logits (bit-identical) and the forward's
logits (relative difference). The random model's masks are near-ties almost everywhere
(probabilities ~1e-10), so float rounding of the forward can flip a few pixels; ``--model``
runs the same benchmark on a trained checkpoint. The opt-in int8 mode is timed last.

Needs the test extra (``transformers``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    interleaved,
    load_average,
    machine_report,
    max_relative_error,
    peak_rss_rise_mb,
    perturb,
    photo,
    post_processing_stages,
    print_stage_table,
    same_segments,
    swin_t_backbone,
    time_stages,
)


def build_checkpoint(directory: Path, *, quick: bool) -> None:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
    from transformers import Mask2FormerImageProcessor

    config = Mask2FormerConfig(
        backbone_config=swin_t_backbone(quick=quick),
        num_queries=100,
        id2label={i: f"class_{i}" for i in range(133)},
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    perturb(model)
    with torch.no_grad():
        # Random init gives near-uniform classes (best probability ~0.02, so no segment
        # passes the mask threshold) and near-identical masks. Sharpen the class head and
        # diversify the mask embeddings so the photo gets about ten segments, as a trained
        # model would give several.
        model.class_predictor.weight.mul_(10)
        model.class_predictor.bias.mul_(10)
        for param in model.model.transformer_module.decoder.mask_predictor.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    Mask2FormerImageProcessor(
        size={"shortest_edge": 384, "longest_edge": 1333}, size_divisor=32
    ).save_pretrained(directory)


def same_post_processing(ours_processor, ref_processor, outputs, target, threshold: float) -> bool:
    """Both post-processors on the same (reference) logits: bit-identical maps and segments."""
    kwargs = dict(threshold=threshold, target_sizes=target)
    for name in ("panoptic", "instance"):
        fn = f"post_process_{name}_segmentation"
        x = getattr(ours_processor, fn)(outputs, **kwargs)[0]
        y = getattr(ref_processor, fn)(outputs, **kwargs)[0]
        if not torch.equal(x["segmentation"], y["segmentation"]):
            return False
        if [(s["id"], s["label_id"]) for s in x["segments_info"]] != [(s["id"], s["label_id"]) for s in y["segments_info"]]:
            return False
    x = ours_processor.post_process_semantic_segmentation(outputs, target_sizes=target)[0]
    y = ref_processor.post_process_semantic_segmentation(outputs, target_sizes=target)[0]
    return torch.equal(x, y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="shallower backbone, for a smoke run")
    parser.add_argument("--model", type=Path, default=None, help="benchmark this checkpoint instead of a random Swin-T")
    parser.add_argument("--batches", default="1,4,8", help="batch sizes to time ('' for none)")
    args = parser.parse_args()

    import transformers
    import warnings

    import omniseg
    from omniseg.ops._numba import kernels_apply

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image = photo()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.model or Path(tmp)
        if args.model is None:
            build_checkpoint(directory, quick=args.quick)
        load = interleaved(
            {
                "omniseg": lambda: omniseg.pipeline("image-segmentation", model=directory),
                "reference": lambda: transformers.pipeline("image-segmentation", model=str(directory), device="cpu"),
            },
            max(1, args.repeats // 3),
        )
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
        target = [(image.height, image.width)]
        logit_error = max_relative_error(our_out, ref_out, ("class_queries_logits", "masks_queries_logits"))
        print("\n".join(machine_report()))
        print(f"transformers {transformers.__version__}")
        print("numba kernels:", "yes" if kernels_apply() else "no, PyTorch paths")
        print(f"model: {'random Swin-T COCO-panoptic architecture' if args.model is None else args.model}")
        print(f"photo 640x480, panoptic threshold {args.threshold}: {len(a)} segments (reference {len(b)})")
        print(f"- pipeline answers: labels identical {labels_same}, pixels with the same label {pixels_same:.6f}")
        print(f"- preprocessing bit-identical: {torch.equal(our_inputs['pixel_values'], ref_inputs['pixel_values'])}")
        print(f"- post-processing of the same logits bit-identical (panoptic, instance, semantic): "
              f"{same_post_processing(ours.processor, ref.image_processor, ref_out, target, args.threshold)}")
        print(f"- forward logits: max |ours - reference| / max |reference| = {logit_error:.1e}")

        def forward(model, inputs):
            with torch.inference_mode():
                model(**inputs)

        stages = {
            "preprocess": (
                lambda: ours.processor(images=[image], return_tensors="pt"),
                lambda: ref.image_processor(images=[image], return_tensors="pt"),
            ),
            "forward": (lambda: forward(ours.model, our_inputs), lambda: forward(ref.model, ref_inputs)),
            **post_processing_stages(ours.processor, ref.image_processor, our_out, ref_out, target, args.threshold),
            "pipeline (panoptic)": (lambda: ours(image, **kwargs), lambda: ref(image, **kwargs)),
        }
        rows = [("load (pipeline construction)", load["omniseg"], load["reference"])]
        rows += time_stages(stages, args.repeats)

        print()
        print_stage_table(rows)
        timing = {name: o for name, o, _ in rows}
        print(f"\npost-processing / forward (omniseg): panoptic {timing['post-process panoptic'] / timing['forward']:.1%}, "
              f"instance {timing['post-process instance'] / timing['forward']:.1%}, "
              f"semantic {timing['post-process semantic'] / timing['forward']:.1%}")

        print("\n| batch | omniseg images/s | reference images/s | ratio |")
        print("|---|---|---|---|")
        for size in [int(s) for s in args.batches.split(",") if s]:
            images = [image] * size
            t = interleaved(
                {
                    "omniseg": lambda: ours(images, batch_size=size, **kwargs),
                    "reference": lambda: ref(images, batch_size=size, **kwargs),
                },
                max(2, args.repeats // 3),
            )
            print(f"| {size} | {size / t['omniseg']:.2f} | {size / t['reference']:.2f} | {t['reference'] / t['omniseg']:.2f}x |")

        ours_mb = peak_rss_rise_mb("omniseg", directory, args.threshold, args.threads)
        ref_mb = peak_rss_rise_mb("reference", directory, args.threshold, args.threads)
        print(f"\npeak RSS rise over the first pipeline call after loading (fresh process each): "
              f"omniseg {ours_mb:.0f} MB, reference {ref_mb:.0f} MB")

        # The opt-in fast CPU mode: not the reference's answers, so reported apart.
        fast = omniseg.pipeline("image-segmentation", model=directory, quantize="int8")
        fast_inputs = fast.processor(images=[image], return_tensors="pt")
        with torch.inference_mode():
            fast_out = fast.model(**fast_inputs)
        fast_error = max_relative_error(fast_out, our_out, ("class_queries_logits", "masks_queries_logits"))
        f_labels, f_pixels = same_segments(fast(image, **kwargs), a)
        t = interleaved(
            {
                "int8 forward": lambda: forward(fast.model, fast_inputs),
                "float32 forward": lambda: forward(ours.model, our_inputs),
                "int8 pipeline": lambda: fast(image, **kwargs),
                "float32 pipeline": lambda: ours(image, **kwargs),
                "reference pipeline": lambda: ref(image, **kwargs),
            },
            args.repeats,
        )
        print("\nfast mode, omniseg.pipeline(..., quantize='int8'):")
        print(f"| | int8 (s) | float32 (s) | float32 / int8 | reference / int8 |")
        print("|---|---|---|---|---|")
        print(f"| forward | {t['int8 forward']:.3f} | {t['float32 forward']:.3f} | {t['float32 forward'] / t['int8 forward']:.2f}x | |")
        print(f"| pipeline (panoptic) | {t['int8 pipeline']:.3f} | {t['float32 pipeline']:.3f} | "
              f"{t['float32 pipeline'] / t['int8 pipeline']:.2f}x | {t['reference pipeline'] / t['int8 pipeline']:.2f}x |")
        print(f"int8 vs float32: logits max rel. diff {fast_error:.3f}; panoptic labels identical {f_labels}, "
              f"pixels with the same label {f_pixels:.4f}")
        print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
