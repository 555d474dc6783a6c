"""Decode image files into one uint8 array: every file once, in parallel, at one size and colour.

Each file becomes either an H x W gray image or a 3 x H x W RGB image (channels first, as
torch lays images out), or a reason why it cannot be used. Files are opened, checked and
turned upright as ``images`` opens every image file (as ``predict`` reads them too).

Nothing here imports torch: the decoding runs in worker processes, which start faster
without it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ..errors import UsageError
from ..images import OpenedImage, Unusable, flatten, open_image, open_image_unnamed, quiet_pillow
from ..settings import COLORS, MAX_PIXELS, RESIZE_MODES
# torchvision's Resize default: antialiased bilinear.
RESAMPLE = Image.Resampling.BILINEAR
# Below this many files a pool's start-up costs more than it saves.
PARALLEL_FROM = 512
# Files per task sent to a worker: enough that the round trip is a small share of the work.
CHUNK = 256
# Sizes named in the "images differ in size" error; the rest are counted.
SIZES_LISTED = 4


@dataclass(frozen=True)
class DecodeSettings:
    """How every image is brought to one shape. ``None`` fields are decided by the images."""

    image_size: tuple[int, int] | None = None  # (H, W); None: the size all images share
    resize: str = "fit"  # fit | stretch | crop, when an image is not image_size already
    color: str | None = None  # gray | rgb; None: rgb if any image has colour
    # Larger files are skipped unread; not in ``to_dict``: it decides which files are used, not how.
    max_pixels: int = MAX_PIXELS

    def check(self) -> "DecodeSettings":
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be a whole number of at least 1, got {self.max_pixels!r}")
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"unknown --resize {self.resize!r}; choose from {', '.join(RESIZE_MODES)}")
        if self.color is not None and self.color not in COLORS:
            raise UsageError(f"unknown --color {self.color!r}; choose from {', '.join(COLORS)}")
        return self

    def to_dict(self) -> dict:
        return {
            "image_size": list(self.image_size) if self.image_size else None,
            "resize": self.resize,
            "color": self.color,
        }


def decode_settings(image_size, resize: str | None, color: str | None, max_pixels: int | None) -> DecodeSettings:
    """The settings the folder and CSV options give (None: the default), checked."""
    return DecodeSettings(
        parse_image_size(image_size), resize or "fit", color, MAX_PIXELS if max_pixels is None else max_pixels
    ).check()


def parse_image_size(value) -> tuple[int, int] | None:
    """``"32x48"`` (H x W), ``"32"`` (square), ``32`` or ``(32, 48)`` as (H, W); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--image-size must be HxW (like 28x28) or one number, got {value!r}") from None
    elif isinstance(value, int):
        numbers = [value]
    else:
        numbers = [int(v) for v in value]
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 1 or max(numbers) > 4096:
        raise UsageError(f"--image-size must be HxW with sides from 1 to 4096, got {value!r}")
    return (numbers[0], numbers[1])


@dataclass
class Decoded:
    """What came out of decoding a list of files."""

    images: np.ndarray  # uint8, N x H x W (gray) or N x 3 x H x W (rgb), usable files only
    usable: np.ndarray  # int64 positions (into the list of files) of the images, in order
    skipped: list[tuple[int, str]]  # (position, reason) of each file that is not a usable image
    color: str  # gray | rgb, as decided
    image_size: tuple[int, int]  # (H, W)


# --- one file -------------------------------------------------------------------------------


def read_image(source: str | os.PathLike | bytes, settings: DecodeSettings, name: str | None = None) -> np.ndarray:
    """One file made as a dataset's images were: uint8 H x W (gray) or 3 x H x W (rgb).

    ``source`` is a path, or a file's bytes as uploaded (then ``name`` is what errors call
    it). ``settings`` must be complete, as a decoded dataset records them (its size and
    colour decided), so a model trained on a folder sees a new file the way it saw its
    training images. Raises ImageError naming the file (ImageTooLargeError for too many
    pixels, as ``predict`` does for any file).
    """
    if settings.image_size is None or settings.color is None:
        raise ValueError("read_image needs the image size and colour that the dataset settled on")
    settings = settings.check()
    with open_image(source, name=name, max_pixels=settings.max_pixels) as image:
        pixels = _decode(image, settings, None)[1]
    return pixels if pixels.flags.writeable else pixels.copy()  # Pillow's own buffer is read-only; callers may write


def _decode_or_skip(path, settings, expected):
    try:
        with open_image_unnamed(path, settings.max_pixels) as image:
            return _decode(image, settings, expected)
    except Unusable as reason:
        return ("skip", str(reason))


def _decode(image: OpenedImage, settings: DecodeSettings, expected: tuple[int, int] | None):
    """("image", pixels, has colour), or ("size", its size) for an image that is not the size
    ``expected`` when none was asked for (decoded no further: the files will be refused for it)."""
    size = image.upright_size()
    target = settings.image_size or expected
    if target is not None and settings.image_size is None and size != target:
        return ("size", size)
    if target is not None and size != target:
        image.decode_at_least(*target)
    pixels, has_colour = _to_pixels(image.upright(), settings, target or size)
    return ("image", pixels, has_colour)


def _to_pixels(image: Image.Image, settings: DecodeSettings, target: tuple[int, int]):
    """The image at ``target`` size as uint8 pixels (H x W or 3 x H x W), and whether it has colour."""
    image = flatten(image)
    if settings.color == "gray" and image.mode != "L":
        image = image.convert("L")
    elif settings.color == "rgb" and image.mode != "RGB":
        image = image.convert("RGB")
    if (image.height, image.width) != tuple(target):
        image = _resize(image, target, settings.resize)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        return pixels, False
    if settings.color is None and _channels_equal(pixels):
        return np.ascontiguousarray(pixels[..., 0]), False  # what convert("L") gives for R = G = B
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), True


def _resize(image: Image.Image, target: tuple[int, int], mode: str) -> Image.Image:
    height, width = target
    if mode == "stretch":
        return image.resize((width, height), RESAMPLE)
    if mode == "crop":  # scale to cover, cut the overflow off both sides equally
        return ImageOps.fit(image, (width, height), RESAMPLE)
    # fit: scale to fit inside, pad with the image's own background, so padding looks like more of it
    return ImageOps.pad(image, (width, height), RESAMPLE, color=border_colour(image))


def border_colour(image: Image.Image):
    """The median of the image's outermost pixels (per channel): its background, in most images."""
    pixels = np.asarray(image)
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    median = np.median(ring, axis=0)
    return int(median) if pixels.ndim == 2 else tuple(int(v) for v in median)


def _channels_equal(pixels: np.ndarray) -> bool:
    return bool(np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]))


def _decode_chunk(task):
    """The results for a chunk of files, the pixels of its images packed into one array.

    One array crosses between processes far faster than hundreds of small ones.
    """
    paths, settings, expected = task
    with quiet_pillow:  # once for the chunk: each file then costs a lock, not a change of warning filters
        results = [_decode_or_skip(path, settings, expected) for path in paths]
    pixels = [r[1] for r in results if r[0] == "image"]
    if not pixels or len({p.shape for p in pixels}) > 1:  # gray and colour mixed: sent as they are
        return results, None
    return [(r[0], None, r[2]) if r[0] == "image" else r for r in results], np.stack(pixels)


def _unpack_chunk(chunk):
    results, packed = chunk
    if packed is None:
        return results
    images = iter(packed)
    return [(r[0], next(images), r[2]) if r[0] == "image" else r for r in results]


# --- many files -----------------------------------------------------------------------------


def decode_files(
    paths: Sequence[str],
    settings: DecodeSettings,
    progress: bool | None = None,
    workers: int | None = None,
) -> Decoded:
    """Decode ``paths`` into one array. Raises ImageSizeError when sizes differ and none was given."""
    settings = settings.check()
    expected = settings.image_size or _first_size(paths, settings.max_pixels)
    results = _ResultCollector(len(paths), settings, expected)
    with _progress_bar(len(paths), progress) as bar:
        for start, chunk_results in _decode_in_chunks(paths, settings, expected, workers):
            for offset, result in enumerate(chunk_results):
                results.add(start + offset, result)
            bar.update(len(chunk_results))
    return results.finish()


class ImageSizeError(UsageError):
    """The images differ in size and no size was given: the message lists the sizes found."""


def _first_size(paths: Sequence[str], max_pixels: int) -> tuple[int, int] | None:
    """The upright size of the first usable file; the size others are held to when none is given."""
    for path in paths:
        try:
            with open_image_unnamed(path, max_pixels) as image:
                return image.upright_size()
        except Unusable:  # decoding will say why, in its place in the list
            continue
    return None


def _decode_in_chunks(paths, settings, expected, workers):
    """(first position, results) per chunk of ``CHUNK`` files, in order; in worker processes when it pays."""
    starts = range(0, len(paths), CHUNK)
    tasks = ((list(paths[s : s + CHUNK]), settings, expected) for s in starts)
    workers = available_cores() if workers is None else max(1, int(workers))
    if workers == 1 or len(paths) < PARALLEL_FROM:
        yield from zip(starts, map(_unpack_chunk, map(_decode_chunk, tasks)))
        return
    # Processes, not threads: opening a small image is mostly Python work under the GIL
    # (measured on the MNIST PNG export: threads were slower than one thread, processes scale).
    pool = ProcessPoolExecutor(
        min(workers, len(starts)), mp_context=_pool_context(), initializer=_start_worker, initargs=(os.getpid(),)
    )
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a process with threads (torch's) may deadlock the
            # child; these children only run Pillow and numpy, never the parent's thread pools.
            warnings.simplefilter("ignore", DeprecationWarning)
            results = pool.map(_decode_chunk, tasks)  # starts the workers
        yield from zip(starts, map(_unpack_chunk, results))
    except BaseException:
        # Ctrl-C or an error: drop the chunks not started, rather than decode them all first
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _start_worker(parent_pid: int) -> None:
    from .workers import die_with_parent

    die_with_parent(parent_pid)
    _leave_interrupts_to_parent()


def _leave_interrupts_to_parent() -> None:
    """Workers ignore Ctrl-C: the parent stops the pool, instead of every worker printing a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_context():
    import multiprocessing

    # fork on Linux: the workers start at once and, unlike spawn and forkserver, do not
    # re-run the caller's script (a script without an `if __name__ == "__main__"` guard works).
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _progress_bar(total: int, progress: bool | None):
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc="decoding images", unit="img", file=sys.stderr, disable=not show, leave=False)


class _ResultCollector:
    """Places each decoded image in one preallocated array, in file order.

    With the colour left open, images go into a gray array until the first colour image
    arrives; then the array becomes RGB, the gray images so far repeated in three channels
    (as ``convert("RGB")`` repeats them).
    """

    def __init__(self, total: int, settings: DecodeSettings, expected: tuple[int, int] | None):
        self.settings = settings
        self.size = expected
        self.color = settings.color or "gray"
        self.images = self._empty(total)
        self.filled = np.zeros(total, dtype=bool)
        self.skipped: list[tuple[int, str]] = []
        self.other_sizes: Counter = Counter()

    def _empty(self, total):
        if self.size is None:  # no file opened at all: every one will be skipped
            return np.empty((total, 0, 0), dtype=np.uint8)
        channels = (3,) if self.color == "rgb" else ()
        return np.empty((total, *channels, *self.size), dtype=np.uint8)

    def add(self, position: int, result) -> None:
        kind = result[0]
        if kind == "skip":
            self.skipped.append((position, result[1]))
        elif kind == "size":
            self.other_sizes[result[1]] += 1
        else:
            pixels, has_colour = result[1], result[2]
            if has_colour and self.color == "gray":
                self._become_rgb()
            if self.color == "rgb" and pixels.ndim == 2:
                pixels = pixels[None]  # broadcast into the three channels
            self.images[position] = pixels
            self.filled[position] = True

    def _become_rgb(self) -> None:
        self.color = "rgb"
        gray = self.images
        self.images = np.empty((len(gray), 3, *gray.shape[1:]), dtype=np.uint8)
        self.images[self.filled] = gray[self.filled][:, None]

    def finish(self) -> Decoded:
        if self.other_sizes:
            raise ImageSizeError(self._sizes_message())
        usable = np.flatnonzero(self.filled)
        images = self.images if len(usable) == len(self.images) else self.images[usable]
        return Decoded(images, usable.astype(np.int64), sorted(self.skipped), self.color, tuple(self.size or (0, 0)))

    def _sizes_message(self) -> str:
        sizes = self.other_sizes.copy()
        sizes[tuple(self.size)] += int(self.filled.sum())
        ranked = sizes.most_common()
        listed = ", ".join(f"{h}x{w} ({count})" for (h, w), count in ranked[:SIZES_LISTED])
        more = f" and {len(ranked) - SIZES_LISTED} more" if len(ranked) > SIZES_LISTED else ""
        return (
            f"the images differ in size (HxW: {listed}{more}); "
            "pass --image-size HxW to bring them to one size (--resize fit, stretch or crop)"
        )
