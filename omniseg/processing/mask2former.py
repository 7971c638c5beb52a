"""Mask2Former image processor: images (and optional label maps) to model inputs, outputs to segments."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from omniseg.processing import mask_classification, transforms
from omniseg.processing.base import ImageProcessor
from omniseg.processing.outputs import BatchFeature
from omniseg.processing.transforms import ImageLike


def _default_size() -> dict[str, int]:
    return {"shortest_edge": 800, "longest_edge": 1333}


def convert_segmentation_map_to_binary_masks(
    segmentation_map: torch.Tensor,
    instance_id_to_semantic_id: Mapping[int, int] | None = None,
    ignore_index: int | None = None,
    do_reduce_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary mask per distinct value of a label map, and the class of each mask.

    Args:
        segmentation_map: ``[H, W]`` integer map of class ids (or instance ids with a mapping).
        instance_id_to_semantic_id: instance id -> class id; keys are ids *before* label reduction.
        ignore_index: value that gets no mask (required with ``do_reduce_labels``).
        do_reduce_labels: map 0 to ``ignore_index`` and every other value v to v - 1 first.

    Returns:
        ``(masks [N, H, W] float32, classes [N] int64)``, ordered by ascending value.
    """
    if do_reduce_labels and ignore_index is None:
        raise ValueError("If `do_reduce_labels` is True, `ignore_index` must be provided.")
    seg = segmentation_map.to(torch.int64)
    if do_reduce_labels:
        seg = torch.where(seg == 0, torch.full_like(seg, ignore_index), seg - 1)
    values = torch.unique(seg)
    if ignore_index is not None:
        values = values[values != ignore_index]
    masks = (seg.unsqueeze(0) == values.view(-1, 1, 1)).to(torch.float32)
    if instance_id_to_semantic_id is None:
        return masks, values
    classes = []
    for value in values.tolist():
        key = value + 1 if do_reduce_labels else value
        if key in instance_id_to_semantic_id:
            class_id = instance_id_to_semantic_id[key]
        elif str(key) in instance_id_to_semantic_id:
            class_id = instance_id_to_semantic_id[str(key)]
        else:
            raise KeyError(f"instance id {key} of the segmentation map is not in instance_id_to_semantic_id")
        classes.append(int(class_id) - 1 if do_reduce_labels else int(class_id))
    return masks, torch.tensor(classes, dtype=torch.int64, device=seg.device)


@dataclasses.dataclass
class Mask2FormerImageProcessor(ImageProcessor):
    """Prepares images for Mask2Former and turns its outputs into segmentations.

    Settings and defaults are the reference's (``preprocessor_config.json`` keys): images are
    resized so the short side is ``size["shortest_edge"]`` (long side at most
    ``size["longest_edge"]``), both sides then rounded up to a multiple of ``size_divisor``;
    rescaled by ``rescale_factor``, normalised with ``image_mean``/``image_std``, and padded
    bottom/right to the largest size in the batch (or ``pad_size``).
    """

    processor_type = "Mask2FormerImageProcessor"
    # Post-processing first brings mask logits to this size (None: keeps the model's).
    mask_size: ClassVar[mask_classification.MaskSize] = mask_classification.REFERENCE_MASK_SIZE
    # Whether panoptic maps are resized to the targets with antialiased bilinear.
    panoptic_antialias: ClassVar[bool] = False

    do_resize: bool = True
    size: dict[str, int] = dataclasses.field(default_factory=_default_size)
    size_divisor: int = 32
    resample: int = transforms.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: float | list[float] = dataclasses.field(default_factory=lambda: list(transforms.IMAGENET_DEFAULT_MEAN))
    image_std: float | list[float] = dataclasses.field(default_factory=lambda: list(transforms.IMAGENET_DEFAULT_STD))
    ignore_index: int | None = None
    do_reduce_labels: bool = False
    num_labels: int | None = None
    do_convert_rgb: bool | None = None
    pad_size: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.extra.pop("image_processor_type", None)  # written by to_dict from processor_type
        # Legacy configs: "size": 384 and/or "max_size": 1333 (the reference consumes max_size).
        max_size = self.extra.pop("max_size", None)
        if self.size is None:
            self.size = _default_size()
            if max_size is not None:
                self.size["longest_edge"] = int(max_size)
        elif isinstance(self.size, Mapping):
            self.size = transforms.normalize_size_dict(self.size)
        else:
            self.size = transforms.normalize_size_dict(self.size, max_size)
        if self.pad_size is not None:
            self.pad_size = transforms.normalize_size_dict(self.pad_size)
        self.resample = transforms.resample_code(self.resample)
        self.image_mean = _float_or_list(self.image_mean)
        self.image_std = _float_or_list(self.image_std)

    def to_dict(self) -> dict[str, Any]:
        """Settings as written to ``preprocessor_config.json`` (unset optional settings left out)."""
        data = super().to_dict()
        return {k: v for k, v in data.items() if v is not None}

    # ------------------------------------------------------------------ preprocessing

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` an image of this size has after resizing (before batch padding)."""
        if not self.do_resize:
            return int(height), int(width)
        return transforms.resize_output_size(height, width, self.size, self.size_divisor)

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        segmentation_maps: ImageLike | Sequence[ImageLike] | None = None,
        instance_id_to_semantic_id: Mapping[int, int] | Sequence[Mapping[int, int]] | None = None,
        ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
        return_tensors: str | None = "pt",
        **overrides: Any,
    ) -> BatchFeature:
        """Model inputs for a batch of images, and training targets when label maps are given.

        Args:
            images: one image or a list (PIL, numpy ``[H, W, C]``/``[C, H, W]``/``[H, W]``, tensor).
            segmentation_maps: one ``[H, W]`` label map per image (class ids, or instance ids with
                ``instance_id_to_semantic_id``).
            instance_id_to_semantic_id: one mapping for all images, or one per image.
            ignore_index: label that gets no mask; also the padding value of ``mask_labels``.
            do_reduce_labels: 0 becomes ``ignore_index``, other labels shift down by one.
            return_tensors: ``"pt"`` (stacked tensors), ``"np"`` or ``None`` (lists of tensors).
            **overrides: any other setting of this processor for this call (e.g. ``size``).

        Returns:
            :class:`BatchFeature` with ``pixel_values [B, 3, H, W]`` float32 and ``pixel_mask
            [B, H, W]`` int64 (1 = real pixel); with label maps also ``mask_labels`` (list of
            ``[N_i, H, W]`` float32) and ``class_labels`` (list of ``[N_i]`` int64). Attributes
            ``original_sizes`` and ``resized_sizes`` give each image's ``(height, width)`` before
            and after resizing.
        """
        settings = self._with_overrides(overrides)
        if ignore_index is None:
            ignore_index = settings.ignore_index
        if do_reduce_labels is None:
            do_reduce_labels = settings.do_reduce_labels

        image_list = transforms.require_images(_as_list(images))
        map_list = _as_list(segmentation_maps) if segmentation_maps is not None else None
        if map_list is not None and len(map_list) != len(image_list):
            raise ValueError(f"got {len(image_list)} images but {len(map_list)} segmentation maps")
        if isinstance(instance_id_to_semantic_id, Sequence) and not isinstance(instance_id_to_semantic_id, Mapping):
            if len(instance_id_to_semantic_id) != len(image_list):
                raise ValueError("instance_id_to_semantic_id as a list needs one mapping per image")

        pixels, original_sizes, resized_sizes = [], [], []
        for image in image_list:
            tensor = transforms.to_chw_tensor(image, convert_rgb=bool(settings.do_convert_rgb))
            original_sizes.append((int(tensor.shape[-2]), int(tensor.shape[-1])))
            if settings.do_resize:
                new_size = settings.resized_size(*tensor.shape[-2:])
                tensor = transforms.resize(tensor, new_size, settings.resample)
            resized_sizes.append((int(tensor.shape[-2]), int(tensor.shape[-1])))
            pixels.append(
                transforms.rescale_and_normalize(
                    tensor,
                    settings.do_rescale,
                    settings.rescale_factor,
                    settings.do_normalize,
                    settings.image_mean,
                    settings.image_std,
                )
            )

        if settings.pad_size is not None:
            padded_size = (settings.pad_size["height"], settings.pad_size["width"])
        else:
            padded_size = (max(h for h, _ in resized_sizes), max(w for _, w in resized_sizes))
        pixel_values, pixel_mask = transforms.pad_batch(pixels, pad_size=padded_size)

        data: dict[str, Any] = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if map_list is not None:
            mask_labels, class_labels = [], []
            for idx, label_map in enumerate(map_list):
                seg = transforms.label_map_to_tensor(label_map)
                if settings.do_resize:
                    seg = transforms.resize(seg, settings.resized_size(*seg.shape), transforms.NEAREST)
                if isinstance(instance_id_to_semantic_id, Mapping) or instance_id_to_semantic_id is None:
                    mapping = instance_id_to_semantic_id
                else:
                    mapping = instance_id_to_semantic_id[idx]
                masks, classes = convert_segmentation_map_to_binary_masks(
                    seg, mapping, ignore_index=ignore_index, do_reduce_labels=do_reduce_labels
                )
                fill = ignore_index if ignore_index is not None else 0
                mask_labels.append(transforms.pad_bottom_right(masks, padded_size, fill=fill))
                class_labels.append(classes)
            data["mask_labels"] = mask_labels
            data["class_labels"] = class_labels

        output = BatchFeature(_convert_tensors(data, return_tensors))
        output.original_sizes = original_sizes
        output.resized_sizes = resized_sizes
        return output

    preprocess = __call__

    def _with_overrides(self, overrides: dict[str, Any]) -> Mask2FormerImageProcessor:
        if not overrides:
            return self
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown setting(s) for {type(self).__name__}: {', '.join(sorted(unknown))}")
        data = {f: getattr(self, f) for f in names}
        data.update(overrides)
        return type(self)(**data, extra=dict(self.extra))

    # ------------------------------------------------------------------ post-processing

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """See :func:`omniseg.processing.mask_classification.post_process_semantic_segmentation`."""
        return mask_classification.post_process_semantic_segmentation(
            outputs, target_sizes=target_sizes, mask_size=self.mask_size
        )

    def semantic_scores(
        self, outputs: Any, target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per image ``[C, height, width]`` class scores whose argmax is the semantic map
        (see :func:`mask_classification.semantic_scores`)."""
        return mask_classification.semantic_scores(outputs, target_sizes=target_sizes, mask_size=self.mask_size)

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_coco_annotation: bool = False,
        return_binary_maps: bool = False,
    ) -> list[dict[str, Any]]:
        """See :func:`omniseg.processing.mask_classification.post_process_instance_segmentation`."""
        return mask_classification.post_process_instance_segmentation(
            outputs,
            threshold=threshold,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            target_sizes=target_sizes,
            return_coco_annotation=return_coco_annotation,
            return_binary_maps=return_binary_maps,
            mask_size=self.mask_size,
        )

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: Iterable[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    ) -> list[dict[str, Any]]:
        """See :func:`omniseg.processing.mask_classification.post_process_panoptic_segmentation`."""
        return mask_classification.post_process_panoptic_segmentation(
            outputs,
            threshold=threshold,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            label_ids_to_fuse=label_ids_to_fuse,
            target_sizes=target_sizes,
            mask_size=self.mask_size,
            antialias=self.panoptic_antialias,
        )


def _float_or_list(value: Any) -> float | list[float] | None:
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    return [float(v) for v in value]


def _as_list(items: Any) -> list[Any]:
    if isinstance(items, (list, tuple)):
        return list(items)
    if isinstance(items, torch.Tensor) and items.ndim == 4:
        return list(items)
    if isinstance(items, np.ndarray) and items.ndim == 4:
        return list(items)
    return [items]


def _convert_tensors(data: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
    if return_tensors == "pt":
        return data
    if return_tensors is None:
        return {k: (list(v) if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
    if return_tensors == "np":
        out = {}
        for key, value in data.items():
            if isinstance(value, torch.Tensor):
                out[key] = value.cpu().numpy()
            else:
                out[key] = [v.cpu().numpy() for v in value]
        return out
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
