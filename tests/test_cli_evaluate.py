"""``omniseg evaluate`` end to end with a tiny real Mask2Former on a few CamVid val frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniseg.cli.evaluate import class_mapping
from omniseg.cli.main import main
from omniseg.data.semantic import read_dataset_info, readme_ignore_index, readme_thing_names


@pytest.fixture(scope="module")
def tiny_camvid(camvid_dir: Path, tmp_path_factory) -> Path:
    """Three real val frames and labels at a quarter of their size (nearest for labels)."""
    root = tmp_path_factory.mktemp("camvid_small")
    for sub in ("images/val", "labels/val"):
        (root / sub).mkdir(parents=True)
    for image_path in sorted((camvid_dir / "images" / "val").glob("*.png"))[:3]:
        image = Image.open(image_path).convert("RGB").resize((120, 90), Image.BILINEAR)
        image.save(root / "images" / "val" / image_path.name)
        label = Image.open(camvid_dir / "labels" / "val" / image_path.name).resize((120, 90), Image.NEAREST)
        label.save(root / "labels" / "val" / image_path.name)
    shutil.copy(camvid_dir / "id2label.json", root / "id2label.json")
    shutil.copy(camvid_dir / "README.md", root / "README.md")
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from reference_models import TINY_MASK2FORMER_CONFIGS, build_reference_mask2former

    config = dict(TINY_MASK2FORMER_CONFIGS["small"], num_labels=11)
    return build_reference_mask2former(tmp_path_factory.mktemp("m2f") / "model", **config)


@pytest.mark.slow
def test_semantic_outputs_and_figures(tiny_camvid: Path, tiny_model: Path, tmp_path: Path, capsys) -> None:
    import omniseg
    from omniseg.data.dataset import read_label_map
    from omniseg.evaluation import mean_iou
    from omniseg.io.images import load_image

    out = tmp_path / "eval"
    status = main(["evaluate", "--model", str(tiny_model), "--data", str(tiny_camvid), "--out", str(out),
                   "--batch-size", "2", "--examples", "2"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "mean IoU" in printed and "pedestrian" in printed

    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 3 and report["ignore_index"] == 11  # from the README
    assert set(report["per_class"]) == set(json.loads((tiny_camvid / "id2label.json").read_text()).values())

    # The figures are mean_iou of the pipeline's own predictions (classes matched by id here).
    seg = omniseg.pipeline("image-segmentation", model=str(tiny_model))
    images = sorted((tiny_camvid / "images" / "val").glob("*.png"))
    predictions = [s.label_map.numpy() for s in seg.predict([load_image(p) for p in images], subtask="semantic")]
    labels = [read_label_map(tiny_camvid / "labels" / "val" / p.name) for p in images]
    expected = mean_iou(predictions, labels, num_labels=11, ignore_index=11)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "mean_dice", "frequency_weighted_iou"):
        assert report["metrics"][key] == pytest.approx(expected[key], abs=1e-12, nan_ok=True)
    ious = [report["per_class"][name]["iou"] for name in report["per_class"]]
    np.testing.assert_allclose(np.array(ious, dtype=float), expected["per_category_iou"], equal_nan=True)
    assert np.array(report["confusion_matrix"]).sum() == sum(int((label != 11).sum()) for label in labels)

    for name in ("per_class_iou.png", "confusion_matrix.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.width > 300
    assert len(list((out / "examples").glob("*.png"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_instance_and_panoptic(tiny_camvid: Path, tiny_model: Path, tmp_path: Path, task: str) -> None:
    out = tmp_path / task
    status = main(["evaluate", "--model", str(tiny_model), "--data", str(tiny_camvid), "--out", str(out),
                   "--task", task, "--threshold", "0", "--examples", "1"])
    assert status == 0
    report = json.loads((out / "metrics.json").read_text())
    if task == "instance":
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(report["metrics"])
        assert set(report["per_class"]) == {"car", "pedestrian", "bicyclist"}  # things from the README
    else:
        assert set(report["metrics"]) == {"All", "Things", "Stuff"}
        assert report["metrics"]["Things"]["n"] <= 3
    assert (out / "examples").is_dir()


@pytest.mark.slow
def test_bad_image_is_reported_and_skipped(tiny_camvid: Path, tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_camvid, data)
    broken = sorted((data / "images" / "val").glob("*.png"))[0]
    broken.write_bytes(b"not a png")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--examples", "0"]) == 1
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["file"] for e in errors] == [str(broken)]
    assert json.loads((out / "metrics.json").read_text())["images"] == 2


@pytest.mark.slow
def test_usage_errors(tiny_camvid: Path, tiny_model: Path, tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(tmp_path / "nothing")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "no-model"), "--data", str(tiny_camvid),
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(tiny_camvid), "--split", "test"]) == 2
    assert "images/test" in capsys.readouterr().err


def test_dataset_conventions(tiny_camvid: Path, tmp_path: Path) -> None:
    assert readme_ignore_index(tiny_camvid) == 11
    assert readme_thing_names(tiny_camvid) == ["car", "pedestrian", "bicyclist"]
    info = read_dataset_info(tiny_camvid, ignore_index=255, thing_classes=["Car", "9"])
    assert info.ignore_index == 255 and info.thing_ids == (8, 9) and info.num_labels == 11
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "id2label.json").write_text(json.dumps({"0": "background", "1": "cell"}))
    info = read_dataset_info(bare)
    assert info.ignore_index == 255 and info.thing_ids == () and info.class_names == ["background", "cell"]


def test_class_mapping_by_name_and_by_id() -> None:
    dataset = {0: "sky", 1: "road", 2: "car"}
    lut, note = class_mapping({0: "car", 1: "Sky", 2: "boat", 3: "road"}, dataset)
    assert lut.tolist()[:4] == [2, 0, 3, 1] and "by name" in note  # boat -> 3: out of range
    lut, note = class_mapping({0: "label_0", 1: "label_1"}, dataset)
    assert lut.tolist()[:3] == [0, 1, 2] and "by id" in note


def test_group_selection_evaluates_only_the_named_groups(tiny_camvid: Path, tiny_model: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_camvid, data)
    first = sorted((data / "images" / "val").glob("*.png"))[0]
    for kind in ("images", "labels"):
        (data / kind / "val" / first.name).rename(data / kind / "val" / "9999XX_00001.png")
    common = ["evaluate", "--model", str(tiny_model), "--data", str(data), "--examples", "0", "--group-by", "^([^_]+)_"]
    assert main([*common, "--groups", "9999XX", "--out", str(tmp_path / "one")]) == 0
    report = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert report["images"] == 1 and report["groups"] == "9999XX"
    assert "groups {'9999XX': 1}" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "all")]) == 0
    assert json.loads((tmp_path / "all" / "metrics.json").read_text())["images"] == 3
    assert main([*common, "--groups", "nope", "--out", str(tmp_path / "bad")]) == 2
    assert "no samples in group(s) nope" in capsys.readouterr().err


def test_quantized_model_is_evaluated(tiny_camvid: Path, tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    """--quantize int8 evaluates the fast CPU mode's model, and says so in metrics.json."""
    from omniseg.pipelines import image_segmentation

    quantized = []
    original = image_segmentation.quantize_linear_layers
    monkeypatch.setattr(image_segmentation, "quantize_linear_layers",
                        lambda *args: quantized.append(args[1]) or original(*args))
    common = ["evaluate", "--model", str(tiny_model), "--data", str(tiny_camvid), "--examples", "0"]
    assert main([*common, "--quantize", "int8", "--out", str(tmp_path / "int8")]) == 0
    assert quantized == ["int8"]
    assert main([*common, "--out", str(tmp_path / "float32")]) == 0
    assert quantized == ["int8"]
    int8, float32 = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("int8", "float32"))
    assert int8["quantize"] == "int8" and float32["quantize"] is None
    assert int8["images"] == float32["images"] == 3


def test_unwritable_out_and_bad_options_are_usage_errors(tiny_camvid: Path, tiny_model: Path, tmp_path: Path,
                                                         capsys) -> None:
    common = ["evaluate", "--model", str(tiny_model), "--data", str(tiny_camvid)]
    (tmp_path / "file").write_text("x")
    # Used to be a NotADirectoryError traceback after the whole model had loaded.
    assert main([*common, "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "is a file, so no folder can be created below it" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    # Used to be accepted: --ignore-index -1 silently scored the unlabelled value as a class,
    # --device gpu failed as "--task semantic: device 'gpu': ...".
    for option, value in (("--device", "gpu"), ("--ignore-index", "-1"), ("--threshold", "5"), ("--examples", "-1")):
        with pytest.raises(SystemExit) as info:
            main([*common, option, value, "--out", str(tmp_path / "out")])
        assert info.value.code == 2
        assert f"argument {option}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
