"""Image files: open, check, orient, flatten.

Every image file read anywhere (``predict``, the server, a folder or CSV dataset) is opened
here: only the formats in ``FORMATS``, its pixel count checked from the header before anything
is decoded, Pillow's warnings silenced, every failure told in one line, the image turned upright
as its EXIF or XMP says, and (``flatten``) transparency shown over white and 16-bit and float
pixels brought to 8 bits.

Nothing here imports torch: dataset files are decoded in worker processes, which start faster
without it.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLargeError
from .settings import MAX_PIXELS

# Pillow's decoders for the suffixes image files have (JPEG also opens phones' MPO files). Other
# formats are refused: some, like EPS, hand the file to external programs.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
NOT_AN_IMAGE = "not an image file (expected PNG, JPEG, GIF, BMP, WebP or TIFF)"

# What Pillow, numpy and the file system raise on a file that cannot be read as an image.
_FAILURES = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError, IndexError,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)
# Where an orientation may be kept, besides a TIFF's own tags: EXIF (JPEG's and WebP's, a PNG's
# eXIf chunk or ImageMagick's text chunk) and XMP.
_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")
# EXIF orientations that turn the image by 90 degrees: its width and height swap.
_TURNED = frozenset({5, 6, 7, 8})
# Formats whose decoder can scale by 1/2, 1/4 or 1/8 while decoding.
_DRAFTABLE = frozenset({"JPEG", "MPO"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


class Unusable(Exception):
    """Why a file is not a usable image: one line, without the file's name."""


class TooLarge(Unusable):
    """An image with more pixels than is safe to decode (a decompression bomb, or a mistake)."""


# --- opening ---------------------------------------------------------------------------------


def open_image(
    source: str | os.PathLike | bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS
) -> OpenedImage:
    """``with open_image(source) as image:`` the file (a path, or its bytes as uploaded, which
    messages call ``name``), its header read and checked, nothing decoded yet.

    Any failure opening it or, inside the block, decoding it is an ImageError of one line that
    names the file; an image of more than ``max_pixels`` (or a decompression bomb by Pillow's own
    limit) an ImageTooLargeError, before it is decoded.
    """
    return OpenedImage(source, max_pixels, named=True, name=name)


def open_image_unnamed(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS) -> OpenedImage:
    """``open_image`` for a list of files that names each beside its reason: failures are
    Unusable (TooLarge for too many pixels), the reason alone."""
    return OpenedImage(source, max_pixels, named=False)


class OpenedImage:
    """An image file, open inside ``with`` (``open_image``), its header checked; ``upright`` decodes it.

    A class, not a ``contextlib.contextmanager`` generator: a dataset opens thousands of files a
    second, and this way costs each a few microseconds less.
    """

    __slots__ = ("source", "max_pixels", "named", "name", "image", "_orientation")

    def __init__(
        self, source: str | os.PathLike | bytes, max_pixels: int, *, named: bool, name: str | None = None
    ) -> None:
        self.source, self.max_pixels, self.named, self.name = source, max_pixels, named, name
        self.image: Image.Image | None = None
        self._orientation: int | None = None

    def __enter__(self) -> OpenedImage:
        file = self.source
        if isinstance(file, (bytes, bytearray, memoryview)):
            if len(file) == 0:
                self._refuse(Unusable("empty file"))
            file = io.BytesIO(file)
        quiet_pillow.__enter__()
        try:
            self.image = Image.open(file, formats=FORMATS)
            _check_pixels(self.image.size, self.max_pixels)
        except BaseException as error:
            self.__exit__(type(error), error, None)  # closes the file; a failure is explained
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if self.image is not None:
                self.image.close()
        finally:
            quiet_pillow.__exit__()
        if isinstance(error, Unusable):
            self._refuse(error)
        if isinstance(error, _FAILURES):
            self._refuse(_reason(error, self.source))

    def _refuse(self, reason: Unusable) -> NoReturn:
        if not self.named:
            raise reason from None
        label = label_of(self.source, self.name)
        if isinstance(reason, TooLarge):
            raise ImageTooLargeError(f"{label}: {reason}, refusing to decode") from None
        raise ImageError(f"{label}: {reason}") from None

    def orientation(self) -> int:
        """The EXIF orientation, 1 (as stored) when there is none. A PNG is decoded first: its EXIF
        may follow its pixels."""
        if self._orientation is None:
            self._orientation = _read_orientation(self.image)
        return self._orientation

    def upright_size(self) -> tuple[int, int]:
        """(height, width) as the image will stand once ``upright``."""
        width, height = self.image.size
        return (width, height) if self.orientation() in _TURNED else (height, width)

    def decode_at_least(self, height: int, width: int) -> None:
        """Let a JPEG decode at 1/2, 1/4 or 1/8 scale while, upright, it stays at least ``height``
        x ``width``: a fraction of the time and memory, and a header that lies costs nothing."""
        image = self.image
        if image.format not in _DRAFTABLE:
            return
        if height != width and self.orientation() in _TURNED:  # the stored image is W x H
            height, width = width, height
        if min(image.width // width, image.height // height) >= 2:
            image.draft(image.mode, (width, height))

    def upright(self) -> Image.Image:
        """The image decoded (so a truncated file fails here, not later) and turned upright."""
        self.image.load()
        if self.orientation() != 1:
            ImageOps.exif_transpose(self.image, in_place=True)
            self._orientation = 1
        return self.image


def _read_orientation(image: Image.Image) -> int:
    if image.format == "PNG":
        image.load()
    if image.format != "TIFF" and image.info.keys().isdisjoint(_ORIENTATION_KEYS):
        return 1  # most images: no metadata to parse
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is no reason to lose the image: it stands as stored
        return 1


def label_of(source: str | os.PathLike | bytes, name: str | None = None) -> str:
    """What messages call ``source``: its path, or for bytes as uploaded ``name`` ("upload" without one)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return name or "upload"
    return str(Path(source))


def _reason(error: BaseException, source) -> Unusable:
    """The one-line reason an exception raised opening or decoding ``source`` stands for."""
    if isinstance(error, UnidentifiedImageError):
        return Unusable("empty file" if _is_empty_file(source) else NOT_AN_IMAGE)
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return TooLarge(f"image too large (more than {Image.MAX_IMAGE_PIXELS} pixels)")
    if isinstance(error, FileNotFoundError):
        return Unusable("no such file")
    if isinstance(error, IsADirectoryError):
        return Unusable("is a directory, not an image file")
    if isinstance(error, PermissionError):
        return Unusable("permission denied")
    return Unusable(f"truncated or corrupt image ({one_line(error)})")


def _is_empty_file(source) -> bool:
    # Asked only once Pillow found no image: a file that opens costs no extra system call.
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source) == 0
    with contextlib.suppress(OSError):
        return os.path.getsize(source) == 0
    return False


def one_line(error: BaseException) -> str:
    """An exception's message on one line; its type's name when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise TooLarge(_too_many_pixels(size, max_pixels))


def _too_many_pixels(size: tuple[int, int], max_pixels: int) -> str:
    width, height = size
    return (f"image too large ({width}x{height}, {width * height:,} pixels; the limit is {max_pixels:,}, "
            "see --max-pixels)")


def too_many_pixels(label: str, size: tuple[int, int], max_pixels: int) -> str:
    """The message ``open_image`` refuses an image of ``size`` (width, height) with, for one whose
    header was read elsewhere."""
    return f"{label}: {_too_many_pixels(size, max_pixels)}, refusing to decode"


class _QuietPillow:
    """Pillow's warnings off, and DecompressionBombWarning an error, while any thread is inside.

    Pillow only warns between MAX_IMAGE_PIXELS and twice that; such an image is an attack or a
    mistake either way. Its other warnings (corrupt EXIF, odd TIFF tags) are about files it still
    reads: noise beside a prediction or a dataset's summary. The first to enter sets the filters
    and the last to leave restores them: the server opens images in several threads at once, and
    ``catch_warnings`` entered by two threads that overlap restores the wrong filters for good.
    Entered around a chunk of dataset files, it costs each file a lock instead of a filter change.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: warnings.catch_warnings | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = warnings.catch_warnings()
                self._saved.__enter__()
                warnings.simplefilter("ignore")
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            self._depth += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._saved.__exit__(None, None, None)
                self._saved = None

    def after_fork(self) -> None:
        # A thread of the parent may have held the lock at the fork; that thread is gone here.
        self._lock = threading.Lock()


quiet_pillow = _QuietPillow()
if hasattr(os, "register_at_fork"):  # dataset workers are forked on Linux
    os.register_at_fork(after_in_child=quiet_pillow.after_fork)


# --- flattening ------------------------------------------------------------------------------


def is_numeric(image: Image.Image) -> bool:
    """16-bit, 32-bit and float images: more than 8 bits a pixel, on no fixed scale."""
    return image.mode in ("I", "F") or image.mode.startswith("I;16")


def numeric_to_unit(image: Image.Image) -> np.ndarray:
    """16-bit, 32-bit and float images: scale by the range their values evidently use."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = values.min(), values.max()
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    elif low >= 0 and high <= 1 and image.mode == "F":
        full_scale = 1.0
    elif low >= 0 and high <= 255:
        full_scale = 255.0
    elif low >= 0 and high <= 65535:
        full_scale = 65535.0
    else:  # no convention to go by: stretch what is there
        return ((values - low) / max(high - low, 1e-12)).astype(np.float32)
    return np.clip(values / full_scale, 0.0, 1.0).astype(np.float32)


def over_white(image: Image.Image) -> Image.Image:
    """An image with transparency as it looks on white paper (RGBA, every pixel opaque); any
    other image as it is. Transparent pixels often hold black colour values: over white they
    read as paper."""
    if not image.has_transparency_data:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def flatten(image: Image.Image) -> Image.Image:
    """The image in 8-bit ``L`` (gray images) or ``RGB`` (the rest): transparency over white,
    16-bit and float pixels scaled as ``numeric_to_unit`` reads them, palette and CMYK as RGB."""
    if is_numeric(image):
        return Image.fromarray(np.clip(np.rint(numeric_to_unit(image) * 255.0), 0, 255).astype(np.uint8))
    mode = "L" if image.mode in _GRAY_MODES else "RGB"
    image = over_white(image)
    return image if image.mode == mode else image.convert(mode)


# --- headers ---------------------------------------------------------------------------------


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the image's header states it, without decoding; None if unreadable."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # a PNG's first chunk
    header = _header(data)
    return header and header[1]


def image_format(data: bytes) -> str | None:
    """The format (one of ``FORMATS``, or MPO) the header of ``data`` names; None if unreadable."""
    header = _header(data)
    return header and header[0]


def _header(data: bytes) -> tuple[str, tuple[int, int]] | None:
    try:
        with quiet_pillow, Image.open(io.BytesIO(data), formats=FORMATS) as image:
            return image.format, image.size
    except Exception:  # any unreadable header: the decoder explains when it is asked to
        return None
