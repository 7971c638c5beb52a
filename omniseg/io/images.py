"""Reading images robustly: every input becomes an RGB ``PIL.Image`` or a typed error.

``load_image`` accepts what the pipelines accept (a local path, an http(s) URL, a PIL
image, a numpy array) and follows the reference pipelines' recipe, ``exif_transpose`` then
``convert("RGB")``, so that results on the same file equal the reference's. It departs from
that recipe only where Pillow's conversion loses the picture: 16-bit and 32-bit integer
images (Pillow clips them to 255 instead of scaling) and 32-bit float images.

Every failure is an :class:`~omniseg.errors.InputError` subclass naming the source and the
reason: :class:`ImageReadError` (missing, empty, truncated, corrupt, not an image, network
failure), :class:`ImageTooLargeError` (over ``max_pixels``, checked on the header before any
pixel is decoded), :class:`UnsupportedImageError` (decodes, but cannot become RGB).
"""

from __future__ import annotations

import io
import logging
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from omniseg.errors import ImageReadError, ImageTooLargeError, UnsupportedImageError

logger = logging.getLogger(__name__)

# Pillow's own decompression-bomb warning threshold (~89.5 megapixels, 0.25 GiB as RGBA).
# Segmentation models resize far below this, so larger inputs are almost always mistakes.
DEFAULT_MAX_PIXELS = 89_478_485

# Seconds to wait on an http(s) server before giving up.
DEFAULT_URL_TIMEOUT = 30.0

# Largest download accepted for a URL; a bigger body is refused before it fills memory.
MAX_URL_BYTES = 256 * 1024 * 1024

# File extensions that ``iter_image_files`` picks up when walking a folder (lower case).
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif",
        ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2",
        ".j2k", ".jpf", ".jpx", ".ico", ".sgi", ".rgb", ".pcx", ".dds", ".qoi",
    }
)  # fmt: skip

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(
    source: ImageInput,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    timeout: float = DEFAULT_URL_TIMEOUT,
) -> Image.Image:
    """Return ``source`` as a fully decoded RGB image, upright per its EXIF orientation.

    Args:
        source: a local path (``str`` or ``os.PathLike``), an ``http://`` / ``https://`` URL,
            a ``PIL.Image.Image``, or a ``numpy`` array (``HxW`` or ``HxWxC`` uint8, C in 1/3/4).
        max_pixels: refuse images with more pixels than this (``None``: no limit of ours;
            Pillow's ``Image.MAX_IMAGE_PIXELS`` bomb check still applies to files).
        timeout: seconds to wait on the server for a URL.

    Raises:
        ImageReadError: missing, empty, truncated, corrupt or non-image file; URL failure.
        ImageTooLargeError: more pixels than ``max_pixels``, or a Pillow decompression bomb.
        UnsupportedImageError: an array of bad dtype or shape, or a mode with no RGB form.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or f"<PIL image {source.mode} {source.width}x{source.height}>"
        _check_size(name, source.size, max_pixels)
        # An image from Image.open() may still be undecoded (lazy); decoding here turns a
        # truncated file into our typed error rather than a bare OSError later on.
        _decode(source, name)
        return _to_rgb(_upright(source, name), name)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and text.lower().startswith(("http://", "https://")):
            return _open_bytes(_fetch(text, timeout), text, max_pixels)
        return _open_path(Path(text), max_pixels)
    raise UnsupportedImageError(
        f"<{type(source).__name__}>",
        "not an image input: expected a path, an http(s) URL, a PIL image or a numpy array",
    )


def load_image_bytes(
    data: bytes, *, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an encoded image held in memory (an upload, say) as :func:`load_image` does a file.

    Args:
        data: the file's bytes (PNG, JPEG, ... anything Pillow reads).
        name: how errors name the input (the uploaded file's name, for example).
        max_pixels: as for :func:`load_image`; checked on the header, before decoding.

    Raises:
        ImageReadError, ImageTooLargeError, UnsupportedImageError: as :func:`load_image`.
    """
    return _open_bytes(data, name, max_pixels)


def iter_image_files(
    paths_or_dirs: Iterable[str | os.PathLike], recursive: bool = True
) -> list[Path]:
    """List image files: folders are walked for known image extensions, files are kept as named.

    A file named explicitly is kept whatever its extension (and even if it does not exist,
    so that the caller reports it as missing rather than dropping it silently). Folders are
    walked in sorted order, skipping hidden entries (names starting with "."), so the
    result is deterministic. A file reached twice is listed once, at its first position.
    """
    found: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = Path(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            found.append(path)

    for item in paths_or_dirs:
        path = Path(item)
        if not path.is_dir():
            add(path)
            continue
        for root, dirs, files in os.walk(path):
            # Sorting in place also fixes the order os.walk descends in.
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
            for name in sorted(files):
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    add(Path(root) / name)
    return found


# --- sources -----------------------------------------------------------------------------


def _open_path(path: Path, max_pixels: int | None) -> Image.Image:
    name = str(path)
    try:
        if path.is_dir():
            raise ImageReadError(name, "is a directory, not an image file")
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(name, "file not found") from None
    except OSError as exc:
        raise ImageReadError(name, f"cannot access file: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageReadError(name, "file is empty (0 bytes)")
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ImageReadError(name, f"cannot open file: {exc.strerror or exc}") from exc
    with handle:
        return _open_stream(handle, name, max_pixels)


def _open_bytes(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    if not data:
        raise ImageReadError(name, "no data (0 bytes)")
    return _open_stream(io.BytesIO(data), name, max_pixels)


def _fetch(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "omniseg"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_URL_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ImageReadError(url, f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise ImageReadError(url, f"cannot download: {exc.reason}") from exc
    except TimeoutError as exc:
        raise ImageReadError(url, f"no answer within {timeout:g} s") from exc
    except (OSError, ValueError) as exc:
        raise ImageReadError(url, f"cannot download: {exc}") from exc
    if len(data) > MAX_URL_BYTES:
        raise ImageReadError(url, f"download larger than {MAX_URL_BYTES} bytes")
    return data


def _open_stream(stream: io.IOBase, name: str, max_pixels: int | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's bomb *warning*; its bomb
            # *error* (twice its limit) still fires and is translated.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"decompression bomb refused by Pillow: {exc}") from exc
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image, or an image format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(name, f"corrupt image header: {exc}") from exc
    _check_size(name, image.size, max_pixels)
    _decode(image, name)
    return _to_rgb(_upright(image, name), name)


def _from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    name = f"<numpy array shape={tuple(array.shape)} dtype={array.dtype}>"
    accepted = "array images must be uint8 (0-255), HxW or HxWxC with C in 1, 3, 4"
    if array.dtype != np.uint8:
        hint = ""
        if np.issubdtype(array.dtype, np.floating):
            hint = "; for a float image in [0, 1] pass (array * 255).round().astype(np.uint8)"
        raise UnsupportedImageError(name, accepted + hint)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        hint = ""
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            hint = "; this one looks channels-first (CxHxW): pass array.transpose(1, 2, 0)"
        raise UnsupportedImageError(name, accepted + hint)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise UnsupportedImageError(name, "array image has no pixels")
    _check_size(name, (array.shape[1], array.shape[0]), max_pixels)
    # uint8 HxW / HxWx3 / HxWx4 map to L / RGB / RGBA; RGBA drops alpha like the reference.
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


# --- decoding and conversion -------------------------------------------------------------


def _check_size(name: str, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )


def _decode(image: Image.Image, name: str) -> None:
    """Decode all pixels now (Pillow is lazy), so a truncated or corrupt body fails here."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"decompression bomb refused by Pillow: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # Pillow reports truncation as OSError("image file is truncated ..."), broken PNG
        # chunks as SyntaxError, and some corrupt bodies with the other types.
        reason = str(exc) or type(exc).__name__
        if "truncated" not in reason:
            reason = f"corrupt image data: {reason}"
        raise ImageReadError(name, reason) from exc


def _upright(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation tag, as phones and cameras expect viewers to do."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block must not cost the picture itself
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
        return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF): Pillow's convert clips at 255; scale the full range.
        values = np.asarray(image).astype(np.float64)
        return _gray_to_rgb(np.rint(values / 257.0))
    if mode == "I":
        return _gray_to_rgb(_scale_int32(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(image)))
    if mode == "RGB":
        return image
    try:
        # Same conversion as the reference pipelines: RGBA/LA drop alpha, P maps through its
        # palette (transparency ignored), CMYK uses Pillow's (255-C)(255-K)/255 formula.
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImageError(name, f"cannot convert mode {mode!r} to RGB: {exc}") from exc


def _scale_int32(values: np.ndarray) -> np.ndarray:
    """Mode "I" holds any 32-bit integers: infer the range the pixels were written in."""
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 255:
        return values.astype(np.float64)
    if low >= 0 and high <= 65535:  # a 16-bit image that Pillow widened to "I"
        return np.rint(values.astype(np.float64) / 257.0)
    return _stretch(values.astype(np.float64))


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Mode "F": [0, 1] is the usual convention, [0, 255] the other; anything else is stretched."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0)
    if low >= 0.0 and high <= 255.0:
        return np.rint(values)
    return _stretch(values)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros_like(values)
    return np.rint((values - low) * (255.0 / (high - low)))


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
