"""COCO panoptic and COCO instances annotations as training samples.

Both readers turn an image's annotations into the pair Mask2Former's processor encodes:
an instance-id map (``int64 [H, W]``, :data:`~omniseg.data.dataset.IGNORE` where no segment
or a crowd region is) and ``instance_id_to_semantic_id``. COCO category ids (sparse, e.g.
1..200) become contiguous class indices ``0..C-1`` in ascending category-id order; the
mapping is in ``id2label`` / ``category_ids``.

Layout (the standard one)::

    DATA/annotations/panoptic_<split>.json + DATA/annotations/panoptic_<split>/*.png
    DATA/annotations/instances_<split>.json
    DATA/<split>/<file_name>   (or DATA/images/<split>/<file_name>)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from omniseg.data.augment import TrainAugmentation, sample_generator
from omniseg.data.dataset import IGNORE
from omniseg.errors import ImageReadError, InputError
from omniseg.evaluation.panoptic import rgb2id
from omniseg.io.images import load_image


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "annotation file not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable JSON file ({exc})") from exc
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise InputError(path, "not a COCO annotation file (no 'images' / 'categories')")
    return data


def _image_dir(root: Path, split: str) -> Path:
    for candidate in (root / split, root / "images" / split):
        if candidate.is_dir():
            return candidate
    raise InputError(root, f"no image folder {split}/ or images/{split}/")


def _next_id(value: int) -> int:
    """Segment ids count up from 0 but never take the ignore value."""
    return value + 1 if value + 1 != IGNORE else value + 2


@dataclass
class CocoCategories:
    """Contiguous class indices for COCO's sparse category ids."""

    category_ids: list[int]
    names: list[str]
    isthing: list[bool]

    @classmethod
    def from_json(cls, categories: list[dict[str, Any]]) -> "CocoCategories":
        ordered = sorted(categories, key=lambda c: int(c["id"]))
        return cls(
            [int(c["id"]) for c in ordered],
            [str(c.get("name", c["id"])) for c in ordered],
            [bool(c.get("isthing", 1)) for c in ordered],
        )

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def thing_ids(self) -> frozenset[int]:
        return frozenset(i for i, thing in enumerate(self.isthing) if thing)

    def index_of(self, category_id: int, source: Any) -> int:
        try:
            return self.category_ids.index(int(category_id))
        except ValueError:
            raise InputError(source, f"category_id {category_id} is not among the file's categories") from None


class CocoPanopticReader:
    """Reads COCO panoptic annotations (PNG segment-id maps plus ``segments_info``)."""

    def __init__(self, root: str | Path, split: str) -> None:
        root = Path(root)
        self.json_path = root / "annotations" / f"panoptic_{split}.json"
        data = _read_json(self.json_path)
        self.png_dir = root / "annotations" / f"panoptic_{split}"
        self.image_dir = _image_dir(root, split)
        self.categories = CocoCategories.from_json(data["categories"])
        images = {int(im["id"]): im for im in data["images"]}
        self.records = []
        for ann in data.get("annotations", []):
            image = images.get(int(ann["image_id"]))
            if image is None:
                raise InputError(self.json_path, f"annotation for unknown image_id {ann['image_id']}")
            self.records.append((self.image_dir / image["file_name"], self.png_dir / ann["file_name"], ann["segments_info"]))

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray, dict[int, int]]:
        """``(RGB image, instance map [H, W] int64, instance id -> class index)``."""
        image_path, png_path, segments = self.records[index]
        image = load_image(image_path)
        try:
            with Image.open(png_path) as png:
                ids = rgb2id(np.asarray(png.convert("RGB"), dtype=np.int64))
        except FileNotFoundError:
            raise ImageReadError(png_path, "panoptic PNG not found") from None
        except OSError as exc:
            raise ImageReadError(png_path, f"cannot read panoptic PNG ({exc})") from exc
        if ids.shape != (image.height, image.width):
            raise InputError(png_path, f"is {ids.shape[1]}x{ids.shape[0]} but its image is {image.width}x{image.height}")
        out = np.full(ids.shape, IGNORE, dtype=np.int64)
        mapping: dict[int, int] = {}
        next_id = 0
        for segment in segments:
            if segment.get("iscrowd", 0):
                continue  # crowd regions: left ignored, as in Mask2Former's COCO mapper
            region = ids == int(segment["id"])
            if not region.any():
                continue
            out[region] = next_id
            mapping[next_id] = self.categories.index_of(segment["category_id"], self.json_path)
            next_id = _next_id(next_id)
        return image, out, mapping


class CocoInstancesReader:
    """Reads COCO instance annotations (polygons or RLE, decoded with pycocotools)."""

    def __init__(self, root: str | Path, split: str) -> None:
        from pycocotools.coco import COCO

        root = Path(root)
        self.json_path = root / "annotations" / f"instances_{split}.json"
        data = _read_json(self.json_path)
        self.image_dir = _image_dir(root, split)
        self.categories = CocoCategories.from_json(data["categories"])
        self.coco = COCO()
        self.coco.dataset = data
        self.coco.createIndex()
        self.image_ids = sorted(self.coco.imgs)

    def __len__(self) -> int:
        return len(self.image_ids)

    def read(self, index: int) -> tuple[Image.Image, np.ndarray, dict[int, int]]:
        """``(RGB image, instance map [H, W] int64, instance id -> class index)``.

        Overlapping instances: larger ones are painted first so smaller ones stay visible.
        Crowd annotations are ignored pixels.
        """
        info = self.coco.imgs[self.image_ids[index]]
        image = load_image(self.image_dir / info["file_name"])
        if (image.width, image.height) != (info["width"], info["height"]):
            raise InputError(self.image_dir / info["file_name"],
                             f"is {image.width}x{image.height} but the annotations say {info['width']}x{info['height']}")
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[info["id"]]))
        out = np.full((info["height"], info["width"]), IGNORE, dtype=np.int64)
        mapping: dict[int, int] = {}
        crowd = np.zeros(out.shape, dtype=bool)
        next_id = 0
        for ann in sorted(anns, key=lambda a: -float(a.get("area", 0))):
            try:
                mask = self.coco.annToMask(ann).astype(bool)
            except Exception as exc:  # pycocotools raises plain exceptions on bad geometry
                raise InputError(self.json_path, f"annotation {ann.get('id')} has an unreadable segmentation ({exc})") from exc
            if ann.get("iscrowd", 0):
                crowd |= mask
                continue
            if not mask.any():
                continue
            out[mask] = next_id
            mapping[next_id] = self.categories.index_of(ann["category_id"], self.json_path)
            next_id = _next_id(next_id)
        out[crowd] = IGNORE
        return image, out, mapping


class CocoSegmentationDataset(Dataset):
    """Samples of a COCO reader for training (augmented) or evaluation.

    Items as :class:`~omniseg.data.dataset.SegmentationDataset` with instances: ``image``
    uint8 ``[3, H, W]``, ``label`` (class per pixel, ``IGNORE`` where none), ``instances`` and
    ``instance_id_to_semantic_id``. Augmentation moves the instance map (nearest neighbour,
    padded with ``IGNORE``) and derives ``label`` from it, so both stay consistent.
    """

    def __init__(self, reader: CocoPanopticReader | CocoInstancesReader, *, augment: TrainAugmentation | None = None,
                 seed: int = 0) -> None:
        self.reader = reader
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.num_labels = len(reader.categories.names)
        self.thing_ids = reader.categories.thing_ids
        self.id2label = reader.categories.id2label

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        picture, instances, mapping = self.reader.read(index)
        image = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()
        ids = torch.from_numpy(instances)
        if self.augment is not None:
            image, ids = self.augment(image, ids, sample_generator(self.seed, self.epoch, index))
        lut = torch.full((int(ids.max()) + 1,), IGNORE, dtype=torch.int64)
        for segment, class_index in mapping.items():
            if segment < len(lut):
                lut[segment] = class_index
        present = set(torch.unique(ids).tolist()) - {IGNORE}
        return {
            "image": image,
            "label": lut[ids],
            "instances": ids,
            "instance_id_to_semantic_id": {k: v for k, v in mapping.items() if k in present},
            "index": index,
        }


def coco_reader(root: str | Path, split: str) -> CocoPanopticReader | CocoInstancesReader | None:
    """The COCO reader for ``root``/``split`` (panoptic first), or ``None`` if neither file exists."""
    root = Path(root)
    if (root / "annotations" / f"panoptic_{split}.json").is_file():
        return CocoPanopticReader(root, split)
    if (root / "annotations" / f"instances_{split}.json").is_file():
        return CocoInstancesReader(root, split)
    return None
