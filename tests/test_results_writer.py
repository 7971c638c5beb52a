"""Result records, label maps, overlays and their files: correct, decodable, written atomically."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from omniseg.io import atomic, results
from omniseg.io.results import (
    coco_document,
    label_map,
    output_paths,
    segments_to_records,
    write_image_results,
)
from omniseg.viz import color_for, draw_overlay, palette
from omniseg.viz.palette import shade

ID2LABEL = {0: "road", 1: "car", 2: "person", 3: "sky"}
H, W = 30, 40


def _mask(y0: int, y1: int, x0: int, x1: int) -> Image.Image:
    array = np.zeros((H, W), np.uint8)
    array[y0:y1, x0:x1] = 255
    return Image.fromarray(array, mode="L")


def _instance_segments() -> list[dict]:
    return [
        {"score": 0.6, "label": "car", "mask": _mask(5, 15, 2, 12)},
        {"score": 0.9, "label": "car", "mask": _mask(10, 20, 8, 30)},  # overlaps the first
        {"score": 0.75, "label": "person", "mask": _mask(22, 29, 33, 37)},
    ]


def _semantic_segments() -> list[dict]:
    return [
        {"score": None, "label": "sky", "mask": _mask(0, 10, 0, W)},
        {"score": None, "label": "road", "mask": _mask(10, H, 0, W)},
    ]


@pytest.fixture
def image(rng) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def test_records_fields_rle_bbox_area():
    segments = _instance_segments()
    records = segments_to_records(segments, ID2LABEL)
    assert [r["id"] for r in records] == [1, 2, 3]
    assert [r["label_id"] for r in records] == [1, 1, 2]
    assert [r["label"] for r in records] == ["car", "car", "person"]
    assert [r["score"] for r in records] == [0.6, 0.9, 0.75]
    assert records[0]["bbox"] == [2, 5, 10, 10]
    assert records[1]["bbox"] == [8, 10, 22, 10]
    assert records[2]["bbox"] == [33, 22, 4, 7]
    assert [r["area"] for r in records] == [100, 220, 28]
    json.dumps(records)  # plain JSON types only
    for record, segment in zip(records, segments):
        rle = record["segmentation"]
        assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), np.asarray(segment["mask"]) > 0)
        assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == record["area"]


def test_semantic_records_have_no_score_and_string_keys_work():
    records = segments_to_records(_semantic_segments(), {str(k): v for k, v in ID2LABEL.items()})
    assert [(r["label_id"], r["score"]) for r in records] == [(3, None), (0, None)]


def test_empty_mask_record():
    record = segments_to_records([{"score": 0.5, "label": "car", "mask": _mask(0, 0, 0, 0)}], ID2LABEL)[0]
    assert record["area"] == 0 and record["bbox"] == [0, 0, 0, 0]


def test_unknown_label_is_an_error():
    with pytest.raises(ValueError, match="bicycle"):
        segments_to_records([{"score": 1.0, "label": "bicycle", "mask": _mask(0, 1, 0, 1)}], ID2LABEL)


def test_duplicate_label_names_map_to_lowest_id():
    assert results.label_to_id({5: "thing", 2: "thing", 1: "x"}) == {"x": 1, "thing": 2}


def test_label_map_values_and_overlap_priority():
    labels = label_map(_instance_segments(), ID2LABEL, (W, H))
    assert labels.dtype == np.uint8 and labels.shape == (H, W)
    assert labels[0, 0] == 255  # unassigned
    assert labels[6, 3] == 1 and labels[25, 34] == 2
    # The overlap of the two cars: the 0.9 segment is painted last; both are class 1 anyway,
    # so check priority with different classes too.
    crossing = [
        {"score": 0.9, "label": "person", "mask": _mask(0, 10, 0, 10)},
        {"score": 0.2, "label": "car", "mask": _mask(5, 15, 5, 15)},
    ]
    labels = label_map(crossing, ID2LABEL, (W, H))
    assert labels[7, 7] == 2 and labels[12, 12] == 1


def test_label_map_16bit_when_ids_reach_255(tmp_path, image):
    id2label = {i: f"c{i}" for i in range(300)}
    segments = [{"score": None, "label": "c299", "mask": _mask(0, 5, 0, 5)}]
    labels = label_map(segments, id2label, (W, H))
    assert labels.dtype == np.uint16 and labels[0, 0] == 299 and labels[20, 20] == 65535
    written = write_image_results(
        tmp_path / "big", image, segments, id2label, source="x.png", task="semantic", model="m"
    )
    saved = np.asarray(Image.open(written.paths["labels"]))
    assert saved.dtype == np.uint16
    np.testing.assert_array_equal(saved, labels)
    assert written.document["label_map"]["unassigned"] == 65535


def test_write_image_results_files(tmp_path, image):
    segments = _instance_segments()
    written = write_image_results(
        tmp_path / "sub" / "street", image, segments, ID2LABEL,
        source="in/street.jpg", task="instance", model="tiny-m2f",
    )
    assert {k: p.name for k, p in written.paths.items()} == {
        "labels": "street_labels.png", "overlay": "street_overlay.png", "json": "street.json",
    }
    document = json.loads((tmp_path / "sub" / "street.json").read_text())
    assert document["image"] == "in/street.jpg"
    assert (document["width"], document["height"]) == (W, H)
    assert document["task"] == "instance" and document["model"] == "tiny-m2f"
    assert document["label_map"] == {"file": "street_labels.png", "unassigned": 255}
    assert document["segments"] == segments_to_records(segments, ID2LABEL)

    saved = Image.open(tmp_path / "sub" / "street_labels.png")
    assert saved.mode == "L" and saved.size == (W, H)
    np.testing.assert_array_equal(np.asarray(saved), label_map(segments, ID2LABEL, (W, H)))
    overlay = Image.open(tmp_path / "sub" / "street_overlay.png")
    assert overlay.mode == "RGB" and overlay.height >= H and overlay.width > W  # legend beside

    # Atomic writes leave nothing else behind (temporary files are named .NAME.*.tmp).
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "street.json", "street_labels.png", "street_overlay.png",
    ]


def test_write_only_requested_formats(tmp_path, image):
    write_image_results(tmp_path / "a", image, _semantic_segments(), ID2LABEL,
                        source="a.png", task="semantic", model=None, formats=["json"])
    write_image_results(tmp_path / "b", image, _semantic_segments(), ID2LABEL,
                        source="b.png", task="semantic", model=None, formats=["png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b_labels.png", "b_overlay.png"]


def test_json_written_last_and_failure_leaves_no_partial_file(tmp_path, image, monkeypatch):
    order = []

    def failing_write_text(path, text):
        order.append(path.name)
        raise OSError("disk full")

    monkeypatch.setattr(results, "atomic_write_text", failing_write_text)
    with pytest.raises(OSError):
        write_image_results(tmp_path / "x", image, _semantic_segments(), ID2LABEL,
                            source="x.png", task="semantic", model="m")
    # The PNGs came first; the JSON, which marks completion, never appeared.
    assert order == ["x.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_labels.png", "x_overlay.png"]


def test_interrupted_atomic_write_leaves_no_temp_file(tmp_path, image, monkeypatch):
    # Fail inside the atomic writer, after its temp file was written: it must be removed.
    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_image_results(tmp_path / "y", image, _semantic_segments(), ID2LABEL,
                            source="y.png", task="semantic", model="m")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    # New files as open() would make them under the process umask (not mkstemp's 0600);
    # a replaced file keeps its own permissions.
    umask = os.umask(0o022)
    os.umask(umask)
    atomic.atomic_write_text(tmp_path / "new.json", "{}")
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o666 & ~umask
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    kept.chmod(0o640)
    atomic.atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and stat.S_IMODE(kept.stat().st_mode) == 0o640


def test_output_paths():
    paths = output_paths("OUT/a/b", ["json", "png"])
    assert {k: str(v) for k, v in paths.items()} == {
        "labels": "OUT/a/b_labels.png", "overlay": "OUT/a/b_overlay.png", "json": "OUT/a/b.json",
    }
    assert list(output_paths("OUT/x.y", ["json"]).values())[0].name == "x.y.json"


def test_coco_document_loads_in_pycocotools(tmp_path, image):
    documents = [
        write_image_results(tmp_path / "one", image, _instance_segments(), ID2LABEL,
                            source="one.png", task="instance", model="m").document,
        write_image_results(tmp_path / "two", image, _semantic_segments(), ID2LABEL,
                            source="two.png", task="semantic", model="m").document,
    ]
    document = coco_document(documents, ID2LABEL)
    path = tmp_path / "coco.json"
    results.write_coco(path, document)
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [1, 2]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["road", "car", "person", "sky"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert [a["category_id"] for a in anns] == [1, 1, 2] and [a["score"] for a in anns] == [0.6, 0.9, 0.75]
    np.testing.assert_array_equal(coco.annToMask(anns[2]).astype(bool), np.asarray(_instance_segments()[2]["mask"]) > 0)
    semantic = coco.loadAnns(coco.getAnnIds(imgIds=[2]))
    assert all("score" not in a for a in semantic) and len({a["id"] for a in anns + semantic}) == 5


# --- palette and overlay -------------------------------------------------------------------


def test_palette_fixed_distinct_deterministic():
    colours = palette(200)
    assert colours == palette(200) and colours[:3] == [color_for(0), color_for(1), color_for(2)]
    assert len(set(colours)) == 200
    first = np.array(colours[:20], dtype=float)
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1) + np.eye(20) * 1e9
    assert distances.min() > 40  # the hand-picked ones are far apart
    assert shade(color_for(1), 0) == color_for(1)
    assert len({shade(color_for(1), i) for i in range(13)}) == 13


def test_overlay_blends_colours_and_keeps_background(image):
    segments = _semantic_segments()
    overlay = np.asarray(draw_overlay(image, segments, alpha=0.5, id2label=ID2LABEL, legend=False))
    source = np.asarray(image).astype(float)
    assert overlay.shape == (H, W, 3)
    sky = np.array(color_for(3), float)
    # Inside the sky mask, away from its outline: an even blend of the pixel and the colour.
    np.testing.assert_allclose(overlay[4, 10], np.rint(0.5 * source[4, 10] + 0.5 * sky), atol=1)
    only = np.asarray(draw_overlay(image, segments[:1], alpha=0.5, id2label=ID2LABEL, legend=False))
    np.testing.assert_array_equal(only[20:, :], np.asarray(image)[20:, :])  # uncovered: untouched


def test_overlay_instances_of_one_class_differ(image):
    segments = [
        {"score": 0.9, "label": "car", "mask": _mask(0, 15, 0, 20)},
        {"score": 0.8, "label": "car", "mask": _mask(0, 15, 20, W)},
    ]
    plain = Image.new("RGB", (W, H), (128, 128, 128))
    overlay = np.asarray(draw_overlay(plain, segments, alpha=1.0, id2label=ID2LABEL, legend=False))
    assert tuple(overlay[7, 10]) != tuple(overlay[7, 30])
    assert tuple(overlay[7, 10]) == color_for(1)


def test_overlay_legend_panel_and_record_input(image):
    records = segments_to_records(_instance_segments(), ID2LABEL)  # RLE instead of masks
    with_legend = draw_overlay(image, records, id2label=ID2LABEL)
    assert with_legend.width > W and with_legend.height >= H
    without = draw_overlay(image, _instance_segments(), id2label=ID2LABEL, legend=False)
    np.testing.assert_array_equal(np.asarray(with_legend)[:H, :W], np.asarray(without))
    empty = draw_overlay(image, [])
    assert empty.width > W  # "no segments" panel


def test_overlay_numbers_large_masks_inside_them():
    # A 2000x1500 photo: masks this large are searched for their most interior point on
    # blocks of pixels; the number tag still lands well inside its mask.
    height, width = 1500, 2000
    plain = Image.new("RGB", (width, height), (128, 128, 128))
    ring = np.zeros((height, width), np.uint8)
    ring[100:1400, 100:1900] = 255
    ring[300:1200, 300:1700] = 0  # a thick frame: its interior is the frame's middle line
    block = np.zeros((height, width), np.uint8)
    block[400:1100, 400:1600] = 255
    segments = [{"score": 0.9, "label": "car", "mask": Image.fromarray(ring)},
                {"score": 0.8, "label": "sky", "mask": Image.fromarray(block)}]
    overlay = np.asarray(draw_overlay(plain, segments, alpha=0.0, id2label=ID2LABEL, legend=False))
    for segment, mask, colour in ((segments[0], ring, color_for(1)), (segments[1], block, color_for(3))):
        ys, xs = np.nonzero((overlay == colour).all(axis=-1))  # the tag's fill (alpha 0: no blend)
        assert ys.size > 100, segment["label"]
        # The whole tag lies inside the mask, at least 40 pixels from its edge.
        inside = mask > 0
        depth = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        assert depth[ys, xs].min() > 40, segment["label"]


def test_overlay_many_segments_grows_downward(image):
    segments = [{"score": 0.5, "label": f"c{i}", "mask": _mask(0, 1, 0, 1)} for i in range(60)]
    overlay = draw_overlay(image, segments)
    assert overlay.height > H


def test_overlay_rejects_wrong_mask_size(image):
    with pytest.raises(ValueError, match="does not match"):
        draw_overlay(image, [{"score": 1.0, "label": "car", "mask": Image.new("L", (3, 3))}])
