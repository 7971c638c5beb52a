"""COCO panoptic / instances readers, and training Mask2Former on COCO panoptic files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omniseg.cli.main import main as omniseg_main
from omniseg.data.coco import CocoInstancesReader, CocoPanopticReader, CocoSegmentationDataset, coco_reader
from omniseg.data.dataset import IGNORE
from omniseg.errors import InputError
from omniseg.evaluation.panoptic import id2rgb

CATEGORIES = [
    {"id": 7, "name": "road", "isthing": 0},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 12, "name": "person", "isthing": 1},
]


def _image(root: Path, split: str, name: str, size=(96, 64)) -> None:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)


def make_panoptic(root: Path, split: str, count: int = 2) -> None:
    """Road everywhere, two cars (one a crowd in the second image), one person."""
    images, annotations = [], []
    (root / "annotations" / f"panoptic_{split}").mkdir(parents=True, exist_ok=True)
    for k in range(count):
        name = f"{split}_{k}.jpg"
        _image(root, split, name)
        ids = np.full((64, 96), 1000 + k, dtype=np.int64)
        ids[5:25, 5:35] = 2001
        ids[30:60, 50:90] = 2002
        ids[40:50, 10:20] = 3001
        ids[0:2, :] = 0  # unlabelled
        Image.fromarray(id2rgb(ids)).save(root / "annotations" / f"panoptic_{split}" / f"{split}_{k}.png")
        images.append({"id": k + 1, "file_name": name, "width": 96, "height": 64})
        annotations.append({
            "image_id": k + 1,
            "file_name": f"{split}_{k}.png",
            "segments_info": [
                {"id": 1000 + k, "category_id": 7, "iscrowd": 0},
                {"id": 2001, "category_id": 3, "iscrowd": 0},
                {"id": 2002, "category_id": 3, "iscrowd": int(k == 1)},
                {"id": 3001, "category_id": 12, "iscrowd": 0},
            ],
        })
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(data))


def test_panoptic_reader_maps_categories_and_ignores_crowds(tmp_path) -> None:
    make_panoptic(tmp_path, "train")
    reader = coco_reader(tmp_path, "train")
    assert isinstance(reader, CocoPanopticReader)
    assert reader.categories.id2label == {0: "car", 1: "road", 2: "person"}
    assert reader.categories.thing_ids == {0, 2}
    image, instances, mapping = reader.read(0)
    assert image.size == (96, 64) and instances.shape == (64, 96)
    assert sorted(mapping.values()) == [0, 0, 1, 2]
    assert (instances[0:2] == IGNORE).all()
    assert mapping[int(instances[10, 10])] == 0 and mapping[int(instances[45, 15])] == 2
    _, crowd_instances, crowd_mapping = reader.read(1)
    assert (crowd_instances[30:60, 50:90] == IGNORE).all() and sorted(crowd_mapping.values()) == [0, 1, 2]


def test_instances_reader_decodes_polygons_and_rle(tmp_path) -> None:
    from pycocotools import mask as mask_utils

    _image(tmp_path, "val", "a.jpg")
    rle_mask = np.zeros((64, 96), dtype=np.uint8, order="F")
    rle_mask[30:50, 60:80] = 1
    rle = mask_utils.encode(rle_mask)
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [{"id": 5, "file_name": "a.jpg", "width": 96, "height": 64}],
        "categories": CATEGORIES,
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "iscrowd": 0, "area": 400.0,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            {"id": 2, "image_id": 5, "category_id": 12, "iscrowd": 0, "area": 400.0, "segmentation": rle},
            {"id": 3, "image_id": 5, "category_id": 3, "iscrowd": 1, "area": 50.0,
             "segmentation": [[0, 50, 8, 50, 8, 60, 0, 60]]},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    reader = coco_reader(tmp_path, "val")
    assert isinstance(reader, CocoInstancesReader)
    _, instances, mapping = reader.read(0)
    assert sorted(mapping.values()) == [0, 2]
    assert mapping[int(instances[20, 20])] == 0 and mapping[int(instances[40, 70])] == 2
    assert instances[55, 4] == IGNORE and instances[0, 0] == IGNORE


def test_bad_coco_files_are_named(tmp_path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "panoptic_train.json").write_text("{not json")
    with pytest.raises(InputError, match="panoptic_train.json"):
        coco_reader(tmp_path, "train")
    make_panoptic(tmp_path, "train")
    (tmp_path / "annotations" / "panoptic_train" / "train_0.png").write_bytes(b"")
    with pytest.raises(InputError, match="train_0.png"):
        CocoPanopticReader(tmp_path, "train").read(0)


def test_dataset_augments_instances_and_labels_together(tmp_path) -> None:
    from omniseg.data.augment import TrainAugmentation

    make_panoptic(tmp_path, "train")
    dataset = CocoSegmentationDataset(
        CocoPanopticReader(tmp_path, "train"),
        augment=TrainAugmentation(crop_size=(64, 64), scale_range=(1.0, 1.5), color_jitter=None),
    )
    item = dataset[0]
    assert item["image"].shape == (3, 64, 64) and item["instances"].shape == (64, 64)
    for segment, class_index in item["instance_id_to_semantic_id"].items():
        assert (item["label"][item["instances"] == segment] == class_index).all()
    assert ((item["instances"] == IGNORE) == (item["label"] == IGNORE)).all()


def test_mask2former_trains_on_coco_panoptic_and_reports_pq(tmp_path) -> None:
    from reference_models import build_reference_mask2former

    model = build_reference_mask2former(tmp_path / "m2f", perturb=0.02)
    config = json.loads((model / "config.json").read_text())
    config["train_num_points"] = 256
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "coco"
    make_panoptic(data, "train")
    make_panoptic(data, "val", count=1)
    out = tmp_path / "out"
    status = omniseg_main(["train", "--model", str(model), "--data", str(data), "--out", str(out),
                           "--max-steps", "2", "--batch-size", "2", "--crop-size", "64", "--eval-every", "2",
                           "--no-progress", "--log-every", "1"])
    assert status == 0
    last = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][-1]
    assert 0.0 <= last["eval_pq"] <= 1.0 and np.isfinite(last["loss"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "car", "1": "road", "2": "person"}
