"""Image operations on torch tensors, shared by all image processors.

Everything works on channels-first tensors ``[C, H, W]`` (or batches ``[B, C, H, W]``) and
avoids per-pixel Python. The semantics follow the reference implementation's default
(torch/torchvision) backend:

* conversion from PIL / numpy / torch with channel-format inference (1, 3 or 4 channels);
* optional RGB conversion (PIL images through PIL, alpha composited onto white);
* output-size computation for ``{"shortest_edge", "longest_edge"}``, ``{"shortest_edge"}``,
  ``{"max_height", "max_width"}`` and ``{"height", "width"}`` size dictionaries;
* anti-aliased resizing (bilinear / bicubic, uint8 kept as uint8 with rounding), exact
  nearest resizing for label maps;
* rescale, normalize (fused into one pass), bottom/right padding and batch padding with a
  ``pixel_mask``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"

# The ImageNet statistics that the hub's processors normalise with by default.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# PIL resampling codes, as stored in preprocessor_config.json ("resample": 2).
NEAREST = 0
LANCZOS = 1
BILINEAR = 2
BICUBIC = 3
BOX = 4
HAMMING = 5

_TORCH_MODES = {NEAREST: "nearest-exact", BILINEAR: "bilinear", BICUBIC: "bicubic"}
_RESAMPLE_NAMES = {
    "nearest": NEAREST,
    "nearest-exact": NEAREST,
    "nearest_exact": NEAREST,
    "lanczos": LANCZOS,
    "bilinear": BILINEAR,
    "bicubic": BICUBIC,
    "box": BOX,
    "hamming": HAMMING,
}


# --------------------------------------------------------------------------- conversion


def infer_channel_format(shape: Sequence[int], num_channels: Sequence[int] = (1, 3, 4)) -> str:
    """Channel layout of a 3-D image shape: ``"channels_first"`` (C, H, W) or ``"channels_last"``.

    Ambiguous shapes (both ends look like channel counts) are read as channels first, as the
    reference does. Raises ``ValueError`` when neither end is a valid channel count.
    """
    if len(shape) != 3:
        raise ValueError(f"expected a 3-D image shape, got {tuple(shape)}")
    if shape[0] in num_channels:
        return CHANNELS_FIRST
    if shape[-1] in num_channels:
        return CHANNELS_LAST
    raise ValueError(
        f"cannot infer the channel dimension of an image of shape {tuple(shape)}: "
        f"neither the first nor the last dimension is one of {tuple(num_channels)}"
    )


def _pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """PIL image to an ``[H, W, 3]`` uint8 array, compositing transparency onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def convert_tensor_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` with C in (1, 3, 4) to three channels.

    One channel is repeated; four channels (RGBA) are composited onto white. Integer images are
    treated as 0..255 and converted back to their dtype the way torchvision does; floating images
    must lie in [0, 1]. Other channel counts are returned unchanged.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a [C, H, W] image, got shape {tuple(image.shape)}")
    channels = image.shape[0]
    if channels == 1:
        return image.expand(3, -1, -1).contiguous()
    if channels != 4:
        return image
    if image.is_floating_point():
        if image.min() < 0.0 or image.max() > 1.0:
            raise ValueError("an RGBA float image to convert to RGB must have values in [0, 1]")
        rgb, alpha = image[:3], image[3:]
        return rgb * alpha + (1.0 - alpha)
    max_value = float(torch.iinfo(image.dtype).max)
    scaled = image.to(torch.float32) / max_value
    rgb, alpha = scaled[:3], scaled[3:]
    composite = rgb * alpha + (1.0 - alpha)
    # torchvision's float -> int conversion: multiply by (max + 1 - eps), truncate.
    return composite.mul(max_value + 1.0 - 1e-3).to(image.dtype)


def require_images(images: list[Any]) -> list[Any]:
    """``images`` unchanged, or a ValueError when the batch is empty (which used to fail in
    the middle of preprocessing as "max() arg is an empty sequence" or "stack expects a
    non-empty TensorList")."""
    if not images:
        raise ValueError("images: got an empty list; pass an image or a list of at least one image")
    return images


def to_chw_tensor(
    image: ImageLike,
    *,
    convert_rgb: bool = False,
    channel_format: str | None = None,
) -> torch.Tensor:
    """Any supported image to a ``[C, H, W]`` tensor, keeping its dtype (uint8 for photos).

    Args:
        image: PIL image, numpy array or tensor; arrays are ``[H, W]``, ``[H, W, C]`` or
            ``[C, H, W]`` with C in (1, 3, 4).
        convert_rgb: convert to three channels (grayscale repeated, alpha composited on white).
            Without it, grayscale stays one channel and RGBA four, exactly like the reference.
        channel_format: ``"channels_first"`` / ``"channels_last"`` to skip inference for arrays.

    Returns:
        A ``[C, H, W]`` tensor: for a PIL image, a view of its ``[H, W, C]`` pixels (no copy:
        :func:`resize` hands them back to PIL as they are, and the normalisation writes
        channel-first memory); otherwise contiguous.
    """
    if isinstance(image, Image.Image):
        array = _pil_to_rgb_array(image) if convert_rgb else np.array(image)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if tensor.ndim == 2:
            return tensor.unsqueeze(0)
        return tensor.permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_:
            image = image.astype(np.uint8)
        if not image.flags.writeable:
            # np.asarray(pil_image) is read-only: torch.from_numpy would warn users that writing
            # to it is "undefined behavior" (nothing writes to it, but the warning alarms).
            image = image.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach()
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}; expected PIL, numpy or torch")

    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim == 3:
        layout = channel_format or infer_channel_format(tensor.shape)
        if layout == CHANNELS_LAST:
            tensor = tensor.permute(2, 0, 1)
        elif layout != CHANNELS_FIRST:
            raise ValueError(f"unknown channel format {layout!r}")
    else:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}")
    if convert_rgb:
        tensor = convert_tensor_to_rgb(tensor)
    return tensor.contiguous()


def label_map_to_tensor(label_map: ImageLike) -> torch.Tensor:
    """A single-channel label map (PIL, numpy or tensor; ``[H, W]`` or ``[1, H, W]``) to ``[H, W]``."""
    if isinstance(label_map, Image.Image):
        tensor = torch.from_numpy(np.array(label_map))
    elif isinstance(label_map, np.ndarray):
        # A read-only array (np.asarray of a PIL image) is copied, as images are above.
        tensor = torch.from_numpy(np.ascontiguousarray(label_map if label_map.flags.writeable else label_map.copy()))
    elif isinstance(label_map, torch.Tensor):
        tensor = label_map.detach()
    else:
        raise TypeError(f"unsupported label map type {type(label_map).__name__}")
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"a segmentation map must be [H, W] (or [1, H, W]), got shape {tuple(tensor.shape)}")
    return tensor.contiguous()


# --------------------------------------------------------------------------- sizes


def size_with_aspect_ratio(height: int, width: int, shortest_edge: int, longest_edge: int | None = None) -> tuple[int, int]:
    """Output ``(height, width)`` whose short side is ``shortest_edge`` unless that would make the
    long side exceed ``longest_edge`` (then the long side is capped), keeping the aspect ratio.

    Rounding is the reference's (``int()`` truncation of the long side, ``round`` of a capped short
    side).
    """
    size = shortest_edge
    raw_size = None
    if longest_edge is not None:
        short_side, long_side = float(min(height, width)), float(max(height, width))
        if long_side / short_side * size > longest_edge:
            raw_size = longest_edge * short_side / long_side
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        new_width = size
        new_height = int((raw_size if raw_size is not None else size) * height / width)
        return new_height, new_width
    new_height = size
    new_width = int((raw_size if raw_size is not None else size) * width / height)
    return new_height, new_width


def size_for_shortest_edge(height: int, width: int, shortest_edge: int, max_size: int | None = None) -> tuple[int, int]:
    """torchvision ``Resize(int)`` semantics: short side to ``shortest_edge``, long side truncated."""
    short_side, long_side = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long_side / short_side)
    if max_size is not None:
        if max_size <= shortest_edge:
            raise ValueError(f"max_size {max_size} must be larger than the shortest edge {shortest_edge}")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def size_for_max_height_width(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio that fits ``max_height`` x ``max_width`` (up- or down-scaling)."""
    scale = min(max_height / height, max_width / width)
    return int(height * scale), int(width * scale)


def resize_output_size(
    height: int,
    width: int,
    size: Mapping[str, int | None],
    size_divisor: int | None = None,
) -> tuple[int, int]:
    """Output ``(height, width)`` of a resize described by a size dictionary.

    Args:
        height, width: input size.
        size: ``{"shortest_edge", "longest_edge"}``, ``{"shortest_edge"}``,
            ``{"max_height", "max_width"}`` or ``{"height", "width"}``.
        size_divisor: when > 0, both sides are rounded *up* to a multiple of it (the image is
            resized to that size, as the reference's Mask2Former/MaskFormer processors do).
    """
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if shortest and longest:
        new_size = size_with_aspect_ratio(height, width, shortest, longest)
    elif shortest:
        new_size = size_for_shortest_edge(height, width, shortest)
    elif size.get("max_height") and size.get("max_width"):
        new_size = size_for_max_height_width(height, width, size["max_height"], size["max_width"])
    elif size.get("height") and size.get("width"):
        new_size = (int(size["height"]), int(size["width"]))
    else:
        raise ValueError(
            "size must have 'shortest_edge' (optionally with 'longest_edge'), 'max_height' and "
            f"'max_width', or 'height' and 'width'; got {dict(size)}"
        )
    if size_divisor:
        new_size = (
            int(math.ceil(new_size[0] / size_divisor) * size_divisor),
            int(math.ceil(new_size[1] / size_divisor) * size_divisor),
        )
    return new_size


def normalize_size_dict(size: int | Sequence[int] | Mapping[str, int] | None, max_size: int | None = None) -> dict[str, int]:
    """Legacy ``size`` values (int, ``(h, w)``, ``max_size``) to a size dictionary.

    An int means the shortest edge (``max_size`` becomes ``longest_edge``); a pair is
    ``(height, width)``; dictionaries are returned with ``None`` entries dropped.
    """
    if size is None:
        if max_size is None:
            raise ValueError("size or max_size is required")
        return {"longest_edge": int(max_size)}
    if isinstance(size, Mapping):
        return {k: int(v) for k, v in size.items() if v is not None}
    if isinstance(size, int):
        out = {"shortest_edge": size}
        if max_size is not None:
            out["longest_edge"] = int(max_size)
        return out
    values = list(size)
    if len(values) == 1:
        return normalize_size_dict(int(values[0]), max_size)
    if len(values) == 2:
        return {"height": int(values[0]), "width": int(values[1])}
    raise ValueError(f"cannot read size {size!r}")


# --------------------------------------------------------------------------- resize


def resample_code(resample: int | str | None) -> int:
    """A PIL resampling code from an int, a PIL enum or a name (``"bilinear"``...); None = bilinear."""
    if resample is None:
        return BILINEAR
    if isinstance(resample, str):
        try:
            return _RESAMPLE_NAMES[resample.lower()]
        except KeyError:
            raise ValueError(f"unknown resample {resample!r}") from None
    code = int(resample)
    if code not in (NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING):
        raise ValueError(f"unknown resample code {code}")
    return code


def _resize_with_pil(image: torch.Tensor, size: tuple[int, int], code: int) -> torch.Tensor:
    """PIL resize of a uint8 ``[..., H, W]`` tensor, one PIL call per image (or per channel).

    The reference's PIL backend (its default whenever torchvision is absent, and the
    behaviour published results were produced with) resizes uint8 images and label maps
    with PIL; torch's uint8 kernel differs from it by one level on a few values, enough to
    flip near-tie pixels of a final segmentation. Going through PIL gives identical answers.
    """
    lead = image.shape[:-3] if image.ndim >= 3 else ()
    chw = image.reshape(-1, *image.shape[-3:]) if image.ndim >= 3 else image.reshape(1, 1, *image.shape)
    items = chw.cpu().numpy()
    if items.shape[1] == 3:
        # RGB as PIL holds it, [H, W, 3]: a view, not a copy, for pixels already in that
        # layout (see to_chw_tensor); the results stay so, viewed channel-first.
        resized = [
            np.asarray(Image.fromarray(np.ascontiguousarray(item.transpose(1, 2, 0))).resize((size[1], size[0]), resample=code))
            for item in items
        ]
        out = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    else:
        out = torch.from_numpy(
            np.stack(
                [np.stack([np.asarray(Image.fromarray(ch).resize((size[1], size[0]), resample=code)) for ch in item]) for item in items]
            )
        )
    if image.ndim < 3:
        return out.reshape(*size).to(image.device)
    return out.reshape(*lead, image.shape[-3], *size).to(image.device)


def resize(
    image: torch.Tensor,
    size: tuple[int, int],
    resample: int | str | None = BILINEAR,
    antialias: bool = True,
) -> torch.Tensor:
    """Resize ``[..., H, W]`` (e.g. ``[C, H, W]`` or ``[B, C, H, W]``) to ``size = (height, width)``.

    uint8 images, and integer label maps whose values fit in uint8, are resized by PIL (see
    :func:`_resize_with_pil`). Other inputs use torch: bilinear/bicubic anti-aliased when
    downscaling, like PIL; nearest is "nearest-exact" (pixel-centre sampling), right for
    label maps of any integer dtype. Returns a tensor of the input's dtype.
    """
    height, width = int(size[0]), int(size[1])
    if tuple(image.shape[-2:]) == (height, width):
        return image
    code = resample_code(resample)
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        return _resize_with_pil(image, (height, width), code)
    if code == NEAREST and not image.is_floating_point() and _fits_uint8(image):
        return _resize_with_pil(image.to(torch.uint8), (height, width), code).to(image.dtype)
    if code in (BOX, HAMMING):
        raise ValueError("box/hamming resampling is only supported for uint8 images")
    if code == LANCZOS:
        code = BICUBIC
    mode = _TORCH_MODES[code]
    lead = image.shape[:-2]
    batch = image.reshape(-1, 1, *image.shape[-2:]) if image.ndim < 3 else image.reshape(-1, *image.shape[-3:])
    if mode == "nearest-exact":
        if batch.dtype in (torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16):
            out = F.interpolate(batch, size=(height, width), mode=mode)
        else:
            # Integer label maps of wider types: gather with the same pixel-centre indices.
            rows = _nearest_exact_indices(batch.shape[-2], height, batch.device)
            cols = _nearest_exact_indices(batch.shape[-1], width, batch.device)
            out = batch[..., rows[:, None], cols[None, :]]
        return out.reshape(*lead, height, width)

    align = False
    if batch.dtype == torch.uint8 and mode == "bilinear" and batch.device.type == "cpu":
        out = F.interpolate(batch, size=(height, width), mode=mode, align_corners=align, antialias=antialias)
    elif batch.is_floating_point():
        out = F.interpolate(batch, size=(height, width), mode=mode, align_corners=align, antialias=antialias)
    else:
        info = torch.iinfo(batch.dtype)
        out = F.interpolate(
            batch.to(torch.float32), size=(height, width), mode=mode, align_corners=align, antialias=antialias
        )
        out = out.clamp_(info.min, info.max).round_().to(batch.dtype)
    return out.reshape(*lead, height, width)


def _fits_uint8(image: torch.Tensor) -> bool:
    return image.device.type == "cpu" and image.numel() > 0 and 0 <= int(image.min()) and int(image.max()) <= 255


def _nearest_exact_indices(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """Source indices that torch's "nearest-exact" mode samples along one axis (bit-identical)."""
    grid = torch.arange(in_size, dtype=torch.float32, device=device).view(1, 1, in_size)
    return F.interpolate(grid, size=out_size, mode="nearest-exact").view(-1).long()


# --------------------------------------------------------------------------- values


def rescale(image: torch.Tensor, factor: float) -> torch.Tensor:
    """``image * factor`` in float32."""
    return image.to(torch.float32) * factor


def normalize(
    image: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]
) -> torch.Tensor:
    """``(image - mean) / std`` per channel on ``[..., C, H, W]`` (float32 out).

    Raises ``ValueError`` when ``mean``/``std`` have a length other than the channel count.
    """
    image = image.to(torch.float32)
    channels = image.shape[-3]
    mean_t = _per_channel(mean, channels, "mean", image.device)
    std_t = _per_channel(std, channels, "std", image.device)
    return (image - mean_t) / std_t


def rescale_and_normalize(
    image: torch.Tensor,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: float | Sequence[float] | None,
    std: float | Sequence[float] | None,
) -> torch.Tensor:
    """Rescale then normalize ``[..., C, H, W]``; returns float32.

    The arithmetic is the reference's NumPy backend (what it runs without torchvision, as
    with the PIL resizing here): rescale in float64, round to float32, then
    ``(x - mean) / std`` in float32. The inputs are then bit-identical to the reference's,
    so near-tie pixels of a final segmentation do not flip. uint8 pixels take those values
    from a table of the 256 levels per channel, computed the same way.
    """
    if do_normalize:
        if mean is None or std is None:
            raise ValueError("image_mean and image_std are required to normalize")
        if do_rescale and image.dtype == torch.uint8 and image.ndim >= 3:
            levels = (torch.arange(256, dtype=torch.float64, device=image.device) * rescale_factor).to(torch.float32)
            table = normalize(levels.view(1, 256, 1).expand(image.shape[-3], 256, 1), mean, std)  # [C, 256, 1]
            offsets = torch.arange(0, 256 * image.shape[-3], 256, device=image.device).view(-1, 1, 1)
            index = image.to(torch.int64, memory_format=torch.contiguous_format) + offsets
            return table.view(-1)[index]
        if do_rescale:
            image = (image.to(torch.float64) * rescale_factor).to(torch.float32)
        return normalize(image, mean, std)
    if do_rescale:
        return rescale(image, rescale_factor)
    return image.to(torch.float32)


def _per_channel(values: float | Sequence[float], channels: int, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(values, (int, float)):
        values = [float(values)] * channels
    values = [float(v) for v in values]
    if len(values) != channels:
        raise ValueError(
            f"image_{name} has {len(values)} values but the image has {channels} channel(s); "
            "convert the image to RGB (do_convert_rgb=True) or adjust the setting"
        )
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


# --------------------------------------------------------------------------- padding


def pad_bottom_right(image: torch.Tensor, size: tuple[int, int], fill: float = 0) -> torch.Tensor:
    """Pad ``[..., H, W]`` at the bottom and right to ``size = (height, width)`` with ``fill``."""
    height, width = image.shape[-2:]
    pad_h, pad_w = int(size[0]) - height, int(size[1]) - width
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"cannot pad an image of size {(height, width)} to the smaller size {tuple(size)}")
    if pad_h == 0 and pad_w == 0:
        return image
    out = image.new_full((*image.shape[:-2], height + pad_h, width + pad_w), fill)
    out[..., :height, :width] = image
    return out


def pad_batch(
    images: Sequence[torch.Tensor],
    pad_size: tuple[int, int] | None = None,
    fill: float = 0,
    pad_to_multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[C, H_i, W_i]`` images into ``[B, C, H, W]``, padded bottom/right with ``fill``.

    Args:
        images: tensors with the same channel count and dtype.
        pad_size: ``(height, width)`` to pad to; default the largest height and width in the batch.
        fill: value of padded pixels.
        pad_to_multiple_of: round the padded size up to a multiple of this.

    Returns:
        ``(batch [B, C, H, W], pixel_mask [B, H, W] int64)``, 1 on real pixels and 0 on padding.
    """
    if not images:
        raise ValueError("no images to pad")
    if pad_size is None:
        pad_size = (max(im.shape[-2] for im in images), max(im.shape[-1] for im in images))
    height, width = int(pad_size[0]), int(pad_size[1])
    if pad_to_multiple_of:
        height = int(math.ceil(height / pad_to_multiple_of) * pad_to_multiple_of)
        width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    first = images[0]
    if all(tuple(im.shape[-2:]) == (height, width) for im in images):
        # Nothing to pad (one image, or a batch of one size): no fill and copy of every pixel.
        batch = first.unsqueeze(0) if len(images) == 1 else torch.stack(list(images))
        return batch, torch.ones((len(images), height, width), dtype=torch.int64, device=first.device)
    batch = first.new_full((len(images), *first.shape[:-2], height, width), fill)
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.int64, device=first.device)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        if h > height or w > width:
            raise ValueError(f"cannot pad an image of size {(h, w)} to the smaller size {(height, width)}")
        batch[i, ..., :h, :w] = image
        pixel_mask[i, :h, :w] = 1
    return batch, pixel_mask
