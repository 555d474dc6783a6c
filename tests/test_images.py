"""Opening image files (``images``): refusals in one line, orientation, transparency, 16-bit."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from image_logreg import images
from image_logreg.datasets.decode import DecodeSettings, decode_files
from image_logreg.errors import ImageError, ImageTooLargeError
from image_logreg.images import (
    TooLarge,
    Unusable,
    flatten,
    header_size,
    image_format,
    numeric_to_unit,
    open_image,
    open_image_unnamed,
    quiet_pillow,
)

ORIENTATION = 0x0112


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def asymmetric(size=(60, 40)) -> Image.Image:
    """Gray, a different tone in each quarter: any turn or mirror changes it."""
    width, height = size
    pixels = np.zeros((height, width), np.uint8)
    pixels[: height // 2, : width // 2] = 40
    pixels[: height // 2, width // 2 :] = 100
    pixels[height // 2 :, : width // 2] = 170
    pixels[height // 2 :, width // 2 :] = 240
    return Image.fromarray(pixels)


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def upright_of(source) -> Image.Image:
    with open_image(source) as image:
        return image.upright().copy()


# --- refusals ---------------------------------------------------------------------------------


def _truncated_png(tmp_path: Path) -> Path:
    data = encoded(asymmetric((200, 200)).convert("RGB"), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_jpeg(tmp_path: Path) -> Path:
    data = encoded(asymmetric((200, 200)), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def _file(name: str, data: bytes):
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return make


REFUSALS = {
    "empty": (_file("empty.png", b""), "empty file"),
    "text": (_file("notes.png", b"hello, I am text\n"), images.NOT_AN_IMAGE),
    "eps (would run Ghostscript)": (_file("drawing.eps", encoded(asymmetric().convert("RGB"), "EPS")), images.NOT_AN_IMAGE),
    "truncated png": (_truncated_png, "truncated or corrupt image ("),
    "truncated jpeg": (_truncated_jpeg, "truncated or corrupt image ("),
    "missing": (lambda tmp: tmp / "gone.png", "no such file"),
    "a folder": (lambda tmp: tmp, "is a directory, not an image file"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_each_refusal_is_one_line_naming_the_file(tmp_path, case):
    make, reason = REFUSALS[case]
    path = make(tmp_path)
    with pytest.raises(ImageError) as caught:
        with open_image(path) as image:
            image.upright()  # a truncated file fails only here, inside the block
    message = str(caught.value)
    assert type(caught.value) is ImageError and message.startswith(f"{path}: {reason}")
    assert "\n" not in message and message.count(str(path)) == 1
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained traceback

    with pytest.raises(Unusable) as unnamed:  # a dataset's list names the file itself
        with open_image_unnamed(path) as image:
            image.upright()
    assert str(unnamed.value) == message.removeprefix(f"{path}: ") and "\n" not in str(unnamed.value)


@pytest.mark.parametrize("case", ["empty", "text", "truncated png", "truncated jpeg"])
def test_bytes_fail_as_the_same_file_does_under_the_name_given(tmp_path, case):
    make, _ = REFUSALS[case]
    path = make(tmp_path)
    messages = []
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageError) as caught:
            with open_image(source, name=str(path)) as image:
                image.upright()
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    with pytest.raises(ImageError, match=r"^upload: "):  # bytes without a name
        with open_image(path.read_bytes()) as image:
            image.upright()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_permission_denied(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(encoded(asymmetric(), "PNG"))
    path.chmod(0)
    with pytest.raises(ImageError, match=r": permission denied$"):
        with open_image(path):
            pass


def test_too_many_pixels_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    path.write_bytes(encoded(Image.new("L", (300, 200), 255), "PNG"))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image over the limit"))
    with pytest.raises(ImageTooLargeError) as caught:
        with open_image(path, max_pixels=59_999):
            pass
    assert str(caught.value) == (f"{path}: image too large (300x200, 60,000 pixels; the limit is 59,999, "
                                 "see --max-pixels), refusing to decode")
    assert str(caught.value) == images.too_many_pixels(str(path), (300, 200), 59_999)  # as the server words it
    with pytest.raises(TooLarge, match=r"^image too large \(300x200, 60,000 pixels; the limit is 59,999, see --max-pixels\)$"):
        with open_image_unnamed(path, max_pixels=59_999):
            pass
    monkeypatch.undo()
    with open_image(path, max_pixels=60_000) as image:  # at the limit: opens
        assert image.upright_size() == (200, 300)


@pytest.mark.parametrize("limit", [20_000, 50_000], ids=["bomb-error", "bomb-warning"])
def test_a_decompression_bomb_by_pillows_own_limit_is_too_large(tmp_path, monkeypatch, limit):
    path = tmp_path / "bomb.png"
    path.write_bytes(encoded(Image.new("L", (300, 200), 255), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters_before = list(warnings.filters)
    with pytest.raises(ImageTooLargeError, match=rf"^{path}: image too large \(more than {limit} pixels\), refusing to decode$"):
        with open_image(path):
            pass
    assert warnings.filters == filters_before


def test_errors_from_the_block_that_are_not_about_the_file_pass_unchanged(tmp_path):
    path = tmp_path / "fine.png"
    path.write_bytes(encoded(asymmetric(), "PNG"))
    with pytest.raises(ImageError, match=r"^blank image$"):
        with open_image(path):
            raise ImageError("blank image")
    with pytest.raises(KeyboardInterrupt):
        with open_image(path):
            raise KeyboardInterrupt


def test_reasons_cross_to_the_parent_process():
    for reason in (Unusable("no such file"), TooLarge("image too large (more than 5 pixels)")):
        again = pickle.loads(pickle.dumps(reason))
        assert type(again) is type(reason) and str(again) == str(reason)


def test_opening_images_imports_no_torch():
    code = "import sys, image_logreg.images, image_logreg.datasets.decode; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- Pillow's warnings ------------------------------------------------------------------------


def test_warnings_are_silenced_inside_and_restored_after(tmp_path):
    path = tmp_path / "fine.png"
    path.write_bytes(encoded(asymmetric(), "PNG"))
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with open_image(path):
            warnings.warn("corrupt EXIF data", UserWarning)
            with pytest.raises(Image.DecompressionBombWarning):
                warnings.warn("big", Image.DecompressionBombWarning)
        warnings.warn("after", UserWarning)
    assert [str(w.message) for w in shown] == ["after"]
    assert warnings.filters == before


def test_threads_that_overlap_leave_the_filters_as_they_found_them():
    before = list(warnings.filters)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    inside_after_first_left = []

    def first():
        with quiet_pillow:
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with quiet_pillow:
            second_in.set()
            first_out.wait(5)
            try:
                warnings.warn("big", Image.DecompressionBombWarning)
            except Image.DecompressionBombWarning:
                inside_after_first_left.append("still an error")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert inside_after_first_left == ["still an error"]
    assert warnings.filters == before


# --- orientation ------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_stands_upright_with_its_size_known_before_decoding(orientation):
    data = encoded(asymmetric(), "JPEG", exif=exif_with(orientation), quality=95)
    with Image.open(io.BytesIO(data)) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored))
    with open_image(data) as image:
        size = image.upright_size()
        assert image.orientation() == orientation
        upright = np.asarray(image.upright())
    assert size == upright.shape[:2] == expected.shape[:2]
    np.testing.assert_array_equal(upright, expected)


def _png_with(where: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    if where == "eXIf":
        return encoded(asymmetric(), "PNG", exif=exif_with(6))
    if where == "xmp":
        info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    else:  # ImageMagick's way: the EXIF block in hex in a text chunk
        block = exif_with(6).tobytes()
        info.add_text("Raw profile type exif", f"\nexif\n{len(block):8}\n{block.hex()}\n")
    return encoded(asymmetric(), "PNG", pnginfo=info)


@pytest.mark.parametrize("where", ["eXIf", "xmp", "raw profile"])
def test_a_png_stands_upright_wherever_it_keeps_its_orientation(tmp_path, where):
    data = _png_with(where)
    turned = np.asarray(asymmetric().transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(np.asarray(upright_of(data)), turned)
    path = tmp_path / "a" / "turned.png"  # and a dataset's decoding agrees
    path.parent.mkdir()
    path.write_bytes(data)
    decoded = decode_files([str(path)], DecodeSettings(), progress=False, workers=1)
    np.testing.assert_array_equal(decoded.images[0], turned)


def test_a_tiff_stands_upright_by_its_own_tag():
    data = encoded(asymmetric(), "TIFF", exif=exif_with(8))
    np.testing.assert_array_equal(np.asarray(upright_of(data)), np.asarray(asymmetric().transpose(Image.Transpose.ROTATE_90)))


def test_a_png_without_orientation_chunks_is_not_asked_for_exif(monkeypatch):
    data = encoded(asymmetric(), "PNG", pnginfo=_text_chunk("Comment", "hello"))
    monkeypatch.setattr(Image.Image, "getexif", lambda self: pytest.fail("parsed EXIF that cannot be there"))
    np.testing.assert_array_equal(np.asarray(upright_of(data)), np.asarray(asymmetric()))


def _text_chunk(key: str, value: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return info


def test_a_broken_exif_block_leaves_the_image_as_stored():
    data = encoded(asymmetric(), "JPEG", quality=95)
    # an APP1 EXIF segment whose orientation is text, not a number
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHI", ORIENTATION, 2, 4) + b"abc\x00" + bytes(4)
    segment = b"Exif\x00\x00" + tiff
    broken = data[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[2:]
    with open_image(broken) as image:
        assert image.image.getexif()[ORIENTATION] == "abc"
        assert image.orientation() == 1
        upright = np.asarray(image.upright())
    with Image.open(io.BytesIO(data)) as stored:
        np.testing.assert_array_equal(upright, np.asarray(stored))


def test_a_large_jpeg_decodes_at_a_fraction_of_its_size_that_stays_large_enough():
    data = encoded(Image.new("L", (4000, 3000), 200), "JPEG")
    with open_image(data) as image:
        image.decode_at_least(1024, 1024)
        assert image.upright().size == (2000, 1500)  # 1/4 would take the shorter side below 1024
    with open_image(data) as image:
        image.decode_at_least(3000, 4000)  # no smaller scale keeps it: decoded whole
        assert image.upright().size == (4000, 3000)
    png = encoded(Image.new("L", (4000, 3000), 200), "PNG")
    with open_image(png) as image:
        image.decode_at_least(100, 100)  # PNG has no such decoder
        assert image.upright().size == (4000, 3000)


def test_a_turned_jpeg_is_scaled_by_its_upright_sides():
    data = encoded(Image.new("L", (800, 400), 200), "JPEG", exif=exif_with(6))  # stands 400 wide, 800 high
    with open_image(data) as image:
        assert image.upright_size() == (800, 400)
        image.decode_at_least(200, 100)
        assert image.upright().size == (100, 200)  # 1/4: both upright sides still reach what was asked


# --- flattening -------------------------------------------------------------------------------


def test_transparency_is_shown_over_white():
    rgba = np.zeros((4, 6, 4), np.uint8)  # clear black: what many programs leave under no ink
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[1, 1] = (0, 0, 255, 128)  # half-clear blue
    flat = np.asarray(flatten(Image.fromarray(rgba, "RGBA")))
    assert flat.shape == (4, 6, 3)
    assert (flat[2:] == 255).all() and tuple(flat[0, 0]) == (255, 0, 0)
    assert tuple(flat[1, 1]) == pytest.approx((127, 127, 255), abs=1)
    gray = np.zeros((4, 6, 2), np.uint8)
    gray[0, 0] = (30, 255)
    flat_gray = np.asarray(flatten(Image.fromarray(gray, "LA")))
    assert flat_gray.shape == (4, 6) and flat_gray[0, 0] == 30 and (flat_gray[1:] == 255).all()


def test_a_palette_with_a_clear_colour_is_shown_over_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    data = encoded(image, "PNG", transparency=0)
    with open_image(data) as opened:
        flat = np.asarray(flatten(opened.upright()))
    assert flat.shape == (4, 4, 3) and tuple(flat[1, 1]) == (200, 30, 30) and (flat[0] == 255).all()


def test_sixteen_bit_pixels_are_scaled_to_eight():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    data = encoded(Image.fromarray(values), "PNG")
    with open_image(data) as opened:
        image = opened.upright()
        assert image.mode.startswith("I")
        np.testing.assert_allclose(numeric_to_unit(image), values / 65535, atol=1e-6)
        assert np.asarray(flatten(image)).tolist() == [[0, 1, 128, 255]]


def test_float_pixels_are_scaled_by_the_range_they_use():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(flatten(unit)).tolist() == [[0, 128, 255]]
    bytes_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], np.float32), "F")
    assert np.asarray(flatten(bytes_range)).tolist() == [[0, 100, 255]]


def test_plain_images_are_flattened_to_l_or_rgb_only():
    assert flatten(Image.new("1", (3, 3), 1)).mode == "L"
    assert flatten(Image.new("CMYK", (3, 3))).mode == "RGB"
    gray = Image.new("L", (3, 3), 7)
    assert flatten(gray) is gray  # nothing to do: no copy


# --- headers ----------------------------------------------------------------------------------


def test_headers_tell_size_and_format_without_decoding(monkeypatch):
    png = encoded(Image.new("L", (30, 20)), "PNG")
    jpeg = encoded(Image.new("RGB", (40, 10)), "JPEG")
    eps = encoded(Image.new("RGB", (5, 5)), "EPS")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    assert header_size(png) == (30, 20) and image_format(png) == "PNG"
    assert header_size(jpeg) == (40, 10) and image_format(jpeg) == "JPEG"
    for unreadable in (b"", b"junk", eps):  # EPS: a format not admitted, left unopened
        assert header_size(unreadable) is None and image_format(unreadable) is None
