"""omniseg vs the reference implementation on the same MaskFormer weights and photo.

Builds the published MaskFormer Swin-T ADE20k architecture (embed 96, depths 2-2-6-2, window
7, FPN 256, 6 DETR decoder layers, 100 queries, 150 classes) with random weights, then runs
``bench_pipeline.py``'s measurements on it (answers checked first; preprocessing, forward,
each post-processing path, the pipeline and batches timed interleaved in one process; peak
memory in fresh processes; int8 mode last):

    python benchmarks/bench_maskformer.py [--repeats 7] [--threshold 0] [--threads N] [--quick]

Needs the test extra (``transformers``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline  # noqa: E402
from _common import perturb, swin_t_backbone  # noqa: E402


def build_checkpoint(directory: Path, *, quick: bool) -> None:
    from transformers import DetrConfig, MaskFormerConfig, MaskFormerForInstanceSegmentation
    from transformers.models.maskformer.image_processing_pil_maskformer import MaskFormerImageProcessorPil

    decoder = DetrConfig(num_queries=100, use_timm_backbone=False)
    config = MaskFormerConfig(
        backbone_config=swin_t_backbone(quick=quick),
        decoder_config=decoder.to_dict(),
        id2label={i: f"class_{i}" for i in range(150)},
    )
    torch.manual_seed(0)
    model = MaskFormerForInstanceSegmentation(config).eval()
    perturb(model)
    with torch.no_grad():
        # Random init gives every query the same near-uniform class and mask; distinct query
        # embeddings and a sharper class head give the photo several segments, as a trained
        # model would.
        model.model.transformer_module.queries_embedder.weight.normal_(0.0, 3.0)
        model.class_predictor.weight.mul_(10)
    model.save_pretrained(directory)
    MaskFormerImageProcessorPil(size={"shortest_edge": 384, "longest_edge": 1333}, size_divisor=32).save_pretrained(
        directory
    )


def main() -> int:
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), quick=quick)
        args = [a for a in sys.argv[1:] if a != "--quick"]
        sys.argv = [sys.argv[0], "--model", tmp, *args]
        return bench_pipeline.main()


if __name__ == "__main__":
    sys.exit(main())
