"""Copy a CamVid-layout dataset with its images as JPEG, to fit an upload limit.

An accelerator machine receives the working tree plus at most 64 MiB; CamVid's 701 PNG
frames are 122 MB, as JPEG at quality 95 they fit. Labels, ``id2label.json`` and the
README are copied unchanged (labels must stay lossless), so ``omniseg train`` and
``omniseg evaluate`` read the copy like the original (images and labels pair by file stem).
Training on the copy is a small extra augmentation; score held-out drives on the PNGs.

    python configs/default_model/jpeg_copy.py ../shared/datasets/camvid .gpu/camvid [--quality 95]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image


def copy_dataset(source: Path, target: Path, quality: int) -> int:
    """Write ``target``; return its size in bytes."""
    for name in ("id2label.json", "README.md"):
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
    shutil.copytree(source / "labels", target / "labels", dirs_exist_ok=True)
    for image in sorted((source / "images").rglob("*")):
        if not image.is_file():
            continue
        out = (target / "images" / image.relative_to(source / "images")).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(image) as frame:
            frame.convert("RGB").save(out, quality=quality)
    return sum(path.stat().st_size for path in target.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    size = copy_dataset(args.source, args.target, args.quality)
    print(f"{args.target}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
