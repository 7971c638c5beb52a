"""load_image / iter_image_files: every kind of image handled right, every bad input a typed error."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from omniseg.errors import ImageReadError, ImageTooLargeError, InputError, UnsupportedImageError
from omniseg.io import images
from omniseg.io.images import iter_image_files, load_image


def _pattern(height: int = 24, width: int = 40) -> np.ndarray:
    """An RGB test picture whose every pixel differs, so moves and flips are visible."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 6, yy * 10, (xx + yy) * 3], axis=-1).astype(np.uint8)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


# --- modes that must be converted, not rejected -------------------------------------------


def test_rgb_png_roundtrip(tmp_path):
    pixels = _pattern()
    image = load_image(_save(Image.fromarray(pixels), tmp_path / "a.png"))
    assert image.mode == "RGB" and image.size == (40, 24)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_path_given_as_str_and_pathlike(tmp_path):
    path = _save(Image.fromarray(_pattern()), tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), np.asarray(load_image(path)))


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = (np.arange(24 * 40).reshape(24, 40) % 256).astype(np.uint8)
    image = load_image(_save(Image.fromarray(gray), tmp_path / "g.png"))
    assert image.mode == "RGB"
    out = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_la_drops_alpha(tmp_path):
    la = Image.merge("LA", [Image.new("L", (5, 4), 77), Image.new("L", (5, 4), 3)])
    out = np.asarray(load_image(_save(la, tmp_path / "la.png")))
    assert (out == 77).all()


def test_rgba_matches_reference_convert(tmp_path):
    rgba = np.dstack([_pattern(), np.linspace(0, 255, 40, dtype=np.uint8)[None, :].repeat(24, 0)])
    path = _save(Image.fromarray(rgba), tmp_path / "rgba.png")
    out = np.asarray(load_image(path))
    # The reference pipelines drop alpha (convert("RGB")), so must we: identical answers.
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_palette_with_transparency(tmp_path):
    palette = [0, 0, 0, 200, 10, 20, 30, 220, 40] + [0] * (256 * 3 - 9)
    indices = np.zeros((6, 8), np.uint8)
    indices[:, 4:] = 1
    indices[3:, :] = 2
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    path = _save(image, tmp_path / "p.png", transparency=0)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (0, 0, 0)  # the transparent index keeps its palette colour
    assert tuple(out[0, 5]) == (200, 10, 20)
    assert tuple(out[4, 1]) == (30, 220, 40)


def test_gif_multiframe_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 5), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert Image.open(path).n_frames == 2
    out = np.asarray(load_image(path))
    assert tuple(out[2, 2]) == (255, 0, 0)


def test_multipage_tiff_takes_first_page(tmp_path):
    pages = [Image.new("L", (6, 5), value) for value in (10, 240)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert (np.asarray(load_image(path)) == 10).all()


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_scales_instead_of_clipping(tmp_path, suffix):
    values = np.array([[0, 257, 1000, 32768, 65535, 65280]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / f"deep{suffix}")
    assert Image.open(path).mode.startswith("I;16")
    out = np.asarray(load_image(path))[0, :, 0]
    np.testing.assert_array_equal(out, np.rint(values[0] / 257.0).astype(np.uint8))
    assert out[-2] == 255 and out[3] == 128  # not clipped to 255 everywhere above 255


@pytest.mark.parametrize("mode", ["I;16B", "I;16"])
def test_16bit_pil_image_modes(mode):
    image = Image.new(mode, (3, 2), 0)
    image.putpixel((1, 0), 65535)
    image.putpixel((2, 0), 25700)
    out = np.asarray(load_image(image))[..., 0]
    assert out[0].tolist() == [0, 255, 100]


def test_32bit_integer_image_holding_16bit_values():
    image = Image.fromarray(np.array([[0, 65535, 514]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 255, 2]


def test_32bit_integer_image_holding_8bit_values_kept():
    image = Image.fromarray(np.array([[0, 17, 255]], dtype=np.int32))
    assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 17, 255]


def test_float_image_in_unit_range(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    path = _save(Image.fromarray(values), tmp_path / "f.tif")
    assert Image.open(path).mode == "F"
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255, 0]


def test_float_image_out_of_range_is_stretched():
    image = Image.fromarray(np.array([[-10.0, 0.0, 1000.0]], dtype=np.float32))
    assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 3, 255]


def test_cmyk_jpeg_converted(tmp_path):
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, :8, 0] = 255  # pure cyan on the left
    cmyk[:, 8:, 3] = 255  # pure black on the right
    path = _save(Image.fromarray(cmyk, mode="CMYK"), tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(path).mode == "CMYK"
    out = np.asarray(load_image(path)).astype(int)
    assert np.abs(out[8, 2] - [0, 255, 255]).max() <= 6
    assert np.abs(out[8, 13] - [0, 0, 0]).max() <= 6


def test_one_bit_image(tmp_path):
    bits = np.zeros((4, 8), bool)
    bits[:, :3] = True
    path = _save(Image.fromarray(bits), tmp_path / "bits.png")
    assert Image.open(path).mode == "1"
    out = np.asarray(load_image(path))
    assert (out[:, :3] == 255).all() and (out[:, 3:] == 0).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied(tmp_path, orientation):
    # Blocks of flat colour survive JPEG compression well enough to check where they went.
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:20, :30] = (255, 0, 0)  # red: top left
    pixels[20:, 30:] = (0, 0, 255)  # blue: bottom right
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(pixels), tmp_path / "photo.jpg", exif=exif, quality=95)

    out = np.asarray(load_image(path)).astype(int)
    expected = {3: np.rot90(pixels, 2), 6: np.rot90(pixels, -1), 8: np.rot90(pixels, 1)}[orientation]
    assert out.shape == expected.shape
    if orientation in (6, 8):
        assert out.shape[:2] == (60, 40)  # width and height swapped
    # Compare block centres (JPEG blurs the edges).
    for y, x in [(5, 5), (5, -6), (-6, 5), (-6, -6)]:
        assert np.abs(out[y, x] - expected[y, x]).max() < 40, (y, x)


def test_exif_orientation_applied_to_pil_input():
    pixels = _pattern(4, 6)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.info["exif"] = exif.tobytes()
    out = np.asarray(load_image(image))
    np.testing.assert_array_equal(out, np.rot90(pixels, -1))


# --- numpy and PIL inputs -----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_numpy_shapes(shape, rng):
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = np.asarray(load_image(array))
    assert out.shape == (5, 7, 3)
    if len(shape) == 2 or shape[2] == 1:
        np.testing.assert_array_equal(out[..., 1], array.reshape(5, 7))
    else:
        np.testing.assert_array_equal(out, array[..., :3])


def test_numpy_non_contiguous(rng):
    array = rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8)[::2, ::-1]
    np.testing.assert_array_equal(np.asarray(load_image(array)), array)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4), np.uint16),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        np.zeros((4,), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
    ],
    ids=["float", "uint16", "two-channels", "five-channels", "4d", "1d", "empty"],
)
def test_numpy_bad_dtype_or_shape(array):
    with pytest.raises(UnsupportedImageError) as info:
        load_image(array)
    assert "numpy array" in str(info.value) and str(array.dtype) in str(info.value)


@pytest.mark.parametrize(
    ("array", "hint"),
    [
        (np.random.default_rng(0).random((20, 30, 3), dtype=np.float32), r"\(array \* 255\).round\(\).astype\(np.uint8\)"),
        (np.zeros((3, 20, 30), np.uint8), r"channels-first \(CxHxW\): pass array.transpose\(1, 2, 0\)"),
        (np.zeros((20, 30), np.uint16), r"C in 1, 3, 4$"),
    ],
    ids=["float-0-1", "channels-first", "uint16"],
)
def test_numpy_refusals_say_what_is_accepted_and_how_to_convert(array, hint):
    # Said only "array images must have dtype uint8" (float) or "must be HxW or HxWxC with
    # C in 1, 3, 4" (CxHxW), not what would be accepted nor how to get there.
    with pytest.raises(UnsupportedImageError, match="array images must be uint8 \\(0-255\\), HxW or HxWxC with C in 1, 3, 4") as info:
        load_image(array)
    assert info.match(hint)


def test_pil_input_is_not_modified():
    image = Image.new("L", (3, 3), 9)
    out = load_image(image)
    assert out.mode == "RGB" and image.mode == "L"


def test_unknown_input_type():
    with pytest.raises(UnsupportedImageError, match="list"):
        load_image([1, 2, 3])  # type: ignore[arg-type]


# --- bad files: typed errors naming the file and the reason --------------------------------


def _assert_names(error: InputError, path: Path, *words: str) -> None:
    assert error.source == str(path)
    assert str(path) in str(error)
    for word in words:
        assert word in error.reason.lower(), error.reason


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    _assert_names(info.value, path, "not found")


def test_directory(tmp_path):
    with pytest.raises(ImageReadError) as info:
        load_image(tmp_path)
    _assert_names(info.value, tmp_path, "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    _assert_names(info.value, path, "empty")


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file(tmp_path, rng, fmt, suffix):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buffer, fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nobody may switch the check off
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    _assert_names(info.value, path, "truncated")


def test_truncated_lazy_pil_input(tmp_path, rng):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[:600])
    lazy = Image.open(path)  # header parses fine; the body is missing
    with pytest.raises(ImageReadError) as info:
        load_image(lazy)
    _assert_names(info.value, path, "truncated")


def test_corrupt_bytes(tmp_path, rng):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[100:400] = bytes(300)  # overwrite compressed image data
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert info.value.source == str(path)


def test_garbage_with_image_extension(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    _assert_names(info.value, path, "not an image")


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are not pixels\n")
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    _assert_names(info.value, path, "not an image")


def test_pixel_limit_checked_before_decoding(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (300, 200)), tmp_path / "big.png")
    decoded = []
    monkeypatch.setattr(images, "_decode", lambda image, name: decoded.append(name))
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path, max_pixels=300 * 200 - 1)
    _assert_names(info.value, path, "60000", "59999")
    assert decoded == []  # refused on the header alone
    monkeypatch.undo()
    assert load_image(path, max_pixels=300 * 200).size == (300, 200)


def test_pixel_limit_for_arrays_and_pil_images():
    with pytest.raises(ImageTooLargeError):
        load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=99)
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (10, 10)), max_pixels=99)
    assert load_image(Image.new("RGB", (10, 10)), max_pixels=None).size == (10, 10)


def test_pillow_decompression_bomb_becomes_typed(tmp_path, monkeypatch):
    path = _save(Image.new("L", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow errors above 2x this
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path, max_pixels=None)
    assert info.value.source == str(path)


# --- URLs (no network: urlopen is replaced) -------------------------------------------------


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_url_fetched_and_decoded(monkeypatch):
    buffer = io.BytesIO()
    Image.fromarray(_pattern()).save(buffer, "PNG")
    seen = {}

    def fake_urlopen(request, timeout):
        seen["url"], seen["timeout"] = request.full_url, timeout
        return _Response(buffer.getvalue())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    image = load_image("https://example.com/a.png", timeout=7)
    np.testing.assert_array_equal(np.asarray(image), _pattern())
    assert seen == {"url": "https://example.com/a.png", "timeout": 7}


@pytest.mark.parametrize(
    "failure,words",
    [
        (urllib.error.URLError("Name or service not known"), "cannot download"),
        (TimeoutError("timed out"), "no answer"),
        (urllib.error.HTTPError("http://x/a.png", 404, "Not Found", {}, None), "404"),
    ],
)
def test_url_failures_name_the_url(monkeypatch, failure, words):
    def fake_urlopen(request, timeout):
        raise failure

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    url = "http://x/a.png"
    with pytest.raises(ImageReadError) as info:
        load_image(url)
    assert info.value.source == url and words in info.value.reason.lower()


def test_url_returning_html(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda r, timeout: _Response(b"<html>oops</html>"))
    with pytest.raises(ImageReadError, match="not an image") as info:
        load_image("http://x/page")
    assert info.value.source == "http://x/page"


# --- walking folders ------------------------------------------------------------------------


def test_iter_image_files(tmp_path):
    for rel in ["b.png", "a.JPG", "notes.txt", "sub/c.webp", "sub/deeper/d.tif", ".hidden/e.png", "sub/.f.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    extra = tmp_path / "named.dat"
    extra.write_bytes(b"x")

    found = iter_image_files([tmp_path, extra, tmp_path / "b.png"])
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.tif", "named.dat"]

    flat = iter_image_files([tmp_path], recursive=False)
    assert [p.name for p in flat] == ["a.JPG", "b.png"]


def test_iter_image_files_keeps_missing_named_file(tmp_path):
    assert iter_image_files([tmp_path / "gone.png"]) == [tmp_path / "gone.png"]
