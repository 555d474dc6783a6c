"""Turn users' image files into the MNIST-style digits the model was trained on.

MNIST digits are white ink on black, 28x28 uint8, with the ink scaled to fit a
20x20 box (aspect ratio kept) and shifted so its centre of mass is at the
centre of the canvas. Users bring big, off-centre, dark-on-light drawings,
photos and scans; fed in naively they score at chance, so `normalize_digit`
repeats the steps that made MNIST.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageError
from .images import is_numeric, label_of, numeric_to_unit, open_image, over_white
from .settings import MAX_PIXELS

# The suffixes of the formats ``images.FORMATS`` admits.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

# Pixels (0..1 scale) at or below this count as black when asking whether an
# image already has MNIST's dark background.
_DARK = 0.1
# Ink must stand out from the paper by this much (0..1 scale) and by several
# times the paper's own noise, or the page counts as blank.
_MIN_CONTRAST = 0.05
_NOISE_SIGMAS = 6.0
# After rescaling the ink to 0..1, weaker values are JPEG ringing, dust or paper
# texture, not strokes. Noisier paper raises the bar, but never so far that it
# would erase the strokes themselves.
_FAINT = 0.15
_MAX_FAINT = 0.4
# Where a stroke's edge is, in rescaled ink strength: the crop follows it.
_STROKE_EDGE = 0.5

# Images whose shorter side is at least twice this are decoded (JPEG, by its decoder's 1/2, 1/4,
# 1/8 scaling) or averaged down (other formats) by a whole factor, to no less than this. A digit
# filling a tenth of such a frame still spans about 100 pixels, five times the 20-pixel box it is
# fitted into, while normalising costs a few megabytes rather than a few hundred.
WORKING_SIDE = 1024
# Modes Pillow's ``reduce`` averages correctly (it premultiplies alpha; palette indices it would average).
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})

PREPROCESSING = {
    "name": "mnist-normalize",
    "size": [28, 28],
    "box": 20,
    "steps": [
        "grayscale, transparency over white",
        "invert if the border is light",
        "subtract a plane fitted to the border, rescale ink to 1, zero faint noise",
        "crop to the strokes (ink >= 0.5)",
        "LANCZOS resize to fit box x box, aspect ratio kept",
        "paste so the centre of mass is at size / 2",
    ],
    "pass_through": "size x size images on a dark background are kept as they are",
    "faint": _FAINT,
    "stroke_edge": _STROKE_EDGE,
}


def find_image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively (sorted) to their image files."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(_images_in_folder(path))
        elif path.exists():
            # Taken whatever its suffix: a wrong file named explicitly must fail loudly later.
            found.append(path)
        else:
            raise ImageError(f"{path}: no such file or directory")
    return found


def _images_in_folder(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS "._x.png" and similar are not images.
    return [
        path
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]


def read_grayscale(
    source: str | Path | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS, working_side: int | None = None
) -> np.ndarray:
    """An image as float32 H x W in [0, 1], 1 = white; transparency is shown over white.

    ``source`` is a file path, or the file's bytes as uploaded (then ``name`` is what
    errors call it). Both go through the same decoder and the same checks. An image of more
    than ``max_pixels`` is refused (ImageTooLargeError) before it is decoded; with
    ``working_side``, a much larger image comes back reduced (see ``WORKING_SIDE``).
    """
    return _read(source, name, _to_gray_array, max_pixels, working_side)


def _read(source: str | Path | bytes, name: str | None, convert, max_pixels: int, working_side: int | None):
    """``convert(image)`` of the decoded, upright image (averaged down toward ``working_side``, if
    given); errors name the file."""
    with open_image(source, name=name, max_pixels=max_pixels) as opened:
        if working_side:
            opened.decode_at_least(working_side, working_side)
        image = opened.upright()
        return convert(_reduced(image, working_side) if working_side else image)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR of an 8-bit gray, non-interlaced PNG (after width and height): depth, colour type, and
# compression, filter and interlace methods.
_PLAIN_GRAY = bytes([8, 0, 0, 0, 0])


def _plain_gray_png(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """The uint8 pixels of a PNG that is nothing but an 8-bit gray, non-interlaced image of
    ``size`` (height, width), read-only; None for any other file, which takes Pillow's full path.

    Such a PNG is what a dataset sample saved to disk looks like, and what a program sends the
    server. Its pixel data goes to the same Pillow decoder as always (``Image.frombytes`` with
    PNG's "zip" decoder, which undoes the row filters); only Pillow's file parser, written in
    Python, is skipped. That parser would learn nothing here: the file may hold no chunk besides
    IHDR, IDAT and IEND (no transparency, no orientation, no text), and every checksum must hold.
    Anything unusual returns None, so an odd or corrupt file meets Pillow's own checks and errors.
    (Not ``torchvision.io.decode_png``, though it is quicker still: torchvision 0.29.1's libpng
    binding crashes the process (SIGSEGV) on the first libpng error, which any corrupt upload
    can raise.)
    """
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        return None
    if data[16:29] != struct.pack(">II", size[1], size[0]) + _PLAIN_GRAY:
        return None
    view, end, position, pixel_data = memoryview(data), len(data), 8, []
    while position + 12 <= end:
        length = int.from_bytes(view[position : position + 4], "big")
        stop = position + 8 + length
        if stop + 4 > end or zlib.crc32(view[position + 4 : stop]) != int.from_bytes(view[stop : stop + 4], "big"):
            return None
        kind = view[position + 4 : position + 8]
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            pixel_data.append(view[position + 8 : stop])
        elif kind != b"IHDR" or position != 8:
            return None
        position = stop + 4
    else:
        return None
    try:
        image = Image.frombytes("L", (size[1], size[0]), b"".join(pixel_data), "zip", "L")
    except (ValueError, OSError, MemoryError):  # short or corrupt pixel data: Pillow's full path says which
        return None
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(size)


def _reduced(image: Image.Image, working_side: int) -> Image.Image:
    """``image`` averaged down by a whole factor while its shorter side stays at least ``working_side``."""
    factor = min(image.size) // working_side
    if factor < 2:
        return image
    if image.mode not in _REDUCIBLE:
        if image.mode.startswith("I;16"):  # no 16-bit reduce, and 32-bit would change its scaling
            return image
        image = image.convert("L" if image.mode == "1" else "RGBA" if image.has_transparency_data else "RGB")
    return image.reduce(factor)


def _to_gray_array(image: Image.Image) -> np.ndarray:
    if is_numeric(image):
        return numeric_to_unit(image)  # its steps finer than 8 bits kept, not rounded
    return np.asarray(over_white(image).convert("L"), dtype=np.float32) / 255.0


def normalize_digit(gray: np.ndarray, size: tuple[int, int] = (28, 28), box: int = 20) -> np.ndarray:
    """MNIST-style uint8 digit of `size` (height, width): white ink on black, fitted and centred."""
    gray = np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {gray.shape}")
    if _already_dataset_form(gray, size):
        return _to_uint8(gray)
    ink = _crop_to_ink(_ink_on_black(gray))
    return _to_uint8(_centre_by_mass(_fit_in_box(ink, box, least=MIN_GLYPH * min(gray.shape)), size))


def _already_dataset_form(gray: np.ndarray, size: tuple[int, int], dark: float = _DARK) -> bool:
    # Such an image is a dataset sample saved to disk: re-normalising would change
    # the pixels and the prediction would differ from the tensor's.
    # An all-black one is not: it goes on to be reported as blank.
    if gray.shape != tuple(size):
        return False
    border = _border(gray)
    return np.count_nonzero(border <= dark) >= 0.9 * border.size and gray.max() > dark


def _digit_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``_gray_digit_input`` of a plain 8-bit gray image of ``size``; any other image as
    ``read_grayscale`` reads it."""
    if image.mode == "L" and not image.has_transparency_data and image.size == (size[1], size[0]):
        return _gray_digit_input(np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(size), size)
    return _to_gray_array(image)


def _gray_digit_input(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """8-bit gray pixels (read-only is fine) of a dataset sample as its own uint8 pixels (what
    ``normalize_digit`` would return for it, without the trip through floats); of any other image,
    as float gray in [0, 1], as ``_to_gray_array`` reads a plain gray image."""
    if _already_dataset_form(pixels, size, dark=_DARK * 255):
        return pixels.copy()
    return pixels.astype(np.float32) / 255.0


def _ink_on_black(gray: np.ndarray) -> np.ndarray:
    """Ink strength in [0, 1] on a 0 background, whatever the polarity, paper tone and lighting."""
    if np.median(_border(gray)) > 0.5:
        gray = 1.0 - gray  # dark ink on light paper
    # As a share of the headroom above the paper: under dim light, or on gray paper, ink's
    # difference from the paper shrinks with the light (a photo of a 7 pasted on a white page and
    # drawn over keeps its 7 as strong as the stroke)
    level = _paper_level(gray)
    ink = (gray - level) / (1.0 - np.minimum(level, _DARKEST_PAPER))
    noise = _paper_noise(ink, clipped=gray == 0.0)
    # The plane runs along the paper's darker pixels; lift it to the paper's middle.
    paper = _border(ink)
    paper = paper[paper < 0.5 * ink.max()]
    if paper.size:
        ink -= np.median(paper)
    strong = ink[ink > max(_MIN_CONTRAST, _NOISE_SIGMAS * noise)]
    if strong.size == 0:
        raise ImageError("blank image: no ink found")
    # A high percentile, not the max: one hot JPEG pixel must not set the scale.
    scale = np.percentile(strong, 90)
    ink = np.clip(ink / scale, 0.0, 1.0)
    # Anything the paper's noise could produce is zeroed, or specks would stretch the crop.
    ink[ink < np.clip(_NOISE_SIGMAS * noise / scale, _FAINT, _MAX_FAINT)] = 0.0
    return ink


def _paper_noise(ink: np.ndarray, clipped: np.ndarray) -> float:
    """Noise sigma of the paper in the border, read two ways that strokes crossing it hardly touch.

    Strokes only lie above the paper, so the paper's lower tail is clean: the
    6.7th to 30.9th percentile span one sigma. Clipped paper (pure white, or a
    flat drawing) has lost that tail, and JPEG smooths noise into blotches, so
    differences of neighbouring pixels count too, but not between two clipped
    pixels, which show no noise. Stroke cores are left out of both.
    """
    not_core = 0.5 * ink.max()
    mask = _border_mask(ink.shape)
    paper = ink[mask][ink[mask] < not_core]
    spread = np.percentile(paper, 30.9) - np.percentile(paper, 6.7) if paper.size else 0.0
    pairs = mask[:, 1:]
    left, right = ink[:, :-1][pairs], ink[:, 1:][pairs]
    usable = (np.maximum(left, right) < not_core) & ~(clipped[:, :-1][pairs] & clipped[:, 1:][pairs])
    step = np.median(np.abs(left[usable] - right[usable])) if usable.any() else 0.0
    return float(max(spread, 1.4826 * step / np.sqrt(2)))


def _background(gray: np.ndarray) -> np.ndarray:
    """The paper's level at each pixel: a plane fitted to the paper along the four edges.

    Lighting often slopes across a photo, so one level will not do. Each edge is
    read in short pieces, each at a low percentile so a stroke along part of it
    is ignored; pieces that are mostly stroke, as in a tight crop, are then
    dropped as outliers above the plane.
    """
    h, w = gray.shape
    strip = _border_width(gray.shape)
    pieces = []  # (row, column, paper level) of each piece of edge
    for start, stop in _spans(w):
        middle = (start + stop - 1) / 2
        pieces.append((0.0, middle, np.percentile(gray[:strip, start:stop], 25)))
        pieces.append((h - 1.0, middle, np.percentile(gray[-strip:, start:stop], 25)))
    for start, stop in _spans(h):
        middle = (start + stop - 1) / 2
        pieces.append((middle, 0.0, np.percentile(gray[start:stop, :strip], 25)))
        pieces.append((middle, w - 1.0, np.percentile(gray[start:stop, -strip:], 25)))
    rows, cols, levels = np.array(pieces).T
    design = np.stack([np.ones_like(rows), rows / h, cols / w], axis=1)
    coef = np.array([np.median(levels), 0.0, 0.0])  # a start that a minority of stroke pieces cannot drag
    for _ in range(3):
        residual = levels - design @ coef
        keep = residual <= np.median(residual) + max(3 * np.median(np.abs(residual)), 0.01)
        coef = np.linalg.lstsq(design[keep], levels[keep], rcond=None)[0]
    row_term = coef[1] * np.arange(h, dtype=np.float32)[:, None] / h
    col_term = coef[2] * np.arange(w, dtype=np.float32)[None, :] / w
    return (coef[0] + row_term + col_term).astype(np.float32)


# Paper is never taken as darker than this (ink bright): dividing by the headroom left above a
# darker one would turn its noise into strokes.
_DARKEST_PAPER = 0.8
# How far (0..1) the strongest ink on a patch of paper stands above it, at least: a patch without
# any is not paper but ink.
_INK_ON_PAPER = 0.1
# Strokes are thinner than this share of the image's shorter side; a patch of one tone wider than
# it in both directions is paper, whatever its tone.
_PAPER_PATCH = 1 / 3


def _paper_level(gray: np.ndarray) -> np.ndarray:
    """The paper's level at each pixel (ink bright, paper dark): the plane along the edges
    (``_background``), raised where a patch of paper has another tone, such as a photo pasted on a
    page or a sheet of gray paper on a white desk, which the plane would count as ink.

    A morphological opening finds such patches (the brightest of the darkest values around each
    pixel, over a square ``_PAPER_PATCH`` wide): it follows any patch wider than the square, while
    strokes, being thinner, drop out of it. A coarse copy of the image says first whether there is
    any patch to find, as there seldom is.
    """
    plane = _background(gray)
    k = max(3, int(min(gray.shape) * _PAPER_PATCH) | 1)
    f = min(gray.shape) // 32
    if f >= 2:
        h, w = (gray.shape[0] // f) * f, (gray.shape[1] // f) * f
        coarse = gray[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
        if (_opening(coarse, max(3, (k // f) | 1)) - plane[:h:f, :w:f]).max() < _MIN_CONTRAST:
            return plane
    opened = _opening(gray, k)
    patch = opened > plane + _MIN_CONTRAST
    if patch.any():
        above = gray[patch] - opened[patch]
        # the opening runs along the paper's darkest noise: lift it to the paper's middle, as the
        # edges' paper is lifted in _ink_on_black (strokes are too few to move the median)
        lift = np.median(above)
        # Paper has ink on it somewhere; a patch with none is a bold glyph wider than the square,
        # as bright as its own brightest pixels: ink, left to the plane.
        if np.percentile(above, 99.5) - lift < _INK_ON_PAPER:
            return plane
        opened[patch] += lift
    return np.maximum(plane, opened)


def _opening(image: np.ndarray, k: int) -> np.ndarray:
    darkest = _running(_running(image, k, 0, np.minimum), k, 1, np.minimum)
    return _running(_running(darkest, k, 0, np.maximum), k, 1, np.maximum)


def _running(a: np.ndarray, k: int, axis: int, extreme) -> np.ndarray:
    """The minimum or maximum (``extreme``) of each centred run of ``k`` values along ``axis``, at a
    cost that does not grow with ``k`` (van Herk / Gil-Werman: within blocks of ``k``, an extreme
    from each block's start and one from its end; any run spans the end of one block and the start
    of the next). Beyond the edges the edge value repeats."""
    a = np.moveaxis(a, axis, -1)
    n = a.shape[-1]
    blocks = -(-(n + k - 1) // k)
    padded = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(k // 2, blocks * k - n - k // 2)], mode="edge")
    shaped = padded.reshape(*a.shape[:-1], blocks, k)
    from_start = extreme.accumulate(shaped, axis=-1).reshape(padded.shape)
    from_end = np.flip(extreme.accumulate(np.flip(shaped, -1), axis=-1), -1).reshape(padded.shape)
    return np.moveaxis(extreme(from_end[..., :n], from_start[..., k - 1 : k - 1 + n]), -1, axis)


def _spans(length: int, count: int = 8) -> list[tuple[int, int]]:
    edges = np.linspace(0, length, count + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _border(image: np.ndarray) -> np.ndarray:
    """The pixels of a frame a few percent wide around the image, flattened (row by row)."""
    return image.take(_border_indices(image.shape))


@functools.lru_cache(maxsize=32)
def _border_indices(shape: tuple[int, ...]) -> np.ndarray:
    return np.flatnonzero(_border_mask(shape))


def _border_width(shape: tuple[int, ...]) -> int:
    return max(1, min(shape[:2]) // 40)


@functools.lru_cache(maxsize=32)  # the same few sizes, over and over, when serving
def _border_mask(shape: tuple[int, ...]) -> np.ndarray:
    h, w = shape[:2]
    width = _border_width(shape)
    mask = np.zeros((h, w), dtype=bool)
    mask[:width, :] = mask[-width:, :] = True
    mask[:, :width] = mask[:, -width:] = True
    mask.flags.writeable = False
    return mask


def _crop_to_ink(ink: np.ndarray) -> np.ndarray:
    """Crop to where the strokes are at least half strength: the edge of the pen line.

    MNIST boxed the binary NIST strokes; the faint blur around a scanned or
    resized stroke would otherwise count too and shrink the digit a few percent.
    """
    strokes = ink >= _STROKE_EDGE
    rows = np.flatnonzero(strokes.any(axis=1))
    cols = np.flatnonzero(strokes.any(axis=0))
    if rows.size == 0:
        raise ImageError("blank image: no ink found")
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


# A glyph whose longer side is under this share of the page's shorter side is scaled as if it
# were this long: a dot or a short tick stays small instead of filling the box as a bold blob
# (which the model would read as a confident 0 or 8), and the novelty score sees it for what it is.
MIN_GLYPH = 0.25


def _fit_in_box(ink: np.ndarray, box: int, least: float = 0.0) -> np.ndarray:
    """Scale so the longer side is `box` pixels, keeping the aspect ratio (a '1' stays thin); a glyph
    shorter than `least` pixels is scaled as one `least` long would be."""
    h, w = ink.shape
    scale = box / max(h, w, least)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = Image.fromarray(ink.astype(np.float32)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized), 0.0, 1.0)  # LANCZOS rings a little below 0 and above 1


def _centre_by_mass(glyph: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Paste `glyph` into a black canvas so its centre of mass lands at the canvas centre."""
    canvas = np.zeros(size, dtype=np.float32)
    gh, gw = glyph.shape
    mass = glyph.sum()
    if mass <= 0:  # a speck that vanished in the resize
        raise ImageError("blank image: no ink found")
    com_y = (glyph.sum(axis=1) @ np.arange(gh)) / mass
    com_x = (glyph.sum(axis=0) @ np.arange(gw)) / mass
    # MNIST's centres of mass average (14.0, 14.0) in pixel indices on 28x28.
    top = int(np.clip(round(size[0] / 2 - com_y), 0, max(0, size[0] - gh)))
    left = int(np.clip(round(size[1] / 2 - com_x), 0, max(0, size[1] - gw)))
    part = glyph[: size[0], : size[1]]
    canvas[top : top + part.shape[0], left : left + part.shape[1]] = part
    return canvas


def _to_uint8(gray: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)


def _resize_gray(gray: np.ndarray, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """Only resize to `size` (height, width), no inversion or centring: the naive `--no-normalize` path."""
    image = Image.fromarray(np.asarray(gray, dtype=np.float32))
    resized = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return _to_uint8(np.clip(np.asarray(resized), 0.0, 1.0))


def digit_box(size: tuple[int, int]) -> int:
    """The square a digit is fitted into: MNIST's 20-pixel box in its 28-pixel field, kept in
    proportion for other sizes."""
    return round(PREPROCESSING["box"] * min(size) / min(PREPROCESSING["size"]))


def prepare_image(
    source: str | Path | bytes,
    normalize: bool = True,
    size: tuple[int, int] = (28, 28),
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """An image file (path, or uploaded bytes called ``name``) as a uint8 ``size`` digit for the model.

    The command line, the HTTP API and the web page all come through here. ImageError names the
    file; ImageTooLargeError, raised before decoding, an image of more than ``max_pixels``.
    """
    working_side = max(WORKING_SIDE, 8 * max(size))
    if not normalize:  # its errors already name the file
        return _resize_gray(read_grayscale(source, name, max_pixels, working_side), size)
    size = tuple(size)
    pixels = _plain_gray_png(source, size) if isinstance(source, bytes) else None
    if pixels is None:
        gray = _read(source, name, functools.partial(_digit_input, size=size), max_pixels, working_side)
    else:
        gray = _gray_digit_input(pixels, size)
    if gray.dtype == np.uint8:
        return gray
    try:
        return normalize_digit(gray, size, box=digit_box(size))
    except ImageError as error:
        raise ImageError(f"{label_of(source, name)}: {error}") from None
