"""Training and evaluation datasets over (image, label map) files, and their collation.

A :class:`SegmentationDataset` reads one sample per index, checks it (every failure names
the file), maps the dataset's label conventions onto the training ones (``ignore_index`` ->
:data:`IGNORE`, optional ``reduce_labels``), and augments it with a generator seeded by
``(seed, epoch, index)``: a sample's augmentation is the same whichever worker process or
rank loads it and whether or not the run was resumed.

Collation turns a list of samples into model inputs with the model's own image processor
(normalisation, padding, and for Mask2Former the ``mask_labels``/``class_labels``
encoding), so training sees exactly what inference sees.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from omniseg.data.augment import CopyPaste, TrainAugmentation, sample_generator
from omniseg.data.targets import instances_from_semantic
from omniseg.errors import ImageReadError, InputError
from omniseg.io.images import load_image
from omniseg.models.auto import MASK_CLASSIFICATION_TYPES

# The ignore value inside training: the models' and processors' default (255).
IGNORE = 255


@dataclasses.dataclass(frozen=True)
class Sample:
    """One annotated image: its file and its single-channel label map file."""

    image: Path
    label: Path


def read_label_map(path: Path) -> np.ndarray:
    """A single-channel integer label map ``[H, W]`` (int64) from an image file.

    Raises:
        ImageReadError: missing, unreadable or truncated file.
        InputError: not single-channel (an RGB "colour" label map, for instance).
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise InputError(
                    path,
                    f"label maps must be single-channel class ids, got a {image.mode} image "
                    "(an RGB colour-coded map must be converted to class ids first)",
                )
            array = np.array(image)
    except InputError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"cannot read label map ({exc})") from exc
    return array.astype(np.int64)


class SegmentationDataset(Dataset):
    """Images and label maps for training or evaluation.

    Args:
        samples: the (image, label) files.
        num_labels: number of classes; label values must be in ``[0, num_labels)`` or the
            ignore index (checked per sample, error names the file).
        ignore_index: the dataset's value for unlabelled pixels (CamVid: 11).
        reduce_labels: the dataset's 0 means "background, ignore" and class ``k`` is stored
            as ``k + 1`` (ADE20k-style).
        augment: training augmentation, or ``None`` (evaluation: files as they are).
        seed: base seed of the per-sample augmentation.
        thing_ids: classes whose connected components become instances; when given, samples
            also carry an instance map for Mask2Former's instance/panoptic targets.
        copy_paste: with ``augment``, paste chosen classes from another augmented sample
            (the donor is drawn with the sample's own generator, so it is seeded too).

    Each item is a dict: ``image`` uint8 ``[3, H, W]``, ``label`` int64 ``[H, W]`` with
    :data:`IGNORE` for unlabelled pixels, ``index``, and with ``thing_ids`` ``instances``
    int64 ``[H, W]`` plus ``instance_id_to_semantic_id``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        num_labels: int,
        ignore_index: int = IGNORE,
        reduce_labels: bool = False,
        augment: TrainAugmentation | None = None,
        seed: int = 0,
        thing_ids: Iterable[int] | None = None,
        copy_paste: CopyPaste | None = None,
    ) -> None:
        if not samples:
            raise InputError("<dataset>", "no samples")
        self.samples = list(samples)
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.reduce_labels = reduce_labels
        self.augment = augment
        self.seed = seed
        self.thing_ids = None if thing_ids is None else frozenset(int(t) for t in thing_ids)
        self.copy_paste = copy_paste
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before creating the loader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _labels(self, raw: np.ndarray, sample: Sample) -> torch.Tensor:
        """Dataset labels -> training labels (ignore = :data:`IGNORE`), validated."""
        label = torch.from_numpy(raw)
        ignored = label == self.ignore_index
        if self.reduce_labels:
            ignored |= label == 0
            label = label - 1
        bad = ~ignored & ((label < 0) | (label >= self.num_labels))
        if bad.any():
            values = sorted(set((label[bad] + int(self.reduce_labels)).unique().tolist()))[:5]
            raise InputError(
                sample.label,
                f"label values {values} are outside the {self.num_labels} classes "
                f"(ignore index {self.ignore_index}{', reduce_labels' if self.reduce_labels else ''})",
            )
        return torch.where(ignored, torch.full_like(label, IGNORE), label)

    def _read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index``'s uint8 image ``[3, H, W]`` and training labels ``[H, W]``, checked."""
        sample = self.samples[index]
        picture = load_image(sample.image)
        image = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()
        label = self._labels(read_label_map(sample.label), sample)
        if tuple(image.shape[-2:]) != tuple(label.shape):
            raise InputError(
                sample.label,
                f"label map is {label.shape[1]}x{label.shape[0]} but its image "
                f"{sample.image.name} is {image.shape[2]}x{image.shape[1]}",
            )
        return image, label

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self._read(index)
        if self.augment is not None:
            generator = sample_generator(self.seed, self.epoch, index)
            image, label = self.augment(image, label, generator)
            paste = self.copy_paste
            if paste is not None and len(self) > 1 and float(torch.rand((), generator=generator)) < paste.prob:
                donor = int(torch.randint(0, len(self) - 1, (), generator=generator))
                donor += donor >= index  # any sample but this one
                donor_image, donor_label = self.augment(*self._read(donor), generator)
                image, label = paste(image, label, donor_image, donor_label)
        item: dict[str, Any] = {"image": image, "label": label, "index": index}
        if self.thing_ids is not None:
            instances, mapping = instances_from_semantic(label.numpy(), self.thing_ids, ignore_index=IGNORE)
            item["instances"] = torch.from_numpy(instances.astype(np.int64))
            item["instance_id_to_semantic_id"] = mapping
        return item


@dataclasses.dataclass
class TrainCollator:
    """Batches training samples into model inputs with the model's image processor.

    Samples are already augmented to their final size, so the processor only rescales,
    normalises and pads (``do_resize=False``); padding never happens when all crops share
    one size. Output for mask-classification models (Mask2Former, MaskFormer):
    ``pixel_values``, ``pixel_mask``, ``mask_labels``, ``class_labels`` (and
    ``semantic_labels`` ``[B, H, W]`` with ``semantic_labels=True``, for
    :mod:`omniseg.train.semantic_aux`); for SegFormer: ``pixel_values``, ``labels``.
    """

    processor: Any
    model_type: str
    semantic_labels: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        images = [item["image"] for item in items]
        if self.model_type in MASK_CLASSIFICATION_TYPES:
            if "instances" in items[0]:
                maps = [item["instances"] for item in items]
                mapping: Any = [item["instance_id_to_semantic_id"] for item in items]
            else:
                maps, mapping = [item["label"] for item in items], None
            batch = self.processor(
                images,
                segmentation_maps=maps,
                instance_id_to_semantic_id=mapping,
                ignore_index=IGNORE,
                do_reduce_labels=False,
                do_resize=False,
                return_tensors="pt",
            )
            inputs = {
                "pixel_values": batch["pixel_values"],
                "pixel_mask": batch["pixel_mask"],
                "mask_labels": list(batch["mask_labels"]),
                "class_labels": list(batch["class_labels"]),
            }
            if self.semantic_labels:
                inputs["semantic_labels"] = torch.stack([item["label"] for item in items])
            return inputs
        batch = self.processor(
            images,
            segmentation_maps=[item["label"] for item in items],
            do_reduce_labels=False,
            do_resize=False,
        )
        return {"pixel_values": batch["pixel_values"], "labels": batch["labels"]}


@dataclasses.dataclass
class EvalCollator:
    """Batches evaluation samples: model inputs as at inference (the processor resizes), and
    the untouched label maps, compared with predictions resized back to each label's size."""

    processor: Any

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        # As PIL images, the processor takes the same path as at inference (the pipeline's),
        # so the measured metric is the one users will get.
        images = [Image.fromarray(item["image"].permute(1, 2, 0).numpy()) for item in items]
        batch = self.processor(images)
        inputs = {"pixel_values": batch["pixel_values"]}
        if "pixel_mask" in batch:
            inputs["pixel_mask"] = batch["pixel_mask"]
        batch = {"inputs": inputs, "labels": [item["label"] for item in items]}
        if "instances" in items[0]:
            batch["instances"] = [(item["instances"], item["instance_id_to_semantic_id"]) for item in items]
        return batch


def folder_samples(root: str | Path, split: str) -> list[Sample]:
    """The (image, label) pairs of a semantic dataset folder's ``split``:
    ``images/<split>/*`` with ``labels/<split>/<same stem>.png``. ``split`` may name several
    splits, comma-separated (``"train,val"``): their samples in that order.

    Raises:
        InputError: a split folder is missing or empty, or an image has no label map.
    """
    root = Path(root)
    names = [name.strip() for name in split.split(",") if name.strip()]
    if len(names) != 1:
        if not names:
            raise InputError(root, f"no split named in {split!r}")
        return [sample for name in names for sample in folder_samples(root, name)]
    split = names[0]
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    if not image_dir.is_dir():
        raise InputError(image_dir, f"no images/{split} folder in the dataset; {_splits_there(root)}")
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not images:
        raise InputError(image_dir, "no images")
    samples = []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise InputError(image, f"no label map {label}")
        samples.append(Sample(image, label))
    return samples


def _splits_there(root: Path) -> str:
    """The split names a dataset folder has, for an error about one it lacks: a mistyped
    ``--split`` then shows the names to choose from."""
    images = root / "images"
    if not images.is_dir():
        return f"{images} does not exist either (expected images/<split>/ and labels/<split>/)"
    splits = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    return f"its splits: {', '.join(splits)}" if splits else f"{images} has no split folders"


def pixel_counts(
    samples: Sequence[Sample], *, num_labels: int, ignore_index: int = IGNORE, reduce_labels: bool = False
) -> list[int]:
    """Labelled pixels per class over the samples' label maps (unaugmented)."""
    dataset = SegmentationDataset(samples, num_labels=num_labels, ignore_index=ignore_index, reduce_labels=reduce_labels)
    counts = np.zeros(num_labels, dtype=np.int64)
    for sample in dataset.samples:
        label = dataset._labels(read_label_map(sample.label), sample)
        counts += np.bincount(label[label != IGNORE].numpy(), minlength=num_labels)[:num_labels]
    return counts.tolist()


def read_id2label(root: str | Path) -> dict[int, str]:
    """``id2label.json`` of a dataset folder, with integer keys."""
    path = Path(root) / "id2label.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {int(k): str(v) for k, v in sorted(data.items(), key=lambda kv: int(kv[0]))}
    except FileNotFoundError:
        raise InputError(path, "missing: a dataset folder needs id2label.json") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(path, f"not a JSON object of class id -> name ({exc})") from exc
