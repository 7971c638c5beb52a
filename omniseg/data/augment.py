"""Training augmentation for (image, label map) pairs, in torch only (no torchvision).

Every geometric transform is applied to the image and the label map together: images are
resampled bilinearly, label maps with nearest neighbour (so no new class ids appear), and
padding fills labels with the ignore index (so padded pixels never count in a loss).

Images are ``uint8`` tensors ``[3, H, W]``; label maps are ``int64`` tensors ``[H, W]``.
All randomness comes from an explicit ``torch.Generator``: the training dataset seeds one per
(seed, epoch, sample), so a sample's augmentation does not depend on the worker that loads
it or on whether the run was resumed.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def resize_pair(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Resize ``image`` ``[3, H, W]`` (bilinear, antialiased when shrinking) and ``label``
    ``[H, W]`` (nearest) to ``size = (height, width)``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    shrinking = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    resized = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )[0]
    image = resized.round_().clamp_(0, 255).to(torch.uint8)
    # nearest-exact picks the pixel whose centre is closest, without the half-pixel shift of
    # "nearest", so labels stay aligned with the bilinearly resized image.
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return image, label.to(torch.int64)


def random_scale(
    image: Tensor,
    label: Tensor,
    generator: torch.Generator,
    *,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Resize both by a factor drawn uniformly from ``scale_range``.

    The factor applies to ``base_size`` (``(height, width)``, e.g. the crop size) when
    given, keeping the image's aspect ratio and fitting it inside ``base_size`` first, as in
    mmsegmentation's ``RandomResize(scale, ratio_range, keep_ratio=True)``; otherwise to the
    image's own size.
    """
    height, width = image.shape[-2:]
    factor = _uniform(*scale_range, generator)
    if base_size is not None:
        factor *= min(base_size[0] / height, base_size[1] / width)
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    return resize_pair(image, label, size)


def pad_pair(
    image: Tensor, label: Tensor, size: tuple[int, int], ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Pad bottom/right up to at least ``size``: image with 0, label with ``ignore_index``."""
    pad_h = max(0, size[0] - image.shape[-2])
    pad_w = max(0, size[1] - image.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return image, label
    image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
    label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, label


def random_crop(
    image: Tensor,
    label: Tensor,
    size: tuple[int, int],
    generator: torch.Generator,
    *,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    """Crop a random ``size = (height, width)`` window, padding first when the image is smaller."""
    image, label = pad_pair(image, label, size, ignore_index)
    height, width = image.shape[-2:]
    top = int(torch.randint(0, height - size[0] + 1, (), generator=generator))
    left = int(torch.randint(0, width - size[1] + 1, (), generator=generator))
    return (
        image[:, top : top + size[0], left : left + size[1]],
        label[top : top + size[0], left : left + size[1]],
    )


def random_hflip(
    image: Tensor, label: Tensor, generator: torch.Generator, *, p: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Mirror both left-right with probability ``p``."""
    if float(torch.rand((), generator=generator)) < p:
        return image.flip(-1), label.flip(-1)
    return image, label


# -- colour ---------------------------------------------------------------------------------


def _grayscale(image: Tensor) -> Tensor:
    """ITU-R 601-2 luma of a float ``[3, H, W]`` image, ``[1, H, W]``."""
    r, g, b = image.unbind(0)
    return (0.299 * r + 0.587 * g + 0.114 * b)[None]


def _blend(image: Tensor, other: Tensor, factor: float) -> Tensor:
    return (factor * image + (1.0 - factor) * other).clamp_(0.0, 1.0)


def rgb_to_hsv(image: Tensor) -> Tensor:
    """Float RGB ``[3, H, W]`` in [0, 1] to HSV with all channels in [0, 1]."""
    r, g, b = image.unbind(0)
    maxc, _ = image.max(0)
    minc, _ = image.min(0)
    delta = maxc - minc
    value = maxc
    saturation = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(
        maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc)
    )
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value])


def hsv_to_rgb(image: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = image.unbind(0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    # Each sector i of the hue circle picks (r, g, b) from (v, t, p, q) differently.
    choices = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q]).view(3, 6, *h.shape)
    return torch.gather(choices, 1, i[None, None].expand(3, 1, *h.shape))[:, 0]


@dataclasses.dataclass
class ColorJitter:
    """Random brightness, contrast, saturation and hue, applied in a random order.

    Factors are drawn uniformly from ``[1 - x, 1 + x]`` (brightness, contrast, saturation) and
    the hue shift from ``[-hue, hue]`` of a full turn, as in the seeds'
    ``ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.1)``.
    """

    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25
    hue: float = 0.1

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """``image``: uint8 ``[3, H, W]``; returns uint8 ``[3, H, W]``."""
        x = image.float() / 255.0
        for op in torch.randperm(4, generator=generator).tolist():
            if op == 0 and self.brightness > 0:
                x = _blend(x, torch.zeros_like(x), _uniform(1 - self.brightness, 1 + self.brightness, generator))
            elif op == 1 and self.contrast > 0:
                factor = _uniform(1 - self.contrast, 1 + self.contrast, generator)
                x = _blend(x, _grayscale(x).mean().expand_as(x), factor)
            elif op == 2 and self.saturation > 0:
                factor = _uniform(1 - self.saturation, 1 + self.saturation, generator)
                x = _blend(x, _grayscale(x).expand_as(x), factor)
            elif op == 3 and self.hue > 0:
                shift = _uniform(-self.hue, self.hue, generator)
                hsv = rgb_to_hsv(x)
                hsv[0] = (hsv[0] + shift) % 1.0
                x = hsv_to_rgb(hsv)
        return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(3.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a float ``[3, H, W]`` image (reflect padding at the borders)."""
    kernel = _gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    x = image[None]
    if min(image.shape[-2:]) <= radius:
        return image
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x[0]


def jpeg_roundtrip(image: Tensor, quality: int) -> Tensor:
    """Encode a uint8 ``[3, H, W]`` image as JPEG at ``quality`` and decode it (PIL)."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return torch.from_numpy(np.asarray(decoded.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


@dataclasses.dataclass
class PhotometricAugmentation:
    """Camera and light changes beyond colour jitter, each applied with its probability:
    gamma, Gaussian blur, Gaussian sensor noise, JPEG compression.

    What a model trained on a few drives meets on other streets: other exposure curves,
    focus, sensor noise and compression. Defaults are moderate (the image stays readable).

    Args:
        gamma_prob, gamma_range: probability and range of ``x ** gamma`` on [0, 1] pixels.
        blur_prob, blur_sigma: probability and sigma range (pixels) of a Gaussian blur.
        noise_prob, noise_std: probability and range of the noise's standard deviation (0-255 units).
        jpeg_prob, jpeg_quality: probability and quality range of a JPEG round trip.
    """

    gamma_prob: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.5)
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise_prob: float = 0.2
    noise_std: tuple[float, float] = (2.0, 8.0)
    jpeg_prob: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """``image``: uint8 ``[3, H, W]``; returns uint8 ``[3, H, W]``."""
        draws = torch.rand(4, generator=generator).tolist()
        x = image.float() / 255.0
        if draws[0] < self.gamma_prob:
            x = x.pow(_uniform(*self.gamma_range, generator))
        if draws[1] < self.blur_prob:
            x = gaussian_blur(x, _uniform(*self.blur_sigma, generator))
        if draws[2] < self.noise_prob:
            std = _uniform(*self.noise_std, generator) / 255.0
            x = x + std * torch.randn(x.shape, generator=generator)
        out = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        if draws[3] < self.jpeg_prob:
            low, high = self.jpeg_quality
            out = jpeg_roundtrip(out, int(torch.randint(low, high + 1, (), generator=generator)))
        return out


@dataclasses.dataclass
class TrainAugmentation:
    """Random scale → random crop (pad with ignore) → horizontal flip → colour jitter →
    photometric changes (gamma, blur, noise, JPEG; off by default).

    Args:
        crop_size: ``(height, width)`` of every output; ``None`` keeps the scaled size.
        scale_range: range of the random scale factor (see :func:`random_scale`);
            ``None`` disables scaling.
        flip_prob: probability of a horizontal flip.
        color_jitter: colour jitter, or ``None`` to disable it.
        photometric: :class:`PhotometricAugmentation`, or ``None`` (the default) for none.
        ignore_index: label written into padded pixels.
        relative_to_crop: scale relative to the crop size (True) or to the image (False).
    """

    crop_size: tuple[int, int] | None = (512, 512)
    scale_range: tuple[float, float] | None = (0.5, 2.0)
    flip_prob: float = 0.5
    color_jitter: ColorJitter | None = dataclasses.field(default_factory=ColorJitter)
    photometric: PhotometricAugmentation | None = None
    ignore_index: int = 255
    relative_to_crop: bool = False

    def __call__(
        self, image: Tensor, label: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Augment uint8 ``[3, H, W]`` and int64 ``[H, W]``; same-size outputs."""
        if image.shape[-2:] != label.shape[-2:]:
            raise ValueError(
                f"image {tuple(image.shape[-2:])} and label map {tuple(label.shape)} differ in size"
            )
        if self.scale_range is not None:
            base = self.crop_size if self.relative_to_crop else None
            image, label = random_scale(
                image, label, generator, scale_range=self.scale_range, base_size=base
            )
        if self.crop_size is not None:
            image, label = random_crop(
                image, label, self.crop_size, generator, ignore_index=self.ignore_index
            )
        if self.flip_prob > 0:
            image, label = random_hflip(image, label, generator, p=self.flip_prob)
        if self.color_jitter is not None:
            image = self.color_jitter(image, generator)
        if self.photometric is not None:
            image = self.photometric(image, generator)
        return image.contiguous(), label.contiguous()


@dataclasses.dataclass
class CopyPaste:
    """Paste the pixels of chosen classes from another training sample onto this one.

    The donor is another sample of the training set, augmented on its own (its own scale,
    crop, flip and colours), so rare and thin objects (poles, signs, people) appear in other
    streets, at other sizes and in other light than the frames they were drawn in: what a
    model trained on a few drives otherwise learns as part of one scene. Pasted pixels
    replace the image and the label where the donor's label is one of ``class_ids``; the
    instances of thing classes are then read from the pasted label map as usual.

    Args:
        class_ids: training class ids whose pixels are pasted.
        prob: probability that a sample receives a donor's pixels.
    """

    class_ids: tuple[int, ...]
    prob: float = 0.5

    def __call__(
        self, image: Tensor, label: Tensor, donor_image: Tensor, donor_label: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``image``/``donor_image`` uint8 ``[3, H, W]``, ``label``/``donor_label`` int64
        ``[H, W]``; a donor of another size is resized to the sample's first."""
        if donor_image.shape[-2:] != image.shape[-2:]:
            donor_image, donor_label = resize_pair(donor_image, donor_label, tuple(image.shape[-2:]))
        pasted = torch.isin(donor_label, torch.tensor(self.class_ids, dtype=donor_label.dtype))
        return torch.where(pasted, donor_image, image), torch.where(pasted, donor_label, label)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from ``(seed, epoch, index)``, distinct for distinct triples."""
    # A fixed odd-multiplier mix keeps nearby triples far apart in seed space.
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


__all__ = [
    "ColorJitter",
    "CopyPaste",
    "PhotometricAugmentation",
    "TrainAugmentation",
    "hsv_to_rgb",
    "pad_pair",
    "gaussian_blur",
    "jpeg_roundtrip",
    "random_crop",
    "random_hflip",
    "random_scale",
    "resize_pair",
    "rgb_to_hsv",
    "sample_generator",
]
