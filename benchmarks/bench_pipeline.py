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
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# This checkout's omniseg, not whichever one the environment has installed.
sys.path.insert(0, str(REPO))
CAMVID_FRAME = REPO.parent / "shared" / "datasets" / "camvid" / "images" / "val" / "0016E5_07959.png"


def build_checkpoint(directory: Path, *, quick: bool) -> None:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    from transformers import Mask2FormerImageProcessor

    backbone = SwinConfig(
        embed_dim=96,
        depths=[2, 2, 2, 2] if quick else [2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        num_queries=100,
        id2label={i: f"class_{i}" for i in range(133)},
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
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


def photo() -> Image.Image:
    if CAMVID_FRAME.is_file():
        return Image.open(CAMVID_FRAME).convert("RGB").resize((640, 480), Image.BILINEAR)
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))


def machine_report() -> list[str]:
    """Lines that tell figures from different machines apart: the CPU (model, family/model
    numbers and the vector extensions that decide the kernels), torch's build (BLAS, oneDNN,
    OpenMP, the CPU capability it dispatches to), the products' paths, threads and load."""
    cpu = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            cpu.setdefault(name.strip(), value.strip())
    flags = set(cpu.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    lines = [
        f"CPU: {cpu.get('model name') or platform.processor() or platform.machine()}"
        f" (vendor {cpu.get('vendor_id', '?')}, family {cpu.get('cpu family', '?')}, model {cpu.get('model', '?')}),"
        f" {os.cpu_count()} logical CPUs; extensions: {', '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}",
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
    ]
    build = [line.strip(" -") for line in torch.__config__.show().splitlines()]
    lines += [f"  build: {line}" for line in build if line.startswith(("Intel(R)", "OpenMP", "LAPACK", "BLAS"))]
    from omniseg.ops.linear import _ONEDNN_LINEAR

    lines.append(
        "products: omniseg linear layers on "
        + ("oneDNN matmul (packed weights)" if _ONEDNN_LINEAR and torch.backends.mkldnn.enabled else "F.linear (BLAS)")
        + f", reference's on F.linear ({'MKL' if torch.backends.mkl.is_available() else 'BLAS'} sgemm); "
        f"convolutions on {'oneDNN' if torch.backends.mkldnn.enabled else 'ATen'}; "
        f"int8 dynamic quantization engine {torch.backends.quantized.engine}"
    )
    lines += kernel_paths()
    lines.append(f"threads {torch.get_num_threads()}; load average {load_average()}")
    return lines


def kernel_paths() -> list[str]:
    """What MKL and oneDNN say they run, from their verbose logs in a child process: MKL's
    code path for the reference's sgemm (on AMD CPUs it reports a generic "Intel(R)
    Architecture processors" path), oneDNN's ISA and the implementation of one of the
    model's linear shapes and of the FPN's 3x3 convolution."""
    import subprocess

    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from omniseg.ops.linear import linear, PackedWeights
torch.set_num_threads(1)
x, w = torch.randn(4032, 256), torch.randn(1024, 256)
with torch.no_grad():
    torch.nn.functional.linear(x, w)
    linear(x, w, packed=PackedWeights())
    torch.nn.functional.conv2d(torch.randn(1, 256, 24, 32).contiguous(memory_format=torch.channels_last),
                               torch.randn(256, 256, 3, 3), padding=1)
"""
    env = {**os.environ, "MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    lines = []
    for line in out.splitlines():
        if line.startswith("MKL_VERBOSE") and "SGEMM" not in line:
            lines.append("  MKL: " + line.removeprefix("MKL_VERBOSE ").strip())
        elif ",info,cpu,isa:" in line:
            lines.append("  oneDNN ISA: " + line.split("isa:", 1)[1])
        elif ",primitive,exec,cpu," in line and ("inner_product" in line or "convolution" in line):
            fields = line.split(",")
            lines.append(f"  oneDNN {fields[5]}: {fields[6]} ({fields[-2]})")
    return lines or ["  (no MKL / oneDNN verbose output)"]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on a shared machine)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def interleaved(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds per function, running them in turn so machine noise hits both."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_rise_mb(library: str, directory: Path, threshold: float, threads: int | None) -> float:
    """Peak RSS rise over the first pipeline call after loading, in a fresh process (in this
    one, memory freed by earlier runs would be reused and hide the peak)."""
    import subprocess

    code = f"""
import sys, torch
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
if {threads!r}:
    torch.set_num_threads({threads!r})
from bench_pipeline import photo
def read(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
image = photo()
if {library!r} == "omniseg":
    import omniseg
    pipe = omniseg.pipeline("image-segmentation", model={str(directory)!r})
else:
    import transformers
    transformers.logging.set_verbosity_error()
    pipe = transformers.pipeline("image-segmentation", model={str(directory)!r}, device="cpu")
Path("/proc/self/clear_refs").write_text("5")
before = read("VmRSS:")
pipe(image, subtask="panoptic", threshold={threshold!r})
print((read("VmHWM:") - before) / 1024)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def same_segments(a: list[dict], b: list[dict]) -> tuple[bool, float]:
    """(labels equal, fraction of pixels with the same label) of two pipeline answers; a
    pixel's label is its segment's (or none)."""
    labels = [x["label"] for x in a] == [y["label"] for y in b]

    def label_map(answer: list[dict]) -> np.ndarray:
        names = sorted({x["label"] for x in a + b})
        out = np.full(np.asarray((a or b)[0]["mask"]).shape, -1) if (a or b) else np.zeros(0)
        for x in answer:
            out[np.asarray(x["mask"]) > 0] = names.index(x["label"])
        return out

    if not a and not b:
        return labels, 1.0
    return labels, float((label_map(a) == label_map(b)).mean())


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
        logit_error = max(
            ((getattr(our_out, k) - getattr(ref_out, k)).abs().max() / getattr(ref_out, k).abs().max()).item()
            for k in ("class_queries_logits", "masks_queries_logits")
        )
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
        rows = [("load (pipeline construction)", load["omniseg"], load["reference"])]

        def stage(name, ours_fn, ref_fn):
            t = interleaved({"omniseg": ours_fn, "reference": ref_fn}, args.repeats)
            rows.append((name, t["omniseg"], t["reference"]))

        stage("preprocess", lambda: ours.processor(images=[image], return_tensors="pt"),
              lambda: ref.image_processor(images=[image], return_tensors="pt"))

        def forward(model, inputs):
            with torch.inference_mode():
                model(**inputs)

        stage("forward", lambda: forward(ours.model, our_inputs), lambda: forward(ref.model, ref_inputs))
        for name in ("panoptic", "instance"):
            fn = f"post_process_{name}_segmentation"
            stage(
                f"post-process {name}",
                lambda fn=fn: getattr(ours.processor, fn)(our_out, threshold=args.threshold, target_sizes=target),
                lambda fn=fn: getattr(ref.image_processor, fn)(ref_out, threshold=args.threshold, target_sizes=target),
            )
        stage("post-process semantic",
              lambda: ours.processor.post_process_semantic_segmentation(our_out, target_sizes=target),
              lambda: ref.image_processor.post_process_semantic_segmentation(ref_out, target_sizes=target))
        stage("pipeline (panoptic)", lambda: ours(image, **kwargs), lambda: ref(image, **kwargs))

        print("\n| stage | omniseg (s) | reference (s) | reference / omniseg |")
        print("|---|---|---|---|")
        for name, o, r in rows:
            print(f"| {name} | {o:.3f} | {r:.3f} | {r / o:.2f}x |")
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
        fast_error = max(
            ((getattr(fast_out, k) - getattr(our_out, k)).abs().max() / getattr(our_out, k).abs().max()).item()
            for k in ("class_queries_logits", "masks_queries_logits")
        )
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
