"""Training sets larger than memory: batches read from the uint8 file and made float one at a time.

In memory, a split is scaled to float32 once (4 bytes a pixel) and batches are slices of it.
When that float form would not fit ``--max-memory``, each batch's rows are read from the uint8
file the images are mapped from (the IDX file, or a folder's decoded-image cache) and passed
through the same ``prepare_inputs``, so every batch holds the same numbers as in memory and the
weights come out the same to the bit.

Rows are read with one ``pread`` each rather than through the memory map. A page of a mapped
file, once touched, counts towards the process's resident memory until the kernel reclaims it,
and a touch maps its neighbours too (fault-around: 64 KiB for a 784-byte row), so gathering
random rows through the map grows the process by the whole file within an epoch, and costs
more per row than the system call. Read rows stay in the page cache, which is not the
process's memory and which the kernel gives back as it needs.
"""

from __future__ import annotations

import itertools
import math
import os
import re

import numpy as np
import torch

from .data import prepare_inputs
from .errors import DataError, UsageError

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


# Where a container's memory limit is written (cgroup v2, then v1): a process in a container
# sees the host's memory in sysconf, but is killed past this limit.
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def default_max_memory() -> int:
    """Half the memory this process may use: the float training set, with room left for everything else."""
    return memory_available() // 2


def memory_available() -> int:
    """The machine's memory, or the container's limit where that is smaller."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume 8 GiB
        total = 8 << 30
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():  # "max" (v2) or a huge number (v1): no limit
            total = min(total, int(limit))
        break
    return total


def float_bytes(rows: int, images: torch.Tensor) -> int:
    """The bytes ``rows`` of ``images`` take as float32 inputs."""
    return rows * math.prod(images.shape[1:]) * 4


class StreamedImages:
    """Rows ``rows`` of uint8 ``images``, read as float model inputs when asked for.

    Indexing (``x.take(idx)``, ``x[a:b]``) gives flat float32 rows (n x features) on ``device``,
    exactly what ``prepare_inputs(images[rows], ...)`` would have held at those positions.
    ``file`` (``datasets.base.FileRegion``) is where ``images`` lie on disk: rows are then read from
    there; without it they are gathered from ``images`` in memory.
    """

    def __init__(self, images: torch.Tensor, rows: torch.Tensor, preprocessing: dict | None, device, file=None):
        self.images = images
        self.rows = rows.cpu()
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.features = math.prod(images.shape[1:])
        # without preadv (Windows), rows are gathered through the memory map instead
        self.file = file if hasattr(os, "preadv") else None
        self._fd = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.features)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        picked = self.rows.index_select(0, idx.cpu())
        raw = self._read(picked) if self.file is not None else self.images.index_select(0, picked)
        return prepare_inputs(raw, self.preprocessing, self.device).reshape(len(picked), -1)

    def __getitem__(self, part: slice) -> torch.Tensor:
        start, stop, step = part.indices(len(self))
        return self.take(torch.arange(start, stop, step))

    def _read(self, picked: torch.Tensor) -> torch.Tensor:
        """Rows ``picked`` of the file, one ``pread`` each, into a fresh uint8 batch."""
        if self._fd is None:
            self._fd = os.open(self.file.path, os.O_RDONLY)
        size = self.features  # uint8: a row's bytes
        batch = np.empty(len(picked) * size, dtype=np.uint8)
        flat = memoryview(batch)
        buffers = [[flat[at : at + size]] for at in range(0, len(batch), size)]
        offsets = (picked * size + self.file.offset).tolist()
        got = list(map(os.preadv, itertools.repeat(self._fd), buffers, offsets))
        if any(n != size for n in got):
            raise DataError(f"{self.file.path} ended early: it changed while training read it")
        return torch.from_numpy(batch).reshape(len(picked), *self.images.shape[1:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()
