"""IDX datasets (MNIST, Fashion-MNIST, KMNIST, EMNIST) in torchvision's layout, kept as tensors.

Each split is memory-mapped as a uint8 array (N x H x W) and shared with a tensor, so pages are
read as they are used and a set larger than memory can be trained in batches (``stream``).
torchvision is imported only to fetch missing files: its import alone takes seconds.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import fetch, image_set
from .registry import Dataset

# Dimensions of each IDX file: N x H x W images, N labels.
IDX_DIMS = {"image": 3, "label": 1}


def load(dataset: Dataset, data_dir, split: str, download: bool = True, **_loading):
    """One split of an IDX dataset as an ``ImageSet``; its files fetched with torchvision when missing."""
    image_file, label_file = files = split_files(dataset, data_dir, split)
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        _fetch(dataset, data_dir, split, missing, download)
    images, labels = read_idx(image_file, "image", mapped=True), read_idx(label_file, "label")
    if len(images) != len(labels):
        raise DataError(
            f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels; "
            "the files do not belong together"
        )
    if len(labels) == 0:
        raise DataError(f"{label_file} holds no samples")
    if dataset.files.get("transposed"):  # stored column by column: stand each image upright
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    labels = _checked_labels(labels, dataset.files.get("label_offset", 0), len(dataset.classes), label_file)
    return image_set(images, labels, dataset.classes, dataset.name, split)


def raw_folder(dataset: Dataset, data_dir: str | os.PathLike) -> Path:
    """Where torchvision keeps the dataset's uncompressed files: ``DATA_DIR/<its class name>/raw``."""
    return Path(data_dir) / dataset.torchvision / "raw"


def split_files(dataset: Dataset, data_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The (images, labels) files of a split, as torchvision names them once uncompressed."""
    prefix = dataset.files[split]
    folder = raw_folder(dataset, data_dir)
    return folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"


def dataset_class(dataset: Dataset):
    """torchvision's dataset class (imports torchvision)."""
    import torchvision.datasets

    return getattr(torchvision.datasets, dataset.torchvision)


def _fetch(dataset: Dataset, data_dir, split: str, missing: list[str], download: bool) -> None:
    folder = raw_folder(dataset, data_dir)
    hint = f"pass --data-dir DIR where DIR/{dataset.torchvision}/raw/ holds the IDX files"
    options = dict(dataset.files.get("download", {}))

    def get():
        dataset_class(dataset)(root=str(data_dir), train=split == "train", download=True, **options)

    fetch(dataset.name, split, f"{', '.join(missing)} not found in {folder}", hint, download, get, data_dir)


def read_idx(path: Path, kind: str, mapped: bool = False) -> np.ndarray:
    """An IDX file of unsigned bytes (``kind`` "image": N x H x W, "label": N), its header checked first.

    ``mapped``: memory-mapped copy-on-write (writable in memory, the file never changes), so
    pages are read as they are used and a set larger than memory can be trained in batches.
    """
    check_idx_header(path, kind)
    ndim = IDX_DIMS[kind]
    with open(path, "rb") as f:
        dims = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim + 1))[1:]
        if mapped and math.prod(dims):
            return np.memmap(path, dtype=np.uint8, mode="c", offset=4 + 4 * ndim, shape=dims)
        return np.fromfile(f, dtype=np.uint8).reshape(dims)


def check_idx_header(path: Path, kind: str) -> None:
    """Refuse a file whose header does not describe exactly the bytes it holds, before reading it.

    An IDX header is two zero bytes, a type code (0x08: unsigned bytes, all MNIST uses), the
    number of dimensions, then each as a big-endian uint32. A corrupt or hostile header can
    claim terabytes; held against the file's length first, it never sizes an allocation.
    """
    ndim = IDX_DIMS[kind]
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


def _checked_labels(labels: np.ndarray, offset: int, num_classes: int, path: Path) -> np.ndarray:
    labels = labels.astype(np.int64) - offset
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{path} has labels outside {offset}..{offset + num_classes - 1}; the file is corrupt")
    return labels
