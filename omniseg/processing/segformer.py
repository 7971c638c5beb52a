"""SegFormer's image processor: fixed-size resize, rescale, normalize; semantic post-processing.

Follows the reference implementation's ``SegformerImageProcessor`` (and its
``preprocessor_config.json`` keys): every image is resized to ``size`` (default 512x512,
bilinear, anti-aliased), scaled by ``rescale_factor`` and normalized with the ImageNet mean
and std. Segmentation maps are resized with nearest-neighbour sampling and, with
``do_reduce_labels``, shifted down by one with 0 ("background") becoming 255 (ignored).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from omniseg.io.images import load_image
from omniseg.processing import transforms
from omniseg.processing.base import ImageProcessor
from omniseg.processing.outputs import BatchFeature

IGNORE_INDEX = 255


def reduce_labels(label_map: torch.Tensor) -> torch.Tensor:
    """Shift class ids down by one; 0 (background) and 255 become 255. ``[H, W]``, same dtype."""
    reduced = label_map - 1
    return reduced.masked_fill_((label_map == 0) | (label_map == IGNORE_INDEX), IGNORE_INDEX)


@dataclasses.dataclass
class SegformerImageProcessor(ImageProcessor):
    """Images (and optional segmentation maps) to SegFormer inputs; logits to class maps.

    Settings are the keys of ``preprocessor_config.json``. ``size`` may be a dict
    (``{"height", "width"}``, or any size dict :func:`transforms.resize_output_size` reads) or,
    as in older checkpoints, an int meaning a square. ``do_convert_rgb=None`` (the default)
    converts grayscale and RGBA inputs to RGB; ``False`` leaves channels as given.

    The legacy key ``reduce_labels`` is kept but not applied, as in the reference
    implementation: only ``do_reduce_labels`` reduces labels.
    """

    processor_type: ClassVar[str] = "SegformerImageProcessor"

    do_resize: bool = True
    size: Any = dataclasses.field(default_factory=lambda: {"height": 512, "width": 512})
    resample: int = transforms.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Any = dataclasses.field(default_factory=lambda: list(transforms.IMAGENET_DEFAULT_MEAN))
    image_std: Any = dataclasses.field(default_factory=lambda: list(transforms.IMAGENET_DEFAULT_STD))
    do_reduce_labels: bool = False
    do_convert_rgb: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            # Older checkpoints write "size": 512; the reference reads it as a square.
            self.size = {"height": self.size, "width": self.size}
        else:
            self.size = transforms.normalize_size_dict(self.size)

    # ------------------------------------------------------------------ preprocessing

    def __call__(
        self,
        images: Any,
        segmentation_maps: Any = None,
        return_tensors: str | None = "pt",
        **overrides: Any,
    ) -> BatchFeature:
        """Preprocess one image or a list of images.

        Args:
            images: PIL image, numpy array (``HxW``, ``HxWxC`` or ``CxHxW``), torch tensor,
                local path or URL, or a list of them.
            segmentation_maps: optional class-id maps (PIL "L"/"P", numpy or torch ``[H, W]``),
                one per image.
            return_tensors: ``"pt"`` (the only supported value) or ``None``; both give tensors.
            overrides: any setting (``size``, ``do_reduce_labels`` ...) for this call only.

        Returns:
            ``{"pixel_values": [B, C, H, W] float32}`` plus ``"labels": [B, H, W] int64`` when
            maps are given.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        settings = dataclasses.replace(self, **overrides) if overrides else self
        images = transforms.require_images(_as_list(images))
        pixel_values = settings._pixel_values(images)
        data = {"pixel_values": pixel_values}
        if segmentation_maps is not None:
            maps = _as_list(segmentation_maps)
            if len(maps) != len(images):
                raise ValueError(f"got {len(images)} images but {len(maps)} segmentation maps")
            data["labels"] = settings._labels(maps)
        return BatchFeature(data)

    preprocess = __call__

    def _target_size(self, height: int, width: int) -> tuple[int, int]:
        return transforms.resize_output_size(height, width, self.size)

    def _pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """Resize each image, stack, then rescale and normalize the batch in one pass."""
        convert_rgb = self.do_convert_rgb is not False
        resized = []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                image = load_image(image)
            tensor = transforms.to_chw_tensor(image, convert_rgb=convert_rgb)
            if self.do_resize:
                tensor = transforms.resize(tensor, self._target_size(*tensor.shape[-2:]), self.resample)
            resized.append(tensor)
        _check_same_shape(resized, "images")
        batch = torch.stack(resized)
        return transforms.rescale_and_normalize(
            batch, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )

    def _labels(self, maps: Sequence[Any]) -> torch.Tensor:
        """Class-id maps: optionally reduced, nearest-resized, stacked as int64 ``[B, H, W]``."""
        processed = []
        for label_map in maps:
            tensor = transforms.label_map_to_tensor(label_map)
            if self.do_reduce_labels:
                tensor = reduce_labels(tensor)
            if self.do_resize:
                size = self._target_size(*tensor.shape[-2:])
                tensor = transforms.resize(tensor, size, resample=transforms.NEAREST)
            processed.append(tensor.to(torch.int64))
        _check_same_shape(processed, "segmentation maps")
        return torch.stack(processed)

    # ------------------------------------------------------------------ post-processing

    def semantic_scores(
        self, outputs: Any, target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per image ``[K, height, width]`` class probabilities (softmax of the logits,
        upsampled bilinearly to the target size as :meth:`post_process_semantic_segmentation`
        does), for averaging several views of an image before the argmax."""
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {len(logits)} logits")
        maps = []
        for i, image_logits in enumerate(logits):
            if target_sizes is not None:
                size = target_sizes[i].tolist() if isinstance(target_sizes, torch.Tensor) else target_sizes[i]
                image_logits = F.interpolate(
                    image_logits[None], size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False
                )[0]
            maps.append(image_logits.softmax(dim=0))
        return maps

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Class-id maps from SegFormer outputs.

        Args:
            outputs: the model's output (``.logits`` or ``["logits"]``, ``[B, K, h, w]``).
            target_sizes: per image ``(height, width)``; the logits are bilinearly upsampled to
                it before the argmax. Without it, the argmax is taken at the logits' size.

        Returns:
            ``B`` int64 tensors ``[height, width]``.
        """
        # ``max(dim).indices`` is argmax (first index on ties), several times faster on CPU
        # for a reduction over the channel dimension.
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
        if target_sizes is None:
            return list(logits.max(dim=1).indices.unbind(0))
        if len(target_sizes) != len(logits):
            raise ValueError(
                f"got {len(target_sizes)} target sizes for a batch of {len(logits)} logits"
            )
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        maps = []
        for image_logits, size in zip(logits, target_sizes):
            height, width = (int(v) for v in size)
            upsampled = F.interpolate(
                image_logits[None], size=(height, width), mode="bilinear", align_corners=False
            )
            maps.append(upsampled[0].max(dim=0).indices)
        return maps


def _as_list(items: Any) -> list[Any]:
    if isinstance(items, (list, tuple)):
        return list(items)
    if isinstance(items, torch.Tensor) and items.ndim == 4:
        return list(items.unbind(0))
    return [items]


def _check_same_shape(tensors: Sequence[torch.Tensor], what: str) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"{what} have different sizes after preprocessing ({sorted(shapes)}); "
            "enable do_resize or pass images of one size"
        )
