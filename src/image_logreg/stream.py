"""Training sets larger than memory: batches gathered from the uint8 file and made float one at a time.

In memory, a split is scaled to float32 once (4 bytes a pixel) and batches are slices of it.
When that float form would not fit ``--max-memory``, the images stay in their memory-mapped
uint8 array (the IDX file, or a folder's decoded-image cache) and each batch's rows are
gathered from it and passed through the same ``prepare_inputs``, so every batch holds the same
numbers as in memory and the weights come out the same to the bit.

Pages of a mapped file count towards the process's resident memory once read, until they are
released, and the kernel has no reason to release them while memory is plentiful. So the
mapping is told to drop them (``MADV_DONTNEED``: the page cache keeps them, and the next read is
a cheap minor fault) after every ``RELEASE_BYTES`` of rows read.
"""

from __future__ import annotations

import math
import mmap
import os
import re

import torch

from .data import prepare_inputs
from .errors import UsageError

RELEASE_BYTES = 256 << 20
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_memory(text: str | int | float | None) -> int:
    """``--max-memory``: bytes, or a number with K, M, G or T (powers of 1024): ``1.5G``, ``800M``."""
    if text is None:
        return default_max_memory()
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UsageError(f"--max-memory must be a size such as 4G, 800M or 1073741824, got {text!r}")
        value = float(match[1]) * 1024 ** " KMGT".index((match[2] or " ").upper())
    if not (value >= 1 and math.isfinite(value)):
        raise UsageError(f"--max-memory must be at least 1 byte, got {text!r}")
    return int(value)


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB": sizes in messages."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def default_max_memory() -> int:
    """Half the machine's memory: the float training set, with room left for everything else."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume 8 GiB
        return 4 << 30


def float_bytes(rows: int, images: torch.Tensor) -> int:
    """The bytes ``rows`` of ``images`` take as float32 inputs."""
    return rows * math.prod(images.shape[1:]) * 4


class StreamedImages:
    """Rows ``rows`` of uint8 ``images``, read as float model inputs when asked for.

    Indexing (``x.take(idx)``, ``x[a:b]``) gives flat float32 rows (n x features) on ``device``,
    exactly what ``prepare_inputs(images[rows], ...)`` would have held at those positions.
    ``mapping`` is the memory map behind ``images`` (None: nothing to release).
    """

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, preprocessing: dict | None, device, mapping=None):
        self.images = images
        self.rows = rows.cpu()
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.mapping = mapping
        self.features = math.prod(images.shape[1:])
        self._read_since_release = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.features)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        picked = self.images.index_select(0, self.rows.index_select(0, idx.cpu()))
        self._count(picked.numel())
        return prepare_inputs(picked, self.preprocessing, self.device).reshape(len(picked), -1)

    def __getitem__(self, part: slice) -> torch.Tensor:
        start, stop, step = part.indices(len(self))
        return self.take(torch.arange(start, stop, step))

    def _count(self, nbytes: int) -> None:
        self._read_since_release += nbytes
        if self._read_since_release >= RELEASE_BYTES:
            release(self.mapping)
            self._read_since_release = 0


def release(mapping) -> None:
    """Drop a read-only mapping's pages from this process's resident memory (they stay cached)."""
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)
