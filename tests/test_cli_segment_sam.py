"""``omniseg segment`` with a Segment Anything model: ``--task everything`` and
``--points`` / ``--box`` through the command's batch, resume and errors.jsonl handling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference_sam import TINY_SAM_CONFIGS, build_reference_sam

pytest.importorskip("transformers")

from omniseg.cli.main import main  # noqa: E402
from omniseg.io.results import decode_rle  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread_per_test")


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory) -> Path:
    return build_reference_sam(tmp_path_factory.mktemp("cli-sam"), perturb=0.3, **TINY_SAM_CONFIGS["deep"])


@pytest.fixture
def folder(tmp_path, street_photo) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    street_photo.crop((0, 0, 160, 120)).save(images / "a.png")
    street_photo.crop((200, 100, 330, 230)).save(images / "b.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return images


def test_everything_writes_masks_and_reports_the_broken_file(sam_dir, folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    status = main(["segment", str(folder), "--model", str(sam_dir), "--task", "everything",
                   "--threshold", "0.5", "--out", str(out)])
    assert status == 1
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["file"]).name for e in errors] == ["broken.png"]
    for stem, size in (("a", (160, 120)), ("b", (130, 130))):
        document = json.loads((out / f"{stem}.json").read_text())
        assert document["task"] == "everything"
        assert document["segments"], "the test model gives masks at this threshold"
        scores = [s["score"] for s in document["segments"]]
        assert scores == sorted(scores, reverse=True) and min(scores) > 0.5
        for number, segment in enumerate(document["segments"], start=1):
            assert segment["label"] == f"mask_{number}"
            mask = decode_rle(segment["segmentation"])
            assert mask.shape == (size[1], size[0]) and mask.sum() == segment["area"]
        assert Image.open(out / f"{stem}_overlay.png").size[1] == size[1]
        labels = np.array(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == (size[1], size[0])
    # A re-run skips the finished images and reports the broken one again.
    status = main(["segment", str(folder), "--model", str(sam_dir), "--task", "everything",
                   "--threshold", "0.5", "--out", str(out)])
    assert status == 1
    assert "0 segmented, 2 already done, 1 failed" in capsys.readouterr().err


def test_points_and_box_prompt(sam_dir, folder, tmp_path) -> None:
    out = tmp_path / "out"
    status = main(["segment", str(folder / "a.png"), str(folder / "b.png"), "--model", str(sam_dir),
                   "--points", "20,30;50,60", "--box", "10,10,100,90", "--out", str(out)])
    assert status == 0
    documents = sorted(out.rglob("*.json"))
    assert len(documents) == 2
    for path in documents:
        document = json.loads(path.read_text())
        assert document["task"] == "prompt points=20,30;50,60 box=10,10,100,90"
        assert len(document["segments"]) == 3


def test_prompt_outside_an_image_fails_that_image_only(sam_dir, folder, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copy(folder / "a.png", folder / "wide.png")
    Image.open(folder / "a.png").resize((400, 120)).save(folder / "wide.png")
    status = main(["segment", str(folder), "--model", str(sam_dir), "--points", "300,50", "--out", str(out)])
    assert status == 1
    errors = {Path(e["file"]).name: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {"a.png", "b.png", "broken.png"}
    assert errors["a.png"]["error"] == "PromptError" and "outside" in errors["a.png"]["reason"]
    assert (out / "wide.json").is_file()


@pytest.mark.parametrize(("arguments", "message"), [(["--box", "50,10,20,40"], "x1 < x0"), (["--points", "1,2,3"], "x,y")])
def test_malformed_prompts_are_argument_errors(sam_dir, folder, tmp_path, capsys, arguments, message) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["segment", str(folder), "--model", str(sam_dir), "--out", str(tmp_path / "o"), *arguments])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_sam_model_with_a_subtask_of_classes_is_a_usage_error_saying_what_to_use(sam_dir, folder, tmp_path, capsys) -> None:
    for task in ("semantic", "instance", "panoptic"):
        # Was "--model DIR: cannot load the model: ... use pipeline('mask-generation', ...)":
        # Python advice, and the model was fine.
        assert main(["segment", str(folder), "--model", str(sam_dir), "--out", str(tmp_path / "o"), "--task", task]) == 2
        err = capsys.readouterr().err
        assert f"error: --task {task}: {sam_dir} is a Segment Anything model, which gives masks without classes" in err
        assert "use --task everything (every mask of each image) or --points / --box" in err
        assert "cannot load" not in err and "pipeline(" not in err
    arguments = ["--task", "semantic", "--points", "1,2"]
    assert main(["segment", str(folder), "--model", str(sam_dir), "--out", str(tmp_path / "o"), *arguments]) == 2
    assert "does not apply" in capsys.readouterr().err
    arguments = ["--task", "everything", "--points", "1,2"]  # the points used to win in silence
    assert main(["segment", str(folder), "--model", str(sam_dir), "--out", str(tmp_path / "o"), *arguments]) == 2
    assert "pass one or the other" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantize_with_a_sam_model_is_a_usage_error(sam_dir, folder, tmp_path, capsys) -> None:
    assert main(["segment", str(folder), "--model", str(sam_dir), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    assert "--quantize int8 applies to image-segmentation models" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_task_auto_with_a_sam_model_is_everything(sam_dir, folder, tmp_path, capsys) -> None:
    # "auto" is what the model supports; for Segment Anything that is every mask. It used to
    # be a usage error, so the default task failed with one of the supported models.
    (folder / "broken.png").unlink()
    options = ["--threshold", "0", "--format", "json"]
    assert main(["segment", str(folder), "--model", str(sam_dir), "--out", str(tmp_path / "auto"), *options]) == 0
    assert main(["segment", str(folder), "--model", str(sam_dir), "--out", str(tmp_path / "all"),
                 "--task", "everything", *options]) == 0
    for name in ("a.json", "b.json"):
        auto = json.loads((tmp_path / "auto" / name).read_text())
        everything = json.loads((tmp_path / "all" / name).read_text())
        assert auto["task"] == "everything" and auto["segments"] == everything["segments"]
    # A re-run with the other spelling of the same task finds the images done.
    assert main(["segment", str(folder), "--model", str(sam_dir), "--out", str(tmp_path / "auto"),
                 "--task", "everything", *options]) == 0
    assert "0 segmented, 2 already done" in capsys.readouterr().err


def test_train_cli_says_sam_is_not_trained(sam_dir, camvid_dir, tmp_path, capsys) -> None:
    status = main(["train", "--model", str(sam_dir), "--data", str(camvid_dir),
                   "--out", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    assert status == 1
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "training is not offered for Segment Anything" in message[0]
    assert str(sam_dir) in message[0]
    assert not (tmp_path / "run").exists()
