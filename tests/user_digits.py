"""Test helper: re-render MNIST digits the way users bring them to `predict`.

A user's image is not a 28x28 white-on-black tensor: it is dark ink on light,
slightly noisy and unevenly lit paper, much bigger than 28 pixels, off-centre
on a larger page, and saved as PNG (grey, colour, transparent) or JPEG. These
helpers turn MNIST test digits into such files so tests can check that
preprocessing recovers what the model was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("png-L", "png-RGB", "png-RGBA", "jpeg")

_UPSCALE_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


def write_user_digit(digit: np.ndarray, path_without_suffix: Path, rng: np.random.Generator, kind: str) -> Path:
    """Write `digit` (uint8 28x28, white on black) as a user-style image file of `kind`; return its path."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return write_ink(_scaled_ink(digit, rng), path_without_suffix, rng, kind)


def write_ink(ink: np.ndarray, path_without_suffix: Path, rng: np.random.Generator, kind: str) -> Path:
    """Write ink coverage (float H x W in [0, 1], 1 = ink) off-centre on a larger page of `kind`; return its path."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    page_h, page_w = (n + int(rng.integers(n // 4 + 8, n + 60)) for n in ink.shape)
    top = int(rng.integers(0, page_h - ink.shape[0] + 1))
    left = int(rng.integers(0, page_w - ink.shape[1] + 1))
    coverage = np.zeros((page_h, page_w), dtype=np.float32)
    coverage[top : top + ink.shape[0], left : left + ink.shape[1]] = ink

    # Fast PNG compression keeps tests quick; the pixels are the same at any level.
    path = Path(path_without_suffix).with_suffix(".jpg" if kind == "jpeg" else ".png")
    if kind == "png-RGBA":
        _transparent_image(coverage, rng).save(path, compress_level=1)
    elif kind == "png-L":
        Image.fromarray(_to_uint8(_on_paper(coverage, rng, channels=1)[..., 0])).save(path, compress_level=1)
    else:
        rgb = Image.fromarray(_to_uint8(_on_paper(coverage, rng, channels=3)))
        if kind == "jpeg":
            rgb.save(path, quality=int(rng.integers(75, 91)))
        else:
            rgb.save(path, compress_level=1)
    return path


def write_user_digit_set(images: np.ndarray, out_dir: Path, seed: int) -> list[Path]:
    """Write each digit of `images` (N x 28 x 28 uint8) into `out_dir`, cycling through KINDS."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_user_digit(digit, out_dir / f"digit{i:05d}", rng, KINDS[i % len(KINDS)])
        for i, digit in enumerate(images)
    ]


def _scaled_ink(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ink coverage in [0, 1], the digit blown up 3-12x as a phone photo or big drawing would be."""
    factor = rng.uniform(3.0, 12.0)
    side = round(28 * factor)
    resample = _UPSCALE_FILTERS[int(rng.integers(len(_UPSCALE_FILTERS)))]
    big = Image.fromarray(np.asarray(digit, dtype=np.uint8)).resize((side, side), resample)
    return np.asarray(big, dtype=np.float32) / 255.0


def _on_paper(coverage: np.ndarray, rng: np.random.Generator, channels: int) -> np.ndarray:
    """Dark ink over light paper that is noisy and lit a little unevenly, as float 0..255 H x W x channels."""
    h, w = coverage.shape
    paper = rng.uniform(230.0, 250.0, size=channels)
    ink = rng.uniform(0.0, 70.0, size=channels)
    # A gentle brightness slope across the page, like a photo lit from one side.
    slope_y, slope_x = rng.uniform(-12.0, 12.0, size=2)
    lighting = slope_y * (np.arange(h, dtype=np.float32)[:, None] / h - 0.5) + slope_x * (
        np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    )
    noise = 2.5 * rng.standard_normal(size=(h, w), dtype=np.float32)
    cov = coverage[..., None]
    return (paper * (1 - cov) + ink * cov).astype(np.float32) + (lighting + noise)[..., None]


def _transparent_image(coverage: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """RGBA drawing: the ink's colour everywhere, opacity carries the strokes, paper fully transparent."""
    h, w = coverage.shape
    rgba = np.empty((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = rng.integers(0, 60, size=3, dtype=np.uint8)
    rgba[..., 3] = _to_uint8(coverage * 255.0)
    return Image.fromarray(rgba)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
