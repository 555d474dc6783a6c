"""Turn users' image files into the MNIST-style digits the model was trained on.

MNIST digits are white ink on black, 28x28 uint8, with the ink scaled to fit a
20x20 box (aspect ratio kept) and shifted so its centre of mass is at the
centre of the canvas. Users bring big, off-centre, dark-on-light drawings,
photos and scans; fed in naively they score at chance, so `normalize_digit`
repeats the steps that made MNIST.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from image_logreg.errors import ImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

PREPROCESSING = {
    "name": "mnist-normalize",
    "size": [28, 28],
    "box": 20,
    "polarity": "invert when the border is light, so ink is bright on black",
    "background": "plane fitted to the border, subtracted; ink rescaled to 1; faint noise zeroed",
    "crop": "bounding box of the ink",
    "resize": "LANCZOS to fit box x box, aspect ratio kept",
    "centre": "centre of mass at (size / 2), integer shift",
    "pass_through": "an image already size x size on a dark background is kept as is",
}

# Pixels (0..1 scale) at or below this count as "black" when asking whether an
# image already has MNIST's dark background.
_DARK = 0.1
# Ink must stand out from the paper by this much (0..1 scale) and by several
# times the paper's own noise, or the page counts as blank.
_MIN_CONTRAST = 0.05
_NOISE_SIGMAS = 6.0
# After rescaling the ink to 0..1, weaker values are JPEG ringing, dust or
# paper texture, not strokes.
_FAINT = 0.12
# ...but a noise estimate inflated by ink touching the border must not erase the strokes.
_MAX_FAINT = 0.5


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


def read_grayscale(path: str | Path) -> np.ndarray:
    """The image at `path` as float32 H x W in [0, 1], 1 = white; transparency is shown over white."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; an image that
        # big from a user is an attack or a mistake either way.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now, so a truncated file fails here and not later
                return _to_gray_array(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{path}: image too large (more than {Image.MAX_IMAGE_PIXELS} pixels), refusing to decode"
        ) from None
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{path}: truncated or corrupt image ({_one_line(error)})") from None


def _to_gray_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _numeric_to_unit(image)
    if "A" in image.getbands() or "transparency" in image.info:
        # Transparent pixels often hold black colour values; over white they read as paper.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _numeric_to_unit(image: Image.Image) -> np.ndarray:
    """16-bit, 32-bit and float images: scale by the range their values evidently use."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode.startswith("I;16"):
        scaled = values / 65535.0
    elif values.min() >= 0 and values.max() <= (1.0 if image.mode == "F" else 0.0):
        scaled = values
    elif values.min() >= 0 and values.max() <= 255:
        scaled = values / 255.0
    elif values.min() >= 0 and values.max() <= 65535:
        scaled = values / 65535.0
    else:
        span = values.max() - values.min()
        scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def normalize_digit(gray: np.ndarray, size: tuple[int, int] = (28, 28), box: int = 20) -> np.ndarray:
    """MNIST-style uint8 digit of `size` (height, width): white ink on black, fitted and centred."""
    gray = np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale array, got shape {gray.shape}")
    if _already_dataset_form(gray, size):
        return _to_uint8(gray)
    ink = _crop_to_ink(_ink_on_black(gray))
    return _to_uint8(_centre_by_mass(_fit_in_box(ink, box), size))


def _already_dataset_form(gray: np.ndarray, size: tuple[int, int]) -> bool:
    # Such an image is a dataset sample saved to disk: re-normalising would change
    # the pixels and the prediction would differ from the tensor's.
    return gray.shape == tuple(size) and np.mean(_border(gray) <= _DARK) >= 0.9


def _ink_on_black(gray: np.ndarray) -> np.ndarray:
    """Ink strength in [0, 1] on a 0 background, whatever the polarity, paper tone and lighting."""
    if np.median(_border(gray)) > 0.5:
        gray = 1.0 - gray  # dark ink on light paper
    ink = gray - _background(gray)
    noise = _paper_noise(_border(ink))
    strong = ink[ink > max(_MIN_CONTRAST, _NOISE_SIGMAS * noise)]
    if strong.size == 0:
        raise ImageError("blank image: no ink found")
    # A high percentile, not the max: one hot JPEG pixel must not set the scale.
    scale = np.percentile(strong, 90)
    ink = np.clip(ink / scale, 0.0, 1.0)
    # Anything the paper's noise could produce is zeroed, or specks would stretch the crop.
    ink[ink < np.clip(_NOISE_SIGMAS * noise / scale, _FAINT, _MAX_FAINT)] = 0.0
    return ink


def _paper_noise(border: np.ndarray) -> float:
    """Noise sigma of the paper, from how far its brightest-looking pixels stray above the median.

    One-sided on purpose: overexposed white paper clips at 1, which hides half of
    the noise and fools the usual median absolute deviation.
    """
    return float(np.percentile(border, 97.7) - np.median(border)) / 2.0


def _background(gray: np.ndarray) -> np.ndarray:
    """The paper's level at each pixel: a plane fitted to the border, as lighting often slopes."""
    h, w = gray.shape
    rows, cols = np.nonzero(_border_mask(gray.shape))
    points = np.stack([np.ones(rows.size), rows / h, cols / w], axis=1)
    values = gray[rows, cols]
    keep = np.ones(values.shape, dtype=bool)
    for _ in range(2):  # refit without border pixels that are ink touching the edge
        coef = np.linalg.lstsq(points[keep], values[keep], rcond=None)[0]
        residual = values - points @ coef
        keep = np.abs(residual) <= max(3.0 * np.median(np.abs(residual)), 0.02)
    plane = coef[0] + coef[1] * np.arange(h)[:, None] / h + coef[2] * np.arange(w)[None, :] / w
    return plane.astype(np.float32)


def _border(image: np.ndarray) -> np.ndarray:
    """The pixels of a frame a few percent wide around the image, flattened."""
    return image[_border_mask(image.shape)]


def _border_mask(shape: tuple[int, ...]) -> np.ndarray:
    h, w = shape[:2]
    width = max(1, min(h, w) // 40)
    mask = np.zeros((h, w), dtype=bool)
    mask[:width, :] = mask[-width:, :] = True
    mask[:, :width] = mask[:, -width:] = True
    return mask


def _crop_to_ink(ink: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        raise ImageError("blank image: no ink found")
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _fit_in_box(ink: np.ndarray, box: int) -> np.ndarray:
    """Scale so the longer side is `box` pixels, keeping the aspect ratio (a '1' stays thin)."""
    h, w = ink.shape
    scale = box / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = Image.fromarray(ink.astype(np.float32)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized), 0.0, 1.0)  # LANCZOS rings a little below 0 and above 1


def _centre_by_mass(glyph: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Paste `glyph` into a black canvas so its centre of mass lands at the canvas centre."""
    canvas = np.zeros(size, dtype=np.float32)
    gh, gw = glyph.shape
    mass = glyph.sum()
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


def resize_gray(gray: np.ndarray, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """Only resize to `size` (height, width), no inversion or centring: the naive `--no-normalize` path."""
    image = Image.fromarray(np.asarray(gray, dtype=np.float32))
    resized = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return _to_uint8(np.clip(np.asarray(resized), 0.0, 1.0))


def prepare_image(path: str | Path, normalize: bool = True, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """The file at `path` as a uint8 `size` digit ready for the model; ImageError names the file."""
    gray = read_grayscale(path)  # its errors already name the file
    if not normalize:
        return resize_gray(gray, size)
    try:
        return normalize_digit(gray, size, box=PREPROCESSING["box"])
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None
