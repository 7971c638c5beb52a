"""omniseg vs the reference implementation on the same OneFormer weights and photo.

Builds the published OneFormer Swin-T ADE20k architecture (embed 96, depths 2-2-6-2, window
7, 150 queries, 150 classes, width 256, 6 deformable encoder and 10 decoder layers, 2 query
transformer layers; images resized to a 512 short side) with random weights, the test
suite's tiny CLIP tokenizer and class-info file, saves it once, loads it in both libraries and, interleaved in one process, times
the forward and the whole image-segmentation pipeline for each subtask on a 640x480 CamVid
photo; peak memory is the rise of a fresh process's peak RSS over one pipeline call.
Answers are checked first (segment labels, and the share of pixels with the same label).

    python benchmarks/bench_oneformer.py [--repeats 5] [--threads N] [--quick]

The reference's OneFormer post-processing resizes with torchvision; where torchvision is not
installed (this project's environments) the same PyTorch call stands in for it (see
``tests/test_oneformer.py``). Needs the test extra (``transformers``, ``tokenizers``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    interleaved,
    max_relative_error,
    peak_rss_rise_mb,
    perturb,
    photo,
    print_stage_table,
    same_segments,
    swin_t_backbone,
)

SUBTASKS = ("panoptic", "instance", "semantic")
THRESHOLD = 0.5


def provide_reference_resize() -> None:
    """torchvision's ``resize`` for the reference's OneFormer post-processing, where it is missing."""
    from transformers.models.oneformer import image_processing_pil_oneformer as module

    if hasattr(module, "tvF"):
        return

    def resize(image: torch.Tensor, size, interpolation) -> torch.Tensor:
        return torch.nn.functional.interpolate(image, size=list(size), mode="bilinear", align_corners=False, antialias=True)

    module.tvF = SimpleNamespace(resize=resize, InterpolationMode=SimpleNamespace(BILINEAR="bilinear"))


def build_checkpoint(directory: Path, *, quick: bool) -> None:
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation

    sys.path.insert(0, str(REPO / "tests"))
    from reference_oneformer import save_reference_processor

    backbone = swin_t_backbone(quick=quick, drop_path_rate=0.3)
    config = OneFormerConfig(backbone_config=backbone, id2label={i: f"class_{i}" for i in range(150)})
    torch.manual_seed(0)
    model = OneFormerForUniversalSegmentation(config).eval()
    perturb(model)
    with torch.no_grad():
        # Random init gives every query the task token's class and mask; distinct query
        # positions and a sharper class head give the photo several segments per task.
        model.model.transformer_module.queries_embedder.weight.normal_(0.0, 2.5)
        model.model.transformer_module.decoder.class_embed.weight.mul_(10)
    model.save_pretrained(directory)
    # The hub checkpoints' layout: preprocessor_config.json, vocab.json + merges.txt, and a
    # class-info file (the reference's instance post-processing needs one).
    save_reference_processor(
        directory, num_labels=150, task_seq_length=77, shortest_edge=512, longest_edge=2048, tokenizer_json=False
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="shallower backbone, for a smoke run")
    args = parser.parse_args()

    import warnings

    import transformers

    import omniseg

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    provide_reference_resize()
    if args.threads:
        torch.set_num_threads(args.threads)
    image = photo()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build_checkpoint(directory, quick=args.quick)
        ours = omniseg.pipeline("image-segmentation", model=directory)
        ref = transformers.pipeline("image-segmentation", model=str(directory), device="cpu")
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
        print(f"model: random OneFormer Swin-T ADE20k architecture{' (quick: depths 2-2-2-2)' if args.quick else ''}")

        # Same answers first: a speed-up that changes the answer does not count.
        for subtask in SUBTASKS:
            kwargs = {} if subtask == "semantic" else {"threshold": THRESHOLD}
            a, b = ours(image, subtask=subtask, **kwargs), ref(image, subtask=subtask, **kwargs)
            labels_same, pixels_same = same_segments(a, b)
            print(f"- {subtask}: {len(a)} segments (reference {len(b)}), labels identical {labels_same}, "
                  f"pixels with the same label {pixels_same:.6f}")

        ref_inputs = ref.preprocess(image, subtask="panoptic")
        ref_inputs.pop("target_size")
        _, our_inputs = next(ours._batches([image], 1, "panoptic"))
        with torch.inference_mode():
            ref_out, our_out = ref.model(**ref_inputs), ours.model(**our_inputs)
        error = max_relative_error(our_out, ref_out, ("class_queries_logits", "masks_queries_logits"))
        same_inputs = all(torch.equal(our_inputs[k], ref_inputs[k]) for k in ("pixel_values", "task_inputs"))
        print(f"- model inputs identical: {same_inputs}; forward logits max |ours - reference| / max |reference| "
              f"= {error:.1e}")

        def forward(model, inputs):
            with torch.inference_mode():
                model(**inputs)

        fns = {
            "forward omniseg": lambda: forward(ours.model, our_inputs),
            "forward reference": lambda: forward(ref.model, ref_inputs),
        }
        for subtask in SUBTASKS:
            kwargs = {} if subtask == "semantic" else {"threshold": THRESHOLD}
            fns[f"{subtask} omniseg"] = lambda s=subtask, k=kwargs: ours(image, subtask=s, **k)
            fns[f"{subtask} reference"] = lambda s=subtask, k=kwargs: ref(image, subtask=s, **k)
        times = interleaved(fns, args.repeats)

        print(f"\n640x480 photo (resized to 683x512), medians of {args.repeats} interleaved runs:")
        print_stage_table(
            (name if name == "forward" else f"pipeline ({name})", times[f"{name} omniseg"], times[f"{name} reference"])
            for name in ("forward", *SUBTASKS)
        )

        prepare = "bench_oneformer:provide_reference_resize"
        ours_mb = peak_rss_rise_mb("omniseg", directory, THRESHOLD, args.threads, prepare_reference=prepare)
        ref_mb = peak_rss_rise_mb("reference", directory, THRESHOLD, args.threads, prepare_reference=prepare)
        print(f"\npeak RSS rise over the first panoptic pipeline call after loading (fresh process each): "
              f"omniseg {ours_mb:.0f} MB, reference {ref_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
