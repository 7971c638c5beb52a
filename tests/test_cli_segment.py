"""``omniseg segment`` end to end, with the real pipeline and a tiny real Mask2Former."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from reference_models import build_reference_mask2former

import omniseg
from omniseg.cli.main import main
from omniseg.io.images import load_image
from omniseg.io.results import label_map, segments_to_records
from omniseg.pipelines.image_segmentation import ImageSegmentationPipeline

REPO = Path(__file__).resolve().parents[1]

# Each test runs the real model on a few small images (and one starts a subprocess).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_reference_mask2former(tmp_path_factory.mktemp("models") / "tiny-m2f")


def _picture(seed: int, size: tuple[int, int] = (72, 56)) -> Image.Image:
    """A small synthetic scene: a gradient with a few solid rectangles."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 90)], -1).astype(np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, width - 10), rng.integers(0, height - 10)
        pixels[y0 : y0 + rng.integers(5, 20), x0 : x0 + rng.integers(5, 25)] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Nested folders with good images (two sharing a stem) and three bad files."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b" / "deep").mkdir(parents=True)
    _picture(0).save(root / "a" / "x.png")
    _picture(1, (64, 80)).save(root / "b" / "x.png")  # same stem, other folder
    _picture(2).convert("L").save(root / "b" / "deep" / "gray.jpg")
    (root / "b" / "notes.txt").write_text("not an image, and not picked up by extension\n")
    (root / "bad.jpg").write_text("this is text, not a JPEG\n")
    (root / "empty.png").write_bytes(b"")
    whole = (root / "a" / "x.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(whole[: len(whole) // 2])
    return root


GOOD = {"a/x.png": "a/x", "b/x.png": "b/x", "b/deep/gray.jpg": "b/deep/gray"}
BAD = {"bad.jpg": "not an image", "empty.png": "empty", "b/cut.png": "truncated"}


def _segment(*args: str) -> int:
    return main(["segment", *map(str, args)])


def test_folder_end_to_end_with_bad_files(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    status = _segment(inputs, "--out", out, "--model", model_dir, "--task", "instance",
                      "--threshold", "0", "--batch-size", "2", "--format", "png,json,coco")
    assert status == 1
    stderr = capsys.readouterr().err
    assert "3 segmented" in stderr and "3 failed" in stderr

    # errors.jsonl: one line per bad file, with its type and reason; the batch went on.
    lines = (out / "errors.jsonl").read_text().splitlines()
    errors = {json.loads(line)["file"]: json.loads(line) for line in lines}
    assert sorted(errors) == sorted(str(inputs / rel) for rel in BAD)
    for rel, word in BAD.items():
        entry = errors[str(inputs / rel)]
        assert entry["error"] == "ImageReadError" and word in entry["reason"]

    # Outputs mirror the folders, so a/x and b/x do not collide; nothing else is written.
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = {f"{stem}{suffix}" for stem in GOOD.values() for suffix in (".json", "_labels.png", "_overlay.png")}
    assert written == sorted(expected | {"errors.jsonl", "coco_results.json"})

    # Each image's outputs are what the pipeline itself answers for that image.
    seg = omniseg.pipeline("image-segmentation", model=model_dir)
    id2label = seg.model.config.id2label
    for rel, stem in GOOD.items():
        image = load_image(inputs / rel)
        segments = seg(image, subtask="instance", threshold=0.0)
        document = json.loads((out / f"{stem}.json").read_text())
        assert document["image"] == str(inputs / rel)
        assert (document["width"], document["height"]) == image.size
        assert document["task"] == "instance" and document["model"] == str(model_dir)
        assert document["segments"] == segments_to_records(segments, id2label)
        assert len(document["segments"]) > 0
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        np.testing.assert_array_equal(labels, label_map(segments, id2label, image.size))
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.width > image.width and overlay.height >= image.height

    # The grayscale JPEG was segmented as RGB at its own size.
    gray = json.loads((out / "b/deep/gray.json").read_text())
    assert (gray["width"], gray["height"]) == (72, 56)

    coco = COCO(str(out / "coco_results.json"))
    files = {img["file_name"]: img["id"] for img in coco.dataset["images"]}
    assert sorted(files) == sorted(str(inputs / rel) for rel in GOOD)
    for rel, stem in GOOD.items():
        document = json.loads((out / f"{stem}.json").read_text())
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[files[str(inputs / rel)]]))
        assert [a["segmentation"] for a in anns] == [s["segmentation"] for s in document["segments"]]


def test_rerun_skips_finished_images(model_dir, inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    options = ["--out", out, "--model", model_dir, "--task", "instance", "--threshold", "0"]
    assert _segment(inputs, *options) == 1
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".json", ".png")}
    assert len(stamps) == 9

    calls = []
    real_call = ImageSegmentationPipeline.__call__

    def counting_call(self, images, **kwargs):
        calls.append(len(images))
        return real_call(self, images, **kwargs)

    monkeypatch.setattr(ImageSegmentationPipeline, "__call__", counting_call)
    capsys.readouterr()
    assert _segment(inputs, *options) == 1  # the bad files are retried, and fail again
    assert calls == []  # every good image was already done
    assert "0 segmented, 3 already done, 3 failed" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert len((out / "errors.jsonl").read_text().splitlines()) == 3  # this run's, not appended

    # An image with a missing output counts as unfinished and is done again, alone.
    (out / "b" / "x_overlay.png").unlink()
    assert _segment(inputs, *options) == 1
    assert calls == [1]
    assert (out / "b" / "x_overlay.png").is_file()
    assert (out / "a" / "x.json").stat().st_mtime_ns == stamps[out / "a" / "x.json"]

    # Another task in the same OUT does not keep the old answers: everything is redone.
    calls.clear()
    assert _segment(inputs, "--out", out, "--model", model_dir, "--task", "semantic") == 1
    assert calls == [1, 1, 1]
    assert json.loads((out / "a" / "x.json").read_text())["task"] == "semantic"


def test_all_good_exits_zero_without_a_terminal(model_dir, tmp_path):
    """Run as users do, a subprocess whose stderr is a pipe: the progress bar must cope."""
    folder = tmp_path / "good"
    folder.mkdir()
    _picture(3).save(folder / "one.png")
    _picture(4).convert("RGBA").save(folder / "two.png")
    explicit = tmp_path / "elsewhere" / "one.png"  # same name, named explicitly, other folder
    explicit.parent.mkdir()
    _picture(5).save(explicit)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "omniseg", "segment", str(folder), str(explicit), "--out", str(out),
         "--model", str(model_dir), "--task", "semantic", "--format", "json"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 segmented, 0 already done, 0 failed" in proc.stderr
    assert not (out / "errors.jsonl").exists()
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # The folder's images at OUT's top (its inner layout), the file directly in OUT; the two
    # one.png use their full names, the later one numbered.
    assert written == ["one.png-2.json", "one.png.json", "two.json"]
    assert json.loads((out / "one.png-2.json").read_text())["image"] == str(explicit)
    document = json.loads((out / "two.json").read_text())
    assert document["task"] == "semantic" and document["label_map"] is None
    assert all(s["score"] is None for s in document["segments"])
    assert sum(s["area"] for s in document["segments"]) == 72 * 56  # semantic covers all


def test_files_by_path_write_into_out_and_the_progress_bar_counts_failures(model_dir, tmp_path, capsys, monkeypatch):
    """Files named by absolute and relative paths from another working folder: outputs go
    directly into OUT (not OUT/abs/dir/...); the bar's last counts are the summary's."""
    deep = tmp_path / "some" / "deep" / "dir"
    deep.mkdir(parents=True)
    _picture(8).save(deep / "a.png")
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "broken.png").write_text("not a PNG")
    monkeypatch.chdir(tmp_path)
    out = Path("out")
    assert _segment(deep / "a.png", "rel/broken.png", "--out", out, "--model", model_dir, "--task", "semantic") == 1
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.json", "a_labels.png", "a_overlay.png", "errors.jsonl"]
    stderr = capsys.readouterr().err
    assert "1 segmented, 0 already done, 1 failed" in stderr
    assert stderr.rsplit("failed=", 1)[1].startswith("1"), stderr


def test_same_stem_in_one_folder_and_output_inside_input(model_dir, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    _picture(6).save(folder / "p.png")
    _picture(7).save(folder / "p.jpg")
    out = folder / "results"  # inside the walked folder: its pictures must not become inputs
    options = ["--out", out, "--model", model_dir, "--task", "instance", "--threshold", "0.5"]
    assert _segment(folder, *options) == 0
    assert _segment(folder, *options) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"p.{ext}{suffix}" for ext in ("jpg", "png")
                           for suffix in (".json", "_labels.png", "_overlay.png"))


def test_usage_errors(model_dir, tmp_path, capsys, monkeypatch):
    import omniseg.assets

    _picture(8).save(tmp_path / "a.png")
    # An installation without the bundled default model needs --model.
    monkeypatch.setattr(omniseg.assets, "DEFAULT_MODEL_DIR", tmp_path / "no-default-model")
    assert _segment(tmp_path / "a.png", "--out", tmp_path / "o") == 2
    assert "--model" in capsys.readouterr().err
    monkeypatch.undo()
    assert _segment(tmp_path / "a.png", "--out", tmp_path / "o", "--model", tmp_path / "no-such-model") == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        _segment(tmp_path / "a.png", "--out", tmp_path / "o", "--model", model_dir, "--format", "png,tiff")
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        _segment(tmp_path / "a.png", "--out", tmp_path / "o", "--model", model_dir, "--threshold", "2")
    assert info.value.code == 2
    (tmp_path / "file").write_text("x")
    assert _segment(tmp_path / "a.png", "--out", tmp_path / "file", "--model", model_dir) == 2
    assert not (tmp_path / "o").exists()  # nothing written on a usage error


def test_inputs_without_any_image_are_a_usage_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no images here\n")
    (notes / ".hidden.png").write_bytes(b"")
    # Exited 0 having done nothing, so a mistyped or empty folder passed in scripts. Found
    # before the model loads: the missing --model is never reached.
    for inputs in ([empty], [empty, notes]):
        assert _segment(*inputs, "--out", tmp_path / "o", "--model", tmp_path / "no-such-model") == 2
        err = capsys.readouterr().err
        assert f"error: no image files found in {' '.join(map(str, inputs))}" in err
        assert "no-such-model" not in err
    assert not (tmp_path / "o").exists()


def test_unwritable_out_is_a_usage_error_not_a_traceback(model_dir, tmp_path, capsys):
    _picture(9).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("x")
    # Below a file no folder can be created: a usage error naming OUT, before the model loads.
    assert _segment(tmp_path / "a.png", "--out", tmp_path / "file" / "sub", "--model", model_dir) == 2
    assert "file/sub" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_out_is_a_usage_error(model_dir, tmp_path, capsys):
    _picture(10).save(tmp_path / "a.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this process writes into read-only folders (root with CAP_DAC_OVERRIDE)")
        for out in (locked, locked / "new"):
            assert _segment(tmp_path / "a.png", "--out", out, "--model", model_dir) == 2
            assert "no permission to write" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_rerun_with_another_threshold_redoes_the_images(model_dir, tmp_path, capsys):
    _picture(11).save(tmp_path / "a.png")
    common = [tmp_path / "a.png", "--out", tmp_path / "out", "--model", model_dir, "--task", "instance"]
    assert _segment(*common, "--threshold", "0.9") == 0
    strict = json.loads((tmp_path / "out" / "a.json").read_text())
    assert strict["options"] == {"threshold": 0.9}
    capsys.readouterr()
    # Used to be skipped as "already done", keeping the 0.9 answers under a 0 threshold.
    assert _segment(*common, "--threshold", "0") == 0
    assert "1 segmented, 0 already done" in capsys.readouterr().err
    loose = json.loads((tmp_path / "out" / "a.json").read_text())
    assert loose["options"] == {"threshold": 0.0} and len(loose["segments"]) > len(strict["segments"])
    assert _segment(*common, "--threshold", "0") == 0
    assert "0 segmented, 1 already done" in capsys.readouterr().err
    # The pipeline's default is recorded as no option: a re-run without --threshold redoes it too.
    assert _segment(*common) == 0
    assert "1 segmented" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "a.json").read_text())["options"] == {}


def test_quantize_int8_writes_the_int8_pipelines_answers_and_reruns_redo_float32(model_dir, tmp_path, capsys):
    _picture(5).save(tmp_path / "a.png")
    out = tmp_path / "out"
    arguments = (tmp_path / "a.png", "--out", out, "--model", model_dir, "--task", "instance", "--threshold", "0")
    assert _segment(*arguments, "--quantize", "int8") == 0
    int8 = omniseg.pipeline("image-segmentation", model=model_dir, quantize="int8")
    image = load_image(tmp_path / "a.png")
    document = json.loads((out / "a.json").read_text())
    assert document["options"] == {"threshold": 0.0, "quantize": "int8"}
    assert document["segments"] == segments_to_records(int8(image, subtask="instance", threshold=0.0), int8.id2label)
    capsys.readouterr()
    # Without --quantize the answers are float32's: the image is done again, not skipped.
    assert _segment(*arguments) == 0
    assert "1 segmented, 0 already done" in capsys.readouterr().err
    assert json.loads((out / "a.json").read_text())["options"] == {"threshold": 0.0}


def test_quantize_with_cuda_is_a_usage_error_naming_it(model_dir, tmp_path, capsys, monkeypatch):
    import torch

    _picture(6).save(tmp_path / "a.png")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with a GPU
    arguments = ("--out", tmp_path / "o", "--model", model_dir, "--quantize", "int8", "--device", "cuda")
    assert _segment(tmp_path / "a.png", *arguments) == 2
    assert "--quantize int8: quantize='int8' runs on CPU only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
