"""What every dataset's loader shares: the split it returns (``ImageSet``), where its images lie in
a file, the train/validation split, the one check of a held-out fraction, and the one fetch."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import DataError, UsageError


@dataclass
class ImageSet:
    """One split of a dataset, held in memory."""

    images: torch.Tensor  # uint8, N x H x W (gray) or N x 3 x H x W (colour)
    labels: torch.Tensor  # int64, N
    classes: list[str]
    dataset: str
    split: str
    # folder and CSV datasets: the files of this split, those skipped, the decode settings
    # and held-out test indices, as plain data for the run to save (see datasets.folder)
    source: dict = field(default_factory=dict)
    # where ``images`` lie in a file, when they are memory-mapped from one (an IDX file, a
    # folder's cache): streaming reads batches from there; None for images held in memory
    file: FileRegion | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:  # (H, W) or (C, H, W)
        return tuple(self.images.shape[1:])


def image_set(images, labels, classes, name: str, split: str, source: dict | None = None) -> ImageSet:
    """An ``ImageSet`` of numpy ``images`` (uint8) and ``labels`` (whole numbers), sharing their memory:
    a memory-mapped file stays on disk, and its region is recorded for streaming."""
    import numpy as np

    labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return ImageSet(torch.from_numpy(images), labels, list(classes), name, split, source=source or {},
                    file=file_region(images))


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


# --- held-out shares ------------------------------------------------------------------------


def check_fraction(fraction: float, flag: str) -> float:
    """A share to hold out (``--val-fraction``, ``--test-fraction``): at least 0 and below 1."""
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:  # also refuses NaN
        raise UsageError(f"{flag} must be at least 0 and below 1, got {fraction}")
    return fraction


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle 0..n-1 with ``seed`` and cut off ``val_fraction`` of it as the validation set.

    ``val_fraction`` 0 keeps everything for training (the last fit, once settings are chosen):
    the validation set is empty.
    """
    check_fraction(val_fraction, "--val-fraction")
    n_val = int(round(n * val_fraction))
    if (n_val == 0 and val_fraction > 0) or n_val == n:
        raise UsageError(f"--val-fraction {val_fraction} leaves an empty train or validation set of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def subset_indices(indices: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """A seeded random ``size`` of ``indices`` (the tutorial's "train on a small subset")."""
    if not 0 < size <= len(indices):
        raise UsageError(f"--train-subset must be between 1 and {len(indices)}, got {size}")
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 1))
    return indices[perm[:size]]


# --- fetching missing files -----------------------------------------------------------------


def fetch(name: str, split: str, where: str, hint: str, download: bool, get, data_dir) -> None:
    """Download a missing dataset with ``get()``, or say in one line why it is missing.

    A failed download names its cause and leaves nothing behind in ``data_dir``: every file and
    folder it made there is removed.
    """
    if not download:
        raise DataError(f"{name} {split} data missing: {where}; {hint}")
    data_dir = Path(data_dir)
    before = _entries(data_dir)
    try:
        # torchvision reports download progress on stdout, which belongs to --json output.
        with contextlib.redirect_stdout(sys.stderr):
            get()
    except Exception as exc:  # any network or disk failure ends the same way for the user
        _remove_new(data_dir, before)
        raise DataError(f"{name} {split} data missing: {where} and download failed ({_reason(exc)}); {hint}") from None


def _reason(exc: BaseException) -> str:
    """An exception in one line. torchvision's "Error downloading FILE:" lists each mirror's
    error on the lines after it: the last of them is the cause."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[-1]}"
    return lines[0]


def _entries(root: Path, depth: int = 3, limit: int = 10_000) -> set[Path] | None:
    """The paths under ``root`` a few levels down (None for a folder too big to list)."""
    if not root.exists():
        return set()
    found = set()
    for folder, dirs, files in os.walk(root):
        level = len(Path(folder).relative_to(root).parts)
        if level >= depth:
            dirs[:] = []
        found.update(Path(folder) / n for n in (*dirs, *files))
        if len(found) > limit:
            return None
    return found | {root}


def _remove_new(root: Path, before: set[Path] | None) -> None:
    """Remove what appeared under ``root`` since ``before`` (``root`` itself too, if it is new)."""
    if before is None:
        return
    if not before:  # the download made the folder: all of it is its own
        shutil.rmtree(root, ignore_errors=True)
        return
    for path in sorted(_entries(root) or (), key=lambda p: len(p.parts)):
        if path not in before and path.exists():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
