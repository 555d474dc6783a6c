"""torchvision's other classic datasets: KMNIST, EMNIST, CIFAR-10 and CIFAR-100.

Each is found in ``data_dir`` in torchvision's own layout (what its dataset classes
download), and fetched with torchvision when missing and allowed. The files are parsed
here, not by torchvision:

- KMNIST and EMNIST are IDX files, as MNIST. EMNIST stores each image transposed (column
  by column); it is turned upright here, so letters read as letters.
- CIFAR's python batches are pickles. A pickle can run any code while it loads, so they
  are read with an unpickler that admits only what the batches hold (dicts, lists,
  strings, numbers and uint8 numpy arrays) and refuses every other global.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

# the class names torchvision gives each dataset, in label order (a test keeps them in step)
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
# EMNIST's merged splits fold the letters whose upper and lower case look alike into one class
_EMNIST_MERGED = set("cijklmopsuvwxyz")
EMNIST_CLASSES = {
    # torchvision lists "N/A" first: the letters are labelled 1..26. They become 0..25 here.
    "letters": list(string.ascii_lowercase),
    "balanced": sorted(set(string.digits + string.ascii_letters) - _EMNIST_MERGED),
    "digits": list(string.digits),
}
# labels as stored minus this are the class index
_EMNIST_LABEL_OFFSET = {"letters": 1, "balanced": 0, "digits": 0}


@dataclass(frozen=True)
class CifarLayout:
    folder: str  # torchvision's base_folder
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str  # the class names in the meta file
    labels_key: str  # the labels in each batch
    num_classes: int


CIFAR = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "batches.meta", "label_names", "labels", 10,
    ),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_label_names", "fine_labels", 100),
}
# CIFAR images: 3 x 32 x 32, each row of a batch's data the red plane, then green, then blue
CIFAR_SHAPE = (3, 32, 32)

NAMES = ("kmnist", *(f"emnist-{s}" for s in EMNIST_CLASSES), *CIFAR)


def load_classic(name: str, data_dir, split: str, download: bool = True):
    """One split of a classic dataset as an ``ImageSet`` (N x H x W gray, or N x 3 x 32 x 32 for CIFAR)."""
    if name in CIFAR:
        images, labels, classes = _load_cifar(name, Path(data_dir), split, download)
    elif name == "kmnist":
        images, labels, classes = _load_kmnist(Path(data_dir), split, download)
    elif name.removeprefix("emnist-") in EMNIST_CLASSES:
        images, labels, classes = _load_emnist(name, Path(data_dir), split, download)
    else:
        raise ValueError(f"not a classic dataset: {name!r}")
    return _image_set(images, labels, classes, name, split)


def _image_set(images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, split: str):
    import torch

    from ..data import ImageSet, file_region

    labels = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(torch.from_numpy(images), labels, classes, name, split, file=file_region(images))


# --- KMNIST and EMNIST: IDX files -----------------------------------------------------------


def _load_kmnist(data_dir: Path, split: str, download: bool):
    folder = data_dir / "KMNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    files = (folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte")

    def get():
        from torchvision.datasets import KMNIST

        KMNIST(root=str(data_dir), train=split == "train", download=True)

    images, labels = _read_idx_pair("kmnist", split, files, download, get)
    return images, _checked_labels(labels, 0, len(KMNIST_CLASSES), files[1]), list(KMNIST_CLASSES)


def _load_emnist(name: str, data_dir: Path, split: str, download: bool):
    which = name.removeprefix("emnist-")
    folder = data_dir / "EMNIST" / "raw"
    prefix = f"emnist-{which}-{'train' if split == 'train' else 'test'}"
    files = (folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte")

    def get():
        from torchvision.datasets import EMNIST

        EMNIST(root=str(data_dir), split=which, train=split == "train", download=True)

    images, labels = _read_idx_pair(name, split, files, download, get)
    images = np.ascontiguousarray(images.transpose(0, 2, 1))  # stored column by column: stand it upright
    classes = EMNIST_CLASSES[which]
    labels = _checked_labels(labels, _EMNIST_LABEL_OFFSET[which], len(classes), files[1])
    return images, labels, list(classes)


def _read_idx_pair(name, split, files, download, get):
    image_file, label_file = files
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        hint = f"pass --data-dir DIR where DIR/{image_file.parent.parent.name}/raw/ holds the IDX files"
        data_dir = image_file.parent.parent.parent
        fetch(name, split, f"{', '.join(missing)} not found in {image_file.parent}", hint, download, get, data_dir)
    images, labels = read_idx(image_file, "image", mapped=True), read_idx(label_file, "label")
    if len(images) != len(labels):
        raise DataError(
            f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels; "
            "the files do not belong together"
        )
    if len(labels) == 0:
        raise DataError(f"{label_file} holds no samples")
    return images, labels


def read_idx(path: Path, kind: str, mapped: bool = False) -> np.ndarray:
    """An IDX file of unsigned bytes (``kind`` "image": N x H x W, "label": N), its header checked first.

    ``mapped``: memory-mapped copy-on-write (writable in memory, the file never changes), so
    pages are read as they are used and a set larger than memory can be trained in batches.
    """
    from ..data import _IDX_DIMS, _check_idx_header

    _check_idx_header(path, kind)  # the same checks and messages as every IDX file gets
    ndim = _IDX_DIMS[kind]
    with open(path, "rb") as f:
        dims = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim + 1))[1:]
        if mapped and math.prod(dims):
            return np.memmap(path, dtype=np.uint8, mode="c", offset=4 + 4 * ndim, shape=dims)
        return np.fromfile(f, dtype=np.uint8).reshape(dims)


def _checked_labels(labels: np.ndarray, offset: int, num_classes: int, path: Path) -> np.ndarray:
    labels = labels.astype(np.int64) - offset
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{path} has labels outside {offset}..{offset + num_classes - 1}; the file is corrupt")
    return labels


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


# --- CIFAR: pickled python batches ----------------------------------------------------------


def _load_cifar(name: str, data_dir: Path, split: str, download: bool):
    layout = CIFAR[name]
    folder = data_dir / layout.folder
    batches = layout.train if split == "train" else layout.test
    missing = [f for f in (*batches, layout.meta) if not (folder / f).is_file()]
    if missing:
        hint = f"pass --data-dir DIR where DIR/{layout.folder}/ holds the python batches (cifar-*-python.tar.gz, extracted)"
        fetch(name, split, f"{', '.join(missing)} not found in {folder}", hint, download, lambda: _download_cifar(name, data_dir), data_dir)
    classes = _cifar_classes(folder / layout.meta, layout)
    images, labels = [], []
    for batch in batches:
        batch_images, batch_labels = _cifar_batch(folder / batch, layout)
        images.append(batch_images)
        labels.append(batch_labels)
    labels = np.concatenate(labels)
    _check_cifar_labels(labels, len(classes), folder / batches[0])
    return np.concatenate(images), labels, classes


def _download_cifar(name: str, data_dir: Path) -> None:
    """Fetch and unpack the archive with torchvision's URL and checksum, without letting it load the pickles."""
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    dataset = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    download_and_extract_archive(dataset.url, str(data_dir), filename=dataset.filename, md5=dataset.tgz_md5)


def _cifar_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    data, labels = batch.get("data"), batch.get(layout.labels_key)
    size = int(np.prod(CIFAR_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        raise DataError(f"{path} is not a valid CIFAR batch (its data is not N x {size} bytes)")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(type(v) is int for v in labels):
        raise DataError(f"{path} is not a valid CIFAR batch ({layout.labels_key} is not one whole number per image)")
    return data.reshape(-1, *CIFAR_SHAPE), np.asarray(labels, dtype=np.int64)


def _cifar_classes(path: Path, layout: CifarLayout) -> list[str]:
    names = read_pickle(path).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataError(f"{path} is not a valid CIFAR meta file (no list of {layout.num_classes} {layout.names_key})")
    return [_text(n) for n in names]


def _check_cifar_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) == 0:
        raise DataError(f"{path} holds no samples")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}; the file is corrupt")


def read_pickle(path: Path) -> dict:
    """A CIFAR pickle (a dict) read with ``SafeUnpickler``; its keys as text. One-line DataError if it is not one."""
    try:
        with open(path, "rb") as f:
            # latin1: the batches were pickled by Python 2, whose byte strings (the pixel data too) come back as text
            content = SafeUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror or type(error).__name__})") from None
    except RefusedGlobal as refused:
        raise DataError(f"{path} is not a CIFAR batch: it asks to load {refused}, which is refused") from None
    except Exception as error:  # pickle signals damage in many ways
        raise DataError(f"{path} is not a valid CIFAR pickle (corrupt or truncated: {type(error).__name__})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a valid CIFAR pickle (it holds a {type(content).__name__}, not a dict)")
    return {_text(k): v for k, v in content.items()}


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global the safe unpickler does not admit; the message is ``module.name``."""


def _numpy_reconstruct():
    try:  # numpy 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _plain_array(subtype, shape, typecode):
    """numpy's array reconstructor, for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise RefusedGlobal(f"an array of type {getattr(subtype, '__name__', subtype)!r}")
    return _numpy_reconstruct()(subtype, shape, typecode)


def _plain_dtype(*args):
    """``numpy.dtype``, refusing object dtypes (arrays of arbitrary Python objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise RefusedGlobal("an object array")
    return dtype


class SafeUnpickler(pickle.Unpickler):
    """Loads only plain containers, strings, numbers and numpy arrays of plain dtypes.

    A numpy array pickles as a call of ``_reconstruct(ndarray, shape, typecode)``, a dtype
    as a call of ``numpy.dtype``, then their state (shape, dtype, raw bytes); those three
    globals, under numpy 1's module name (which the CIFAR files use) and numpy 2's, are all
    it admits. Any other global, such as ``os.system``, is refused before it is looked up.
    """

    _ADMITTED = {
        ("numpy.core.multiarray", "_reconstruct"): _plain_array,
        ("numpy._core.multiarray", "_reconstruct"): _plain_array,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ADMITTED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def loads_safely(data: bytes):
    """``pickle.loads`` through ``SafeUnpickler`` (for tests and in-memory batches)."""
    return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
