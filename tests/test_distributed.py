"""The Ray engine (``omniseg segment --engine ray``) and ``segment_dataset``, on a local
2-CPU Ray instance, against the local engine, with a tiny model and 12 real CamVid frames."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from reference_models import build_reference_mask2former

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install -e '.[ray]')")

import ray  # noqa: E402

from omniseg.cli.main import main  # noqa: E402
from omniseg.io.images import load_image  # noqa: E402
from omniseg.io.results import segments_to_records  # noqa: E402

pytestmark = pytest.mark.slow

FRAMES = 12
BROKEN = "broken.png"


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One small local instance for the module: the engine uses it instead of starting its own."""
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_reference_mask2former(tmp_path_factory.mktemp("models") / "tiny-m2f")


@pytest.fixture(scope="module")
def frames(camvid_dir, tmp_path_factory) -> Path:
    """12 real frames and one truncated PNG, in one folder."""
    folder = tmp_path_factory.mktemp("frames")
    for path in sorted((camvid_dir / "images" / "val").glob("*.png"))[:FRAMES]:
        shutil.copy(path, folder / path.name)
    whole = next(folder.iterdir()).read_bytes()
    (folder / BROKEN).write_bytes(whole[: len(whole) // 3])
    return folder


def _segment(frames: Path, out: Path, model_dir: Path, *extra: str) -> int:
    return main(["segment", str(frames), "--out", str(out), "--model", str(model_dir),
                 "--task", "instance", "--threshold", "0", *extra])


@pytest.fixture(scope="module")
def local_out(frames, model_dir, tmp_path_factory) -> Path:
    """The local engine's files, one image per forward pass, on one thread like each actor:
    an image's numbers do not depend on its batch, but they do on the thread count (products
    split their sums otherwise), to the last printed digit now and then."""
    import torch

    out = tmp_path_factory.mktemp("local") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _segment(frames, out, model_dir) == 1  # the broken file
    finally:
        torch.set_num_threads(threads)
    return out


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def test_ray_engine_writes_the_local_engines_files_and_reruns_write_nothing(
    frames, model_dir, local_out, tmp_path, capsys
):
    out = tmp_path / "out"
    # local_out was made one image at a time; each image's answer must not depend on its batch.
    assert _segment(frames, out, model_dir, "--engine", "ray", "--actors", "2", "--batch-size", "2") == 1
    assert f"{FRAMES} segmented, 0 already done, 1 failed" in capsys.readouterr().err

    local, distributed = _files(local_out), _files(out)
    assert sorted(distributed) == sorted(local)
    assert len(local) == 3 * FRAMES + 1  # JSON, label map and overlay per frame; errors.jsonl
    assert all(json.loads(local[name])["segments"] for name in local if name.endswith(".json")
               and name != "errors.jsonl")
    for name in local:
        assert distributed[name] == local[name], name  # byte for byte, JSON and PNGs
    assert _errors(out) == _errors(local_out)
    assert _errors(out)[0]["file"] == str(frames / BROKEN)
    assert "truncated" in _errors(out)[0]["reason"]

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "errors.jsonl"}
    assert _segment(frames, out, model_dir, "--engine", "ray", "--actors", "2", "--batch-size", "2") == 1
    assert f"0 segmented, {FRAMES} already done, 1 failed" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "errors.jsonl"} == stamps
    assert [e["file"] for e in _errors(out)] == [str(frames / BROKEN)]


def test_segment_dataset_gives_the_pipelines_segments(frames, model_dir, single_thread_per_test):
    """Each actor runs one thread (one CPU each), and so does the pipeline here: the same
    order of float sums, so the same numbers (with two threads here, a score differed in its
    sixth decimal on an AMD Zen 3 core)."""
    import omniseg
    from omniseg.distributed import SEGMENT_COLUMNS, segment_dataset

    paths = [str(p) for p in sorted(frames.glob("0*.png"))[:3]] + [str(frames / BROKEN)]
    encoded = ray.data.read_binary_files(paths, include_paths=True)
    arrays = ray.data.from_items([{"image": np.asarray(load_image(p)), "path": p} for p in paths[:2]])
    rows = (
        segment_dataset(encoded, model=model_dir, task="instance", threshold=0.0, image_column="bytes").take_all()
        + segment_dataset(arrays, model=model_dir, task="instance", threshold=0.0, actors=2).take_all()
    )
    assert len(rows) == 6 and all(set(SEGMENT_COLUMNS) <= set(row) for row in rows)

    seg = omniseg.pipeline("image-segmentation", model=model_dir)
    for row in rows:
        if row["path"].endswith(BROKEN):
            assert row["error_type"] == "ImageReadError" and "truncated" in row["error"]
            assert row["labels"] == [] and row["width"] is None
            continue
        assert row["error"] is None, row["error"]
        records = segments_to_records(seg(row["path"], subtask="instance", threshold=0.0), seg.id2label)
        assert len(records) > 0
        assert (row["width"], row["height"]) == (480, 360)
        assert row["label_ids"] == [r["label_id"] for r in records]
        assert row["labels"] == [r["label"] for r in records]
        assert row["scores"] == [r["score"] for r in records]
        assert row["areas"] == [r["area"] for r in records]
        assert [list(box) for box in row["boxes"]] == [r["bbox"] for r in records]
        assert row["rles"] == [r["segmentation"]["counts"] for r in records]
    assert sum(not row["path"].endswith(BROKEN) for row in rows) == 5


def test_segment_dataset_quantize_gives_the_int8_pipelines_segments(frames, model_dir, single_thread_per_test):
    import omniseg
    from omniseg.distributed import segment_dataset

    path = str(sorted(frames.glob("0*.png"))[0])
    ds = ray.data.read_binary_files([path], include_paths=True)
    (row,) = segment_dataset(ds, model=model_dir, task="instance", threshold=0.0, image_column="bytes",
                             quantize="int8").take_all()
    int8 = omniseg.pipeline("image-segmentation", model=model_dir, quantize="int8")
    records = segments_to_records(int8(path, subtask="instance", threshold=0.0), int8.id2label)
    assert row["error"] is None and len(records) > 0
    assert row["scores"] == [r["score"] for r in records]
    assert row["rles"] == [r["segmentation"]["counts"] for r in records]


def _segmenting_actors() -> dict[str, dict]:
    # Ray's actor table (the state API needs the dashboard, which this instance runs without).
    from ray._private import state

    return {
        actor_id: actor
        for actor_id, actor in state.actors().items()
        if "SegmentImages" in actor["ActorClassName"] and actor["State"] == "ALIVE"
    }


def test_a_killed_actor_loses_and_duplicates_nothing(frames, model_dir, local_out, tmp_path, capsys):
    out = tmp_path / "out"
    earlier = set(_segmenting_actors())  # an earlier test's pool may not be gone yet
    status: list[int] = []
    run = threading.Thread(target=lambda: status.append(
        _segment(frames, out, model_dir, "--engine", "ray", "--actors", "2", "--batch-size", "1")
    ))
    run.start()
    killed, done_at_kill = None, None
    deadline = time.monotonic() + 240
    while run.is_alive() and killed is None and time.monotonic() < deadline:
        done = len(list(out.glob("*.json")))
        actors = {key: actor for key, actor in _segmenting_actors().items() if key not in earlier}
        if done >= 1 and len(actors) == 2:
            killed, actor = next(iter(actors.items()))
            done_at_kill = done
            os.kill(actor["Pid"], signal.SIGKILL)
        time.sleep(0.02)
    run.join(timeout=300)
    assert killed is not None, "the run ended before an actor could be killed"
    assert done_at_kill < FRAMES, "the actor was killed after the last image"

    from ray._private import state

    assert state.actors()[killed]["NumRestarts"] >= 1  # Ray restarted it and redid its batch
    assert status == [1]  # the broken file, as before
    assert f"{FRAMES} segmented, 0 already done, 1 failed" in capsys.readouterr().err
    files = _files(out)
    assert sorted(files) == sorted(_files(local_out))  # every output, no temporary leftovers
    assert all(files[name] == data for name, data in _files(local_out).items())
    assert [e["file"] for e in _errors(out)] == [str(frames / BROKEN)]


def test_uri_inputs_are_listed_and_read_through_pyarrow(frames, model_dir, local_out, tmp_path):
    """file:// stands for any pyarrow filesystem (s3://, gs://): a folder keeps its layout,
    a file goes directly into OUT, and the answers are the local engine's."""
    names = sorted(p.name for p in frames.glob("0*.png"))[:3]
    folder = tmp_path / "folder"
    (folder / ".hidden").mkdir(parents=True)
    for name in names[:2]:
        shutil.copy(frames / name, folder / name)
    shutil.copy(frames / names[0], folder / ".hidden" / names[0])  # skipped, as locally
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out"
    status = _segment(folder.as_uri(), out, model_dir, "--engine", "ray", "--no-overlay")
    assert status == 0
    status = _segment((frames / names[2]).as_uri(), out, model_dir, "--engine", "ray", "--no-overlay")
    assert status == 0

    stems = [Path(name).stem for name in names]
    files = _files(out)
    assert sorted(files) == sorted(f"{stem}{suffix}" for stem in stems for suffix in (".json", "_labels.png"))
    local = _files(local_out)
    for stem, name in zip(stems, names):
        assert files[f"{stem}_labels.png"] == local[f"{stem}_labels.png"]
        document, expected = json.loads(files[f"{stem}.json"]), json.loads(local[f"{stem}.json"])
        assert document["segments"] == expected["segments"]
        source = folder / name if name in names[:2] else frames / name
        assert document["image"] == source.as_uri()
        assert document["label_map"] == expected["label_map"]


def test_usage_errors(frames, model_dir, tmp_path, capsys, monkeypatch):
    image = str(next(frames.glob("0*.png")))
    out = tmp_path / "out"
    assert _segment("s3://bucket/photos/", out, model_dir) == 2  # the local engine reads no URIs
    assert "need --engine ray" in capsys.readouterr().err
    assert _segment(image, out, model_dir, "--engine", "ray", "--device", "cuda") == 2
    assert "--gpus-per-actor" in capsys.readouterr().err
    assert _segment(image, out, model_dir, "--engine", "ray", "--quantize", "int8", "--gpus-per-actor", "1") == 2
    assert "--quantize int8 runs on the CPU: not with --gpus-per-actor" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray.data", None)  # as if Ray Data were not installed
    assert _segment(image, out, model_dir, "--engine", "ray") == 2
    assert "pip install 'omniseg[ray]'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("prompt", [["--task", "everything", "--threshold", "0.5"], ["--points", "100,80;200,120"]],
                         ids=["everything", "points"])
def test_segment_anything_on_ray_writes_the_local_engines_files(frames, tmp_path, prompt):
    """A Segment Anything model through --engine ray: the mask generator (or the prompt) of
    the local run in each actor, the same files, the broken file reported."""
    from reference_sam import TINY_SAM_CONFIGS, build_reference_sam

    sam_dir = build_reference_sam(tmp_path / "sam", perturb=0.3, **TINY_SAM_CONFIGS["deep"])
    subset = tmp_path / "frames"
    subset.mkdir()
    for path in sorted(frames.glob("0*.png"))[:2] + [frames / BROKEN]:
        shutil.copy(path, subset / path.name)
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        command = ["segment", str(subset), "--out", str(outs[engine]), "--model", str(sam_dir), *prompt]
        assert main(command + (["--engine", "ray", "--actors", "1"] if engine == "ray" else [])) == 1
    assert _files(outs["ray"]) == _files(outs["local"])
    documents = [json.loads(p.read_text()) for p in outs["ray"].glob("*.json")]
    assert len(documents) == 2 and all(d["segments"] for d in documents)
    assert [e["file"] for e in _errors(outs["ray"])] == [str(subset / BROKEN)]


def test_the_bundled_model_on_ray_writes_the_local_engines_files(frames, tmp_path, monkeypatch):
    """No --model: each actor loads the bundled model, as the local engine does; 'default' is
    only the name the files record (the actors used to look it up as a hub id and die, so the
    run ended in a traceback). Relative paths, as a user in another folder types them."""
    import torch

    subset = tmp_path / "frames"
    subset.mkdir()
    for path in sorted(frames.glob("0*.png"))[:2] + [frames / BROKEN]:
        shutil.copy(path, subset / path.name)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor runs: the same numbers to the last digit
    try:
        assert main(["segment", "frames", "--out", "local"]) == 1
    finally:
        torch.set_num_threads(threads)
    assert main(["segment", "frames", "--out", "ray", "--engine", "ray", "--actors", "1"]) == 1
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    documents = [json.loads(p.read_text()) for p in (tmp_path / "ray").glob("*.json")]
    assert len(documents) == 2 and all(d["model"] == "default" and d["segments"] for d in documents)
    assert [e["file"] for e in _errors(tmp_path / "ray")] == [str(Path("frames") / BROKEN)]


def test_relative_paths_reach_an_instance_started_in_another_folder(frames, model_dir, tmp_path, monkeypatch):
    """The module's Ray instance started in the folder pytest ran in; the user types paths
    relative to where they are. Actors read the images and load the model by absolute path
    (they used to look for them in their own working folder: 'file not found' for every
    image), while the JSONs and errors.jsonl keep the names as typed."""
    subset = tmp_path / "frames"
    subset.mkdir()
    for path in sorted(frames.glob("0*.png"))[:1] + [frames / BROKEN]:
        shutil.copy(path, subset / path.name)
    shutil.copytree(model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    command = ["segment", "frames", "--model", "model", "--task", "instance", "--threshold", "0"]
    assert main(command + ["--out", "local"]) == 1
    assert main(command + ["--out", "ray", "--engine", "ray", "--actors", "1"]) == 1
    assert [e["file"] for e in _errors(tmp_path / "ray")] == [str(Path("frames") / BROKEN)]
    assert "truncated" in _errors(tmp_path / "ray")[0]["reason"]
    (document,) = [json.loads(p.read_text()) for p in (tmp_path / "ray").glob("*.json")]
    (expected,) = [json.loads(p.read_text()) for p in (tmp_path / "local").glob("*.json")]
    assert document["image"] == expected["image"] == str(Path("frames") / next(subset.glob("0*.png")).name)
    assert document["model"] == expected["model"] == "model"
