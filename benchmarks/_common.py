"""Helpers shared by the benchmarks that time omniseg against the reference implementation
(``transformers``) on the same weights: the photo, the machine report, interleaved timing,
peak memory in a fresh process, answer checks, and the random checkpoints' common parts.

A helper module, not a benchmark: the scripts beside it import it.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# This checkout's omniseg, not whichever one the environment has installed.
sys.path.insert(0, str(REPO))
CAMVID_FRAME = REPO.parent / "shared" / "datasets" / "camvid" / "images" / "val" / "0016E5_07959.png"

Stage = tuple[Callable[[], Any], Callable[[], Any]]  # (omniseg's step, the reference's)


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
    from omniseg.pipelines.image_segmentation import int8_engine

    lines.append(
        "products: omniseg linear layers on "
        + ("oneDNN matmul (packed weights)" if _ONEDNN_LINEAR and torch.backends.mkldnn.enabled else "F.linear (BLAS)")
        + f", reference's on F.linear ({'MKL' if torch.backends.mkl.is_available() else 'BLAS'} sgemm); "
        f"convolutions on {'oneDNN' if torch.backends.mkldnn.enabled else 'ATen'}; "
        f"int8 mode's quantization engine {int8_engine()}"
    )
    lines += kernel_paths()
    lines.append(f"threads {torch.get_num_threads()}; load average {load_average()}")
    return lines


def kernel_paths() -> list[str]:
    """What MKL and oneDNN say they run, from their verbose logs in a child process: MKL's
    code path for the reference's sgemm (on AMD CPUs it reports a generic "Intel(R)
    Architecture processors" path), oneDNN's ISA and the implementation of one of the
    model's linear shapes and of the FPN's 3x3 convolution."""
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



def peak_rss_rise_mb(
    library: str, directory: Path, threshold: float, threads: int | None, prepare_reference: str = ""
) -> float:
    """Peak RSS rise over the first panoptic pipeline call after loading, in a fresh process (in
    this one, memory freed by earlier runs would be reused and hide the peak).

    ``prepare_reference`` (``"module:function"``, importable from benchmarks/) is called before
    the reference's pipeline is built.
    """
    module, _, function = prepare_reference.partition(":")
    prepare = f"from {module} import {function}; {function}()" if prepare_reference else ""
    code = f"""
import sys, torch
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
if {threads!r}:
    torch.set_num_threads({threads!r})
from _common import photo
def read(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
image = photo()
if {library!r} == "omniseg":
    import omniseg
    pipe = omniseg.pipeline("image-segmentation", model={str(directory)!r})
else:
    import transformers
    transformers.logging.set_verbosity_error()
    {prepare}
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



def max_relative_error(ours: Any, reference: Any, fields: Iterable[str]) -> float:
    """The largest ``max |ours - reference| / max |reference|`` over the outputs' ``fields``."""
    return max(relative_errors(ours, reference, fields).values())


def relative_errors(ours: Any, reference: Any, fields: Iterable[str]) -> dict[str, float]:
    """``max |ours - reference| / max |reference|`` of each of the outputs' ``fields``."""
    return {
        k: ((getattr(ours, k) - getattr(reference, k)).abs().max() / getattr(reference, k).abs().max()).item()
        for k in fields
    }


def post_processing_stages(
    ours_processor: Any, ref_processor: Any, our_out: Any, ref_out: Any, target: list[tuple[int, int]], threshold: float
) -> dict[str, Stage]:
    """The panoptic, instance and semantic post-processing of each library's own outputs."""
    stages = {}
    for name in ("panoptic", "instance"):
        fn = f"post_process_{name}_segmentation"
        stages[f"post-process {name}"] = (
            lambda fn=fn: getattr(ours_processor, fn)(our_out, threshold=threshold, target_sizes=target),
            lambda fn=fn: getattr(ref_processor, fn)(ref_out, threshold=threshold, target_sizes=target),
        )
    stages["post-process semantic"] = (
        lambda: ours_processor.post_process_semantic_segmentation(our_out, target_sizes=target),
        lambda: ref_processor.post_process_semantic_segmentation(ref_out, target_sizes=target),
    )
    return stages


def time_stages(stages: dict[str, Stage], repeats: int) -> list[tuple[str, float, float]]:
    """``(stage, omniseg's median s, the reference's median s)`` per stage, in order; each
    stage's two steps timed interleaved (:func:`interleaved`)."""
    rows = []
    for name, (ours_fn, ref_fn) in stages.items():
        t = interleaved({"omniseg": ours_fn, "reference": ref_fn}, repeats)
        rows.append((name, t["omniseg"], t["reference"]))
    return rows


def print_stage_table(rows: Iterable[tuple[str, float, float]]) -> None:
    """A markdown table of :func:`time_stages`' rows, with the speed-up."""
    print("| stage | omniseg (s) | reference (s) | reference / omniseg |")
    print("|---|---|---|---|")
    for name, o, r in rows:
        print(f"| {name} | {o:.3f} | {r:.3f} | {r / o:.2f}x |")


def swin_t_backbone(*, quick: bool, **settings: Any):
    """The published Swin-T backbone (embed 96, depths 2-2-6-2; 2-2-2-2 when ``quick``, for a
    smoke run) as a ``transformers.SwinConfig`` with its four stages out; ``settings``
    override or add fields."""
    from transformers import SwinConfig

    return SwinConfig(
        embed_dim=96,
        depths=[2, 2, 2, 2] if quick else [2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        **settings,
    )


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float = 0.02) -> None:
    """Add ``scale`` times Gaussian noise (global RNG) to every parameter, in place, so no
    weight keeps its initial constant (zero biases, unit norms)."""
    for param in model.parameters():
        param.add_(torch.randn_like(param) * scale)
