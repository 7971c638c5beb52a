"""DETR image processor: images to model inputs, DETR's outputs to segments.

Preprocessing is the reference's ``DetrImageProcessor``: resize so the short side is
``size["shortest_edge"]`` (800) unless the long side would pass ``size["longest_edge"]``
(1333), rescale, normalise, pad bottom/right to the batch's largest size with a
``pixel_mask``. No rounding to a multiple of 32: DETR sees the padding through the mask.

Post-processing is the mask-classification one at the model's own mask size
(:mod:`omniseg.processing.mask_classification`, ``mask_size=None``): DETR's panoptic path is
MaskFormer's, its instance path the panoptic one without fusing (with COCO RLE on request),
its semantic path MaskFormer's. Panoptic and instance results depend only on the queries whose
best class is an object with a score above ``threshold``, so only those queries' masks are
decoded (:meth:`omniseg.models.detr.DetrSegmentationOutput.masks_of`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from omniseg.processing import mask_classification, transforms
from omniseg.processing.base import ImageProcessor
from omniseg.processing.mask2former import _as_list, _convert_tensors, _float_or_list
from omniseg.processing.outputs import BatchFeature
from omniseg.processing.transforms import ImageLike


def _default_size() -> dict[str, int]:
    return {"shortest_edge": 800, "longest_edge": 1333}


@dataclasses.dataclass
class DetrImageProcessor(ImageProcessor):
    """Prepares images for DETR and turns its outputs into segmentations.

    Settings and defaults are the reference's (``preprocessor_config.json`` keys). Legacy
    configs (``"size": 800`` with or without ``"max_size"``) mean a short side of 800 and a
    long side of at most ``max_size`` (default 1333), as in the reference. Annotation
    settings (``format``, ``do_convert_annotations``) are kept and written back unread:
    omniseg does not train DETR.
    """

    processor_type = "DetrImageProcessor"

    do_resize: bool = True
    size: dict[str, int] = dataclasses.field(default_factory=_default_size)
    resample: int = transforms.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: float | list[float] = dataclasses.field(default_factory=lambda: list(transforms.IMAGENET_DEFAULT_MEAN))
    image_std: float | list[float] = dataclasses.field(default_factory=lambda: list(transforms.IMAGENET_DEFAULT_STD))
    do_pad: bool = True
    pad_size: dict[str, int] | None = None
    do_convert_rgb: bool | None = None

    def __post_init__(self) -> None:
        self.extra.pop("image_processor_type", None)  # written by to_dict from processor_type
        max_size = self.extra.pop("max_size", None)
        if self.size is None:
            self.size = _default_size()
        elif isinstance(self.size, Mapping):
            self.size = transforms.normalize_size_dict(self.size)
        else:
            # The reference reads a bare short side with a long side of max_size, default 1333.
            self.size = transforms.normalize_size_dict(self.size, 1333 if max_size is None else max_size)
        if self.pad_size is not None:
            self.pad_size = transforms.normalize_size_dict(self.pad_size)
        self.resample = transforms.resample_code(self.resample)
        self.image_mean = _float_or_list(self.image_mean)
        self.image_std = _float_or_list(self.image_std)

    def to_dict(self) -> dict[str, Any]:
        """Settings as written to ``preprocessor_config.json`` (unset optional settings left out)."""
        return {k: v for k, v in super().to_dict().items() if v is not None}

    # ------------------------------------------------------------------ preprocessing

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` an image of this size has after resizing (before padding)."""
        if not self.do_resize:
            return int(height), int(width)
        return transforms.resize_output_size(height, width, self.size)

    def __call__(
        self, images: ImageLike | Sequence[ImageLike], return_tensors: str | None = "pt"
    ) -> BatchFeature:
        """Model inputs for a batch of images.

        Args:
            images: one image or a list (PIL, numpy ``[H, W, C]``/``[C, H, W]``/``[H, W]``, tensor).
            return_tensors: ``"pt"`` (stacked tensors), ``"np"`` or ``None`` (lists of tensors).

        Returns:
            :class:`BatchFeature` with ``pixel_values [B, 3, H, W]`` float32 and, with
            ``do_pad``, ``pixel_mask [B, H, W]`` int64 (1 = real pixel). Attributes
            ``original_sizes`` and ``resized_sizes`` give each image's ``(height, width)``.
        """
        pixels, original_sizes, resized_sizes = [], [], []
        for image in transforms.require_images(_as_list(images)):
            tensor = transforms.to_chw_tensor(image, convert_rgb=bool(self.do_convert_rgb))
            original_sizes.append((int(tensor.shape[-2]), int(tensor.shape[-1])))
            if self.do_resize:
                tensor = transforms.resize(tensor, self.resized_size(*tensor.shape[-2:]), self.resample)
            resized_sizes.append((int(tensor.shape[-2]), int(tensor.shape[-1])))
            pixels.append(
                transforms.rescale_and_normalize(
                    tensor, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
                )
            )
        if self.do_pad:
            pad_size = None if self.pad_size is None else (self.pad_size["height"], self.pad_size["width"])
            pixel_values, pixel_mask = transforms.pad_batch(pixels, pad_size=pad_size)
            data: dict[str, Any] = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        else:
            if len(set(resized_sizes)) > 1:
                raise ValueError(f"images of different sizes {sorted(set(resized_sizes))} need do_pad to be batched")
            data = {"pixel_values": torch.stack(pixels)}
        output = BatchFeature(_convert_tensors(data, return_tensors))
        output.original_sizes = original_sizes
        output.resized_sizes = resized_sizes
        return output

    preprocess = __call__

    # ------------------------------------------------------------------ post-processing

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per-pixel class ids ``[H, W]`` per image (see
        :func:`omniseg.processing.mask_classification.post_process_semantic_segmentation`),
        from ``outputs.logits [B, Q, C+1]`` and ``outputs.pred_masks [B, Q, h, w]``."""
        logits = {"class_queries_logits": outputs.logits, "masks_queries_logits": outputs.pred_masks}
        return mask_classification.post_process_semantic_segmentation(logits, target_sizes=target_sizes, mask_size=None)

    def semantic_scores(
        self, outputs: Any, target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per image ``[C, height, width]`` class scores whose argmax is the semantic map (test-time
        flip averages them; see :func:`mask_classification.semantic_scores`)."""
        logits = {"class_queries_logits": outputs.logits, "masks_queries_logits": outputs.pred_masks}
        return mask_classification.semantic_scores(logits, target_sizes=target_sizes, mask_size=None)

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_coco_annotation: bool = False,
    ) -> list[dict[str, Any]]:
        """Instances as the reference's DETR processor gives them: the panoptic segments
        without fusing (see :meth:`post_process_panoptic_segmentation`). With
        ``return_coco_annotation``, ``segmentation`` becomes the RLE of every id of the map
        (background 0 first), except for images without any kept query, whose ``-1`` map is
        returned as it is (the reference's behaviour)."""
        results = self._segments(outputs, threshold, mask_threshold, overlap_mask_area_threshold, None, target_sizes)
        if return_coco_annotation:
            for result, kept_any in results:
                if kept_any:
                    result["segmentation"] = mask_classification.convert_segmentation_to_rle(result["segmentation"])
        return [result for result, _ in results]

    def post_process_panoptic_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: Iterable[int] | None = None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
    ) -> list[dict[str, Any]]:
        """Panoptic segments per image (see
        :func:`omniseg.processing.mask_classification.post_process_panoptic_segmentation`):
        ``segmentation`` (int32 ``[H, W]`` ids, 0 = none; float32 ``-1`` when no query is
        kept) and ``segments_info`` (``id``, ``label_id``, ``was_fused``, ``score``)."""
        results = self._segments(
            outputs, threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse, target_sizes
        )
        return [result for result, _ in results]

    def _segments(
        self,
        outputs: Any,
        threshold: float,
        mask_threshold: float,
        overlap_mask_area_threshold: float,
        label_ids_to_fuse: Iterable[int] | None,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None,
    ) -> list[tuple[dict[str, Any], bool]]:
        """Panoptic results per image, each with whether any query was kept. Only the kept
        queries' masks are read (decoded, for omniseg's outputs)."""
        logits = outputs.logits
        batch, _, classes = logits.shape
        if target_sizes is not None and len(target_sizes) != batch:
            raise ValueError(
                f"got {len(target_sizes)} target sizes for a batch of {batch}; pass one (height, width) per image"
            )
        scores, labels = logits.softmax(dim=-1).max(dim=-1)  # [B, Q]
        keep = labels.ne(classes - 1) & (scores > threshold)
        results = []
        for i in range(batch):
            kept = torch.nonzero(keep[i]).flatten()
            subset = {
                "class_queries_logits": logits[i : i + 1].index_select(1, kept),
                "masks_queries_logits": _masks_of(outputs, i, kept)[None],
            }
            sizes = None if target_sizes is None else [target_sizes[i]]
            (result,) = mask_classification.post_process_panoptic_segmentation(
                subset,
                threshold=threshold,
                mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold,
                label_ids_to_fuse=label_ids_to_fuse,
                target_sizes=sizes,
                mask_size=None,
            )
            results.append((result, kept.numel() > 0))
        return results


def _masks_of(outputs: Any, image: int, queries: torch.Tensor) -> torch.Tensor:
    """Mask logits ``[K, h, w]`` of some queries of one image: decoded on demand for omniseg's
    outputs, read from ``pred_masks`` for others (the reference's, for example)."""
    if hasattr(outputs, "masks_of"):
        return outputs.masks_of(image, queries)
    return outputs.pred_masks[image].index_select(0, queries)
