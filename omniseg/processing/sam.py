"""Segment Anything's image processor: longest side to 1024, normalise, pad to 1024x1024;
point and box prompts rescaled with the image; low-resolution masks back to image size.

Follows the reference implementation's ``SamImageProcessor`` and ``SamProcessor`` (their
``preprocessor_config.json`` keys, call signature and output keys): ``processor(images,
input_points=..., input_labels=..., input_boxes=...)`` returns ``pixel_values``,
``original_sizes``, ``reshaped_input_sizes`` and the rescaled prompts, which
``SamModel(**inputs)`` takes as they are.

Prompts are nested lists (or tensors) in pixels of the original image:
``input_points [image][prompt][point] = [x, y]``, ``input_labels [image][prompt][point]``
(1 foreground, 0 background), ``input_boxes [image][box] = [x0, y0, x1, y1]``. They are
checked (:class:`omniseg.errors.PromptError` for empty lists, points outside the image,
swapped box corners) and rescaled in float64, as the reference does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from omniseg.errors import PromptError
from omniseg.io.images import load_image
from omniseg.processing import transforms
from omniseg.processing.base import ImageProcessor
from omniseg.processing.outputs import BatchFeature

# Label of the points added to give every prompt of a batch the same number of points.
POINT_PAD_VALUE = -10


def resized_shape(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """``(height, width)`` scaled so the longer side is ``longest_edge``, rounded half up, and
    at least 1: the reference rounds a very thin image's short side to 0 (4000x10 with
    ``longest_edge`` 1024 is fine, 3000x1 is not) and fails in the resize."""
    scale = longest_edge * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclasses.dataclass
class SamImageProcessor(ImageProcessor):
    """Images and prompts to ``SamModel`` inputs; mask logits to image-size masks."""

    processor_type: ClassVar[str] = "SamImageProcessor"

    do_resize: bool = True
    size: Any = dataclasses.field(default_factory=lambda: {"longest_edge": 1024})
    resample: int = transforms.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Any = dataclasses.field(default_factory=lambda: list(transforms.IMAGENET_DEFAULT_MEAN))
    image_std: Any = dataclasses.field(default_factory=lambda: list(transforms.IMAGENET_DEFAULT_STD))
    do_pad: bool = True
    pad_size: Any = dataclasses.field(default_factory=lambda: {"height": 1024, "width": 1024})
    mask_size: Any = dataclasses.field(default_factory=lambda: {"longest_edge": 256})
    mask_pad_size: Any = dataclasses.field(default_factory=lambda: {"height": 256, "width": 256})
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            self.size = {"longest_edge": self.size}
        if "longest_edge" not in self.size:
            raise ValueError(f"SamImageProcessor: size must give longest_edge, got {self.size}")
        if isinstance(self.pad_size, int):
            self.pad_size = {"height": self.pad_size, "width": self.pad_size}

    @property
    def target_size(self) -> int:
        """The longest side after resizing (1024 for the hub models)."""
        return int(self.size["longest_edge"])

    # ------------------------------------------------------------------ preprocessing

    def __call__(
        self,
        images: Any,
        input_points: Any = None,
        input_labels: Any = None,
        input_boxes: Any = None,
        return_tensors: str | None = "pt",
        **overrides: Any,
    ) -> BatchFeature:
        """Preprocess one image or a list of images, with optional prompts.

        Returns:
            ``pixel_values [B, 3, S, S]``, ``original_sizes [B, 2]`` and
            ``reshaped_input_sizes [B, 2]`` (int64, ``(height, width)``), and when given
            ``input_points [B, P, n, 2]``, ``input_labels [B, P, n]`` (int64),
            ``input_boxes [B, nb, 4]`` (float64, pixels of the resized image).
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt'")
        settings = dataclasses.replace(self, **overrides) if overrides else self
        images = transforms.require_images(list(images) if isinstance(images, (list, tuple)) else [images])
        pixel_values, original, reshaped = settings._pixel_values(images)
        data: dict[str, Any] = {
            "pixel_values": pixel_values,
            "original_sizes": torch.tensor(original, dtype=torch.int64),
            "reshaped_input_sizes": torch.tensor(reshaped, dtype=torch.int64),
        }
        data.update(settings.prepare_prompts(original, input_points, input_labels, input_boxes))
        return BatchFeature(data)

    preprocess = __call__

    def _pixel_values(self, images: Sequence[Any]) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
        processed, original, reshaped = [], [], []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                image = load_image(image)
            tensor = transforms.to_chw_tensor(image, convert_rgb=self.do_convert_rgb)
            height, width = tensor.shape[-2:]
            original.append((int(height), int(width)))
            if self.do_resize:
                tensor = transforms.resize(tensor, resized_shape(height, width, self.target_size), self.resample)
            reshaped.append(tuple(int(s) for s in tensor.shape[-2:]))
            tensor = transforms.rescale_and_normalize(
                tensor, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
            )
            if self.do_pad:
                tensor = transforms.pad_bottom_right(tensor, (self.pad_size["height"], self.pad_size["width"]))
            processed.append(tensor)
        shapes = {tuple(t.shape) for t in processed}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes after preprocessing ({sorted(shapes)}); enable do_pad")
        return torch.stack(processed), original, reshaped

    def prepare_prompts(
        self,
        original_sizes: Sequence[tuple[int, int]],
        input_points: Any = None,
        input_labels: Any = None,
        input_boxes: Any = None,
    ) -> dict[str, torch.Tensor]:
        """Check prompts given in original-image pixels and rescale them to the resized
        image; prompts for one image apply to every image of the batch."""
        out: dict[str, torch.Tensor] = {}
        sizes = list(original_sizes)
        if input_points is not None:
            points = _as_float64(input_points, "input_points")
            if points.ndim == 3:  # [image][point][xy]: one prompt of several points
                points = points[:, None]
            if points.ndim != 4 or points.shape[-1] != 2:
                raise PromptError("input_points", f"expected [image][prompt][point][x, y], got shape {tuple(points.shape)}")
            _check_count(points, "input_points", sizes)
            if input_labels is None:
                labels = torch.ones(points.shape[:-1], dtype=torch.int64)
            else:
                labels = torch.as_tensor(input_labels, dtype=torch.int64)
                if labels.ndim == 2:
                    labels = labels[:, None]
                if labels.shape != points.shape[:-1]:
                    raise PromptError(
                        "input_labels",
                        f"shape {tuple(labels.shape)} does not match the points' {tuple(points.shape[:-1])}",
                    )
            real = labels != POINT_PAD_VALUE  # padding points are ignored by the model
            for index, size in _per_image(points, sizes):
                _check_inside(points[index][real[index]], size, "input_points", index)
            out["input_points"] = self._rescale(points, sizes)
            out["input_labels"] = labels
        elif input_labels is not None:
            raise PromptError("input_labels", "labels were given without input_points")
        if input_boxes is not None:
            boxes = _as_float64(input_boxes, "input_boxes")
            if boxes.ndim == 2:
                boxes = boxes[:, None]
            if boxes.ndim != 3 or boxes.shape[-1] != 4:
                raise PromptError("input_boxes", f"expected [image][box][x0, y0, x1, y1], got shape {tuple(boxes.shape)}")
            _check_count(boxes, "input_boxes", sizes)
            swapped = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
            if bool(swapped.any()):
                image, box = (int(v) for v in swapped.nonzero()[0])
                raise PromptError(
                    "input_boxes",
                    f"box {box} of image {image} is {boxes[image, box].tolist()}: x1 < x0 or y1 < y0 "
                    "(boxes are [x0, y0, x1, y1], top-left corner first)",
                )
            for index, size in _per_image(boxes, sizes):
                _check_inside(boxes[index].unflatten(-1, (2, 2)), size, "input_boxes", index)
            out["input_boxes"] = self._rescale(boxes.unflatten(-1, (2, 2)), sizes).flatten(-2)
        return out

    def _rescale(self, coordinates: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``[image, ..., 2]`` ``(x, y)`` from original to resized pixels (float64)."""
        scaled = coordinates.clone()
        for index, (height, width) in _per_image(coordinates, sizes):
            new_height, new_width = resized_shape(height, width, self.target_size)
            scaled[index, ..., 0] *= new_width / width
            scaled[index, ..., 1] *= new_height / height
        return scaled

    # ------------------------------------------------------------------ post-processing

    def post_process_masks(
        self,
        masks: Sequence[torch.Tensor] | torch.Tensor,
        original_sizes: Sequence[Sequence[int]] | torch.Tensor,
        reshaped_input_sizes: Sequence[Sequence[int]] | torch.Tensor,
        mask_threshold: float = 0.0,
        binarize: bool = True,
        pad_size: dict[str, int] | None = None,
    ) -> list[torch.Tensor]:
        """Low-resolution mask logits to masks at each image's size.

        Per image: bilinear upsampling of ``masks[i] [P, k, h, w]`` to the padded input
        size, crop of the padding (``reshaped_input_sizes[i]``), bilinear resize to
        ``original_sizes[i]``, then ``> mask_threshold`` when ``binarize``.

        Returns:
            One ``[P, k, H, W]`` tensor per image (bool, or float logits without ``binarize``).
        """
        pad = self.pad_size if pad_size is None else pad_size
        padded = (int(pad["height"]), int(pad["width"]))
        if isinstance(original_sizes, torch.Tensor):
            original_sizes = original_sizes.tolist()
        if isinstance(reshaped_input_sizes, torch.Tensor):
            reshaped_input_sizes = reshaped_input_sizes.tolist()
        results = []
        for image_masks, original, reshaped in zip(masks, original_sizes, reshaped_input_sizes):
            image_masks = torch.as_tensor(image_masks)
            upsampled = F.interpolate(image_masks, padded, mode="bilinear", align_corners=False)
            upsampled = upsampled[..., : int(reshaped[0]), : int(reshaped[1])]
            upsampled = F.interpolate(
                upsampled, (int(original[0]), int(original[1])), mode="bilinear", align_corners=False
            )
            results.append(upsampled > mask_threshold if binarize else upsampled)
        return results


def _as_float64(values: Any, name: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PromptError(name, f"not a nested list of numbers of one shape ({exc})") from None
    if tensor.numel() == 0:
        raise PromptError(name, "empty: give at least one point or box per image")
    if not bool(torch.isfinite(tensor).all()):
        raise PromptError(name, "coordinates must be finite numbers")
    return tensor


def _check_count(prompts: torch.Tensor, name: str, sizes: Sequence[tuple[int, int]]) -> None:
    if prompts.shape[0] not in (1, len(sizes)):
        raise PromptError(name, f"prompts for {prompts.shape[0]} images, but {len(sizes)} images were given")


def _per_image(prompts: torch.Tensor, sizes: Sequence[tuple[int, int]]):
    """``(prompt index, image size)`` pairs: one set of prompts may serve every image
    (then the first image's size rescales it, as in the reference)."""
    if prompts.shape[0] == len(sizes):
        return list(enumerate(sizes))
    return [(0, sizes[0])]


def _check_inside(coordinates: torch.Tensor, size: tuple[int, int], name: str, image: int) -> None:
    """``coordinates [..., 2]`` ``(x, y)`` must lie in ``[0, width] x [0, height]``."""
    height, width = size
    x, y = coordinates[..., 0], coordinates[..., 1]
    outside = (x < 0) | (x > width) | (y < 0) | (y > height)
    if bool(outside.any()):
        point = coordinates[tuple(outside.nonzero()[0])].tolist()
        raise PromptError(
            name,
            f"point {point} of image {image} lies outside the {width}x{height} image "
            "(coordinates are (x, y) in pixels of the original image)",
        )
