"""Datasets: the IDX files in torchvision's layout (torchvision fetches them when missing), kept as tensors.

Each split is memory-mapped as a uint8 tensor (N x H x W) and scaled to [0, 1] floats on the
chosen device, exactly as torchvision's ``ToTensor`` would, so batches are plain tensor slices
(or, for a set too large for memory as floats, gathered and scaled a batch at a time: ``stream``).
torchvision is imported only to fetch the files: its import alone takes seconds.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import DataError, UsageError
from .settings import CLASSES, DATASETS, dataset_folder  # noqa: F401  (DATASETS: importable from here too)

SPLITS = ("train", "test")


@dataclass
class ImageSet:
    """One split of a dataset, held in memory."""

    images: torch.Tensor  # uint8, N x H x W (gray) or N x 3 x H x W (colour)
    labels: torch.Tensor  # int64, N
    classes: list[str]
    dataset: str
    split: str
    # folder and CSV datasets: the files of this split, those skipped, the decode settings
    # and held-out test indices, as plain data for the run to save (see sources.folder)
    source: dict = field(default_factory=dict)
    # where ``images`` lie in a file, when they are memory-mapped from one (an IDX file, a
    # folder's cache): streaming reads batches from there; None for images held in memory
    file: FileRegion | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:  # (H, W) or (C, H, W)
        return tuple(self.images.shape[1:])


def dataset_class(name: str):
    """torchvision's dataset class for ``name`` (imports torchvision)."""
    folder = dataset_folder(name)
    from torchvision.datasets import mnist

    return getattr(mnist, folder)


def raw_folder(name: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / dataset_folder(name) / "raw"


def expected_files(name: str, split: str) -> tuple[str, str]:
    """The uncompressed (images, labels) file names torchvision expects for a split."""
    prefix = "train" if split == "train" else "t10k"
    return (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")


def load_split(
    name: str, data_dir: str | os.PathLike = "data", split: str = "train", download: bool = True, **options
) -> ImageSet:
    """Read one split of ``name`` from ``data_dir`` (torchvision's layout), fetching it if missing.

    Folders, CSVs and the other classic datasets come from ``sources`` (``options`` are
    theirs: image size, resize, colour, test fraction, cache); MNIST and Fashion-MNIST from here.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    from . import sources

    if sources.provides(name):
        return sources.load_split(name, data_dir, split, download, **options)
    sources.check_options(name, options)
    folder = raw_folder(name, data_dir)
    image_file, label_file = (folder / f for f in expected_files(name, split))
    missing = [p.name for p in (image_file, label_file) if not p.is_file()]
    if missing:
        _fetch(name, data_dir, split, folder, missing, download)

    from .sources.classic import read_idx

    array = read_idx(image_file, "image", mapped=True)
    images, labels = torch.from_numpy(array), torch.from_numpy(read_idx(label_file, "label")).long()
    classes = list(CLASSES[name])
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(
            f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels; "
            "the files do not belong together"
        )
    if len(labels) == 0:
        raise DataError(f"{label_file} holds no samples")
    if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
        raise DataError(f"{label_file} has labels outside 0..{len(classes) - 1}; the file is corrupt")
    return ImageSet(images, labels, classes, name, split, file=file_region(array))


class FileRegion(NamedTuple):
    """Where a C-contiguous uint8 array's bytes lie in a file: row ``r`` of rows of ``b`` bytes
    starts at ``offset + r * b``."""

    path: str
    offset: int


def file_region(array) -> FileRegion | None:
    """The file region a numpy array maps (``np.memmap``, ``np.load(mmap_mode=...)``), if any.

    ``array`` may be a view of the map (a reshape, say) as long as it is C-contiguous.
    """
    import mmap

    import numpy as np

    if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
        return None
    owner = array
    for _ in range(16):  # views of views: a short chain to the memmap made over the mmap
        if isinstance(owner, np.memmap) and isinstance(owner.base, mmap.mmap) and owner.filename:
            # a view is a memmap too, with the map's offset: count from the map's own first byte
            start = array.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
            return FileRegion(str(owner.filename), owner.offset + start)
        owner = owner.base
        if not isinstance(owner, np.ndarray):
            return None
    return None


def _fetch(name, data_dir, split, folder, missing, download):
    from .sources.classic import fetch

    hint = f"pass --data-dir DIR where DIR/{folder.parent.name}/raw/ holds the IDX files"
    get = lambda: dataset_class(name)(root=str(data_dir), train=split == "train", download=True)  # noqa: E731
    fetch(name, split, f"{', '.join(missing)} not found in {folder}", hint, download, get, data_dir)


# Dimensions of each IDX file: N x H x W images, N labels.
_IDX_DIMS = {"image": 3, "label": 1}


def _check_idx_header(path: Path, kind: str) -> None:
    """Refuse a file whose header does not describe exactly the bytes it holds, before reading it.

    An IDX header is two zero bytes, a type code (0x08: unsigned bytes, all MNIST uses), the
    number of dimensions, then each as a big-endian uint32. A corrupt or hostile header can
    claim terabytes; held against the file's length first, it never sizes an allocation.
    """
    ndim = _IDX_DIMS[kind]
    header_size = 4 + 4 * ndim
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(header_size)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    invalid = f"{path} is not a valid IDX {kind} file (corrupt or truncated:"
    if len(head) < header_size:
        raise DataError(f"{invalid} {size} bytes, shorter than its {header_size}-byte header)")
    if head[:4] != bytes([0, 0, 0x08, ndim]):
        raise DataError(f"{invalid} magic number {head[:4].hex()}, expected {bytes([0, 0, 0x08, ndim]).hex()})")
    dims = struct.unpack(f">{ndim}I", head[4:])
    expected = header_size + math.prod(dims)
    if size != expected:
        raise DataError(f"{invalid} its header says {' x '.join(map(str, dims))}, {expected} bytes in all, but it has {size})")


def to_float(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images to float32 in [0, 1] on ``device``, as ``ToTensor`` scales them."""
    return images.to(device).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images as a dataset stores them: float ones in [0, 1] back to uint8, rounded (uint8 as they are)."""
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


# ``preprocessing["image_files"]["name"]`` of a model whose user files are decoded as its
# dataset's own files were (``sources.images.read_image``), not normalised as digits.
DATASET_DECODE = "dataset-decode"


def preprocessing_for(deskewed: bool = False, decode: dict | None = None) -> dict:
    """The description of the input pipeline that checkpoints record (plain data).

    ``decode`` (``image_size``, ``resize``, ``color``, as a dataset settled them) says a
    user's image files are to be decoded that way; None, that they are normalised as MNIST
    digits (``preprocess.PREPROCESSING``). Prediction reads this, never the dataset's name.
    """
    from .deskew import DESKEW
    from .preprocess import PREPROCESSING

    if decode is None:
        image_files = dict(PREPROCESSING)
    else:
        image_files = {
            "name": DATASET_DECODE,
            "image_size": [int(v) for v in decode["image_size"]],
            "resize": decode["resize"],
            "color": decode["color"],
            "steps": [
                "EXIF orientation applied, transparency over white, 16-bit and float scaled to 8 bits",
                "gray or RGB as the dataset",
                "resized to image_size: fit (aspect kept, padded with the border colour), stretch, or crop (cover, centre cut)",
            ],
        }
    return {"scale": "x / 255", "deskew": dict(DESKEW) if deskewed else False, "image_files": image_files}


def decode_settings_of(preprocessing: dict | None) -> dict | None:
    """The recorded ``image_size``/``resize``/``color`` of a dataset-decode model; None for a digit model."""
    files = (preprocessing or {}).get("image_files") or {}
    if files.get("name") != DATASET_DECODE:
        return None
    return {k: files[k] for k in ("image_size", "resize", "color")}


def prepare_inputs(images: torch.Tensor, preprocessing: dict | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (0-255) to the float tensor the model sees, as its recorded ``preprocessing`` says.

    Training, evaluation and prediction all come through here, so a model is always fed
    what it was trained on. Floating images (the served protocol's FP32) are taken as
    already scaled to 0-1, and get the same steps but the scaling.
    """
    uint8 = images.dtype == torch.uint8
    if not (preprocessing and preprocessing.get("deskew")):
        return to_float(images, device) if uint8 else images.to(device, torch.float32)
    if images.dim() == 4:  # N x C x H x W: deskewing measures the slant of gray strokes
        raise UsageError("--deskew works on grayscale images only; these are colour (use --color gray)")
    from .deskew import deskew

    # uint8 images are deskewed as uint8 (rounded to whole pixel values), then scaled
    images = deskew(images.to(device) if uint8 else images.to(device, torch.float32))
    return to_float(images, device) if uint8 else images


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle 0..n-1 with ``seed`` and cut off ``val_fraction`` of it as the validation set.

    ``val_fraction`` 0 keeps everything for training (the last fit, once settings are chosen):
    the validation set is empty.
    """
    check_val_fraction(val_fraction)
    n_val = int(round(n * val_fraction))
    if (n_val == 0 and val_fraction > 0) or n_val == n:
        raise UsageError(f"--val-fraction {val_fraction} leaves an empty train or validation set of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:  # also refuses NaN
        raise UsageError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")


def subset_indices(indices: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """A seeded random ``size`` of ``indices`` (the tutorial's "train on a small subset")."""
    if not 0 < size <= len(indices):
        raise UsageError(f"--train-subset must be between 1 and {len(indices)}, got {size}")
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 1))
    return indices[perm[:size]]
