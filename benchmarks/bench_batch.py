"""Throughput of ``omniseg segment`` over a folder: the local engine against Ray with 1 and 2 actors.

The local engine runs with all cores' threads (its default) and with one thread (as each
actor does: on a busy machine, two PyTorch threads that wait on each other lose much of
their time when one of them is descheduled).

Each run is a whole command, as a user runs it (``omniseg segment FRAMES --out NEW_DIR ...``,
JSON + label map + overlay per frame, the bundled model unless ``--model``), timed from
start to exit: for Ray that includes starting the actors and loading the model in each,
but not starting the local Ray instance, which is started once (as a cluster would be).
Runs are interleaved in rounds (local, ray 1 actor, ray 2 actors, local, ...) and the
median per configuration is reported, so that load from other processes on a shared
machine falls on all of them alike.

    PYTHONPATH=. python benchmarks/bench_batch.py [--frames 200] [--rounds 2] [--model DIR] [--no-overlay]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMVID_TRAIN = Path(os.environ.get("OMNISEG_SHARED", REPO.parent / "shared")) / "datasets" / "camvid" / "images" / "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="CamVid train frames (default: 200)")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per configuration")
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--no-overlay", action="store_true", help="write label maps and JSON only")
    args = parser.parse_args()

    import ray

    from omniseg.cli.main import main as omniseg_main

    import torch

    cores = os.cpu_count() or 1
    # name -> (PyTorch threads of this process, where the local engine runs; the options)
    configurations = {
        f"local engine, {cores} threads": (cores, ["--engine", "local"]),
        "local engine, 1 thread": (1, ["--engine", "local"]),
        "ray, 1 actor (1 CPU)": (cores, ["--engine", "ray", "--actors", "1", "--cpus-per-actor", "1"]),
        "ray, 2 actors (1 CPU each)": (cores, ["--engine", "ray", "--actors", "2", "--cpus-per-actor", "1"]),
    }
    common = ([] if args.model is None else ["--model", args.model]) + (["--no-overlay"] if args.no_overlay else [])
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    times: dict[str, list[float]] = {name: [] for name in configurations}
    with tempfile.TemporaryDirectory() as scratch:
        frames = Path(scratch) / "frames"
        frames.mkdir()
        for path in sorted(CAMVID_TRAIN.glob("*.png"))[: args.frames]:
            (frames / path.name).symlink_to(path)
        count = len(list(frames.iterdir()))
        if count == 0:
            raise SystemExit(f"no CamVid frames at {CAMVID_TRAIN} (set OMNISEG_SHARED)")
        print(f"{count} CamVid frames 480x360; model: {args.model or 'bundled default'}; "
              f"outputs: JSON, label map{'' if args.no_overlay else ', overlay'}; {args.rounds} rounds; "
              f"{cores} cores, load average {os.getloadavg()[0]:.1f} at start")
        # Untimed: the first command in a process pays one-time costs (imports, numba's cache).
        with contextlib.redirect_stderr(io.StringIO()):
            for _, options in configurations.values():
                omniseg_main(["segment", str(next(frames.iterdir())), "--out", str(Path(scratch) / "warm-up"),
                              *common, *options])
                shutil.rmtree(Path(scratch) / "warm-up")
        for round_number in range(args.rounds):
            for number, (name, (threads, options)) in enumerate(configurations.items()):
                out = Path(scratch) / f"out-{round_number}-{number}"
                torch.set_num_threads(threads)
                log = io.StringIO()  # progress bars and the summary
                start = time.perf_counter()
                with contextlib.redirect_stderr(log):
                    status = omniseg_main(["segment", str(frames), "--out", str(out), *common, *options])
                elapsed = time.perf_counter() - start
                if status != 0:
                    raise SystemExit(f"{name}: omniseg segment exited with {status}:\n{log.getvalue()}")
                times[name].append(elapsed)
                print(f"  round {round_number + 1}: {name}: {elapsed:.1f} s", flush=True)
    ray.shutdown()

    local = statistics.median(next(iter(times.values())))
    print(f"\n| configuration | median s ({args.rounds} runs) | images/s | vs local |")
    print("|---|---|---|---|")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name} | {median:.1f} | {count / median:.2f} | {local / median:.2f}x |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
