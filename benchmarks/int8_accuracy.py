"""Mean IoU of a model in float32 and in the int8 fast CPU mode, per CamVid drive.

Runs ``omniseg evaluate`` (semantic) twice per part, with and without ``--quantize int8``:
CamVid val (drive 0016E5: frames the bundled default model did not train on) and each drive
of train (0001TP, 0006R0, 0016E5: seen in training, reported per drive). Prints a table of
mean IoU and pixel accuracy with the difference in points.

    python benchmarks/int8_accuracy.py [--model DIR] [--data CAMVID_DIR] [--max-images N] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# This checkout's omniseg, not whichever one the environment has installed.
sys.path.insert(0, str(REPO))
PARTS = [("val", None), ("train", "0001TP"), ("train", "0006R0"), ("train", "0016E5")]


def evaluate(model: str | None, data: Path, split: str, group: str | None, quantize: str | None,
             max_images: int | None, out: Path) -> dict:
    from omniseg.cli.main import main

    args = ["evaluate", "--data", str(data), "--split", split, "--examples", "0", "--out", str(out)]
    args += ["--model", model] if model else []
    args += ["--group-by", "^([^_]+)_", "--groups", group] if group else []
    args += ["--quantize", quantize] if quantize else []
    args += ["--max-images", str(max_images)] if max_images else []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = main(args)
    if status != 0:
        raise SystemExit(f"omniseg {' '.join(args)} exited with {status}")
    return json.loads((out / "metrics.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory or hub id (default: the bundled model)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "camvid")
    parser.add_argument("--max-images", type=int, help="the first N images of each part only")
    parser.add_argument("--out", type=Path, help="keep each run's evaluate outputs here")
    args = parser.parse_args()

    print("| part | images | mean IoU float32 | mean IoU int8 | difference (points) | pixel acc. float32 | pixel acc. int8 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for split, group in PARTS:
            name = f"{split}-{group}" if group else split
            runs = {
                mode: evaluate(args.model, args.data, split, group, mode, args.max_images, root / f"{name}-{mode or 'float32'}")
                for mode in (None, "int8")
            }
            f32, int8 = runs[None], runs["int8"]
            label = f"{split} (drive {group}, trained on)" if group else f"{split} (drive 0016E5, not trained on)"
            print(f"| {label} | {f32['images']} | {f32['metrics']['mean_iou']:.4f} | {int8['metrics']['mean_iou']:.4f} | "
                  f"{100 * (int8['metrics']['mean_iou'] - f32['metrics']['mean_iou']):+.2f} | "
                  f"{f32['metrics']['overall_accuracy']:.4f} | {int8['metrics']['overall_accuracy']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
