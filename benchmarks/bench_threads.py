"""How the bundled default model's latency depends on OpenMP's wait policy and on other load.

PyTorch's OpenMP threads spin while they wait for work unless told to sleep
(``OMP_WAIT_POLICY=PASSIVE``, which ``import omniseg`` sets when torch is not loaded yet).
Each configuration runs in a fresh process: ``spin`` imports torch before omniseg (OpenMP
keeps its default, spinning waiters), ``passive`` imports omniseg first. ``--busy N`` starts
N processes that keep one core each busy (another user's job), as a shared machine has.
Configurations are interleaved over ``--rounds``; the table gives the median ms per frame
(480x360 CamVid frames, panoptic, whole pipeline calls).

    python benchmarks/bench_threads.py [--threads 1,2] [--busy 0,1] [--frames 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
mode, threads, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "spin":
    import torch  # OpenMP starts before omniseg can ask for sleeping waiters
import omniseg, torch
sys.path.insert(0, {benchmarks!r})
from bench_default_model import frames as load_frames
torch.set_num_threads(threads)
seg = omniseg.pipeline("image-segmentation")
images = load_frames(frames)
seg(images[0], subtask="panoptic")
times = []
for image in images:
    start = time.perf_counter()
    seg(image, subtask="panoptic")
    times.append(time.perf_counter() - start)
print(sorted(times)[len(times) // 2] * 1000)
"""


@contextlib.contextmanager
def busy_cores(count: int):
    """``count`` processes that each spin on a core until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def run(mode: str, threads: int, frames: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    code = CHILD.format(benchmarks=str(REPO / "benchmarks"))
    result = subprocess.run([sys.executable, "-c", code, mode, str(threads), str(frames)],
                            env=env, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--busy", default="0,1", help="numbers of busy cores to try (comma-separated)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    busy = [int(b) for b in args.busy.split(",")]
    print(f"{cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start; "
          f"{args.frames} frames x {args.rounds} rounds per configuration")
    results: dict[tuple[int, str, int], list[float]] = {}
    for _ in range(args.rounds):
        for count in busy:
            with busy_cores(count):
                for mode in ("spin", "passive"):
                    for thread_count in threads:
                        results.setdefault((count, mode, thread_count), []).append(run(mode, thread_count, args.frames))
    print("| busy cores | threads | spinning waiters (ms/frame) | sleeping waiters (ms/frame) | spin / sleep |")
    print("|---|---|---|---|---|")
    for count in busy:
        for thread_count in threads:
            spin = statistics.median(results[(count, "spin", thread_count)])
            passive = statistics.median(results[(count, "passive", thread_count)])
            print(f"| {count} | {thread_count} | {spin:.0f} | {passive:.0f} | {spin / passive:.2f} |")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
