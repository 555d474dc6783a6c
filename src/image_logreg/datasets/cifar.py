"""CIFAR-10 and CIFAR-100: torchvision's python batches, read without letting a pickle run code.

The batches are pickles. A pickle can run any code while it loads, so they are read with an
unpickler that admits only what the batches hold (dicts, lists, strings, numbers and uint8
numpy arrays) and refuses every other global. torchvision is used only to download the archive.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import fetch, image_set
from .registry import Dataset

# CIFAR images: 3 x 32 x 32, each row of a batch's data the red plane, then green, then blue
CIFAR_SHAPE = (3, 32, 32)


def load(dataset: Dataset, data_dir, split: str, download: bool = True, **_loading):
    """One split of a CIFAR set as an ``ImageSet`` (N x 3 x 32 x 32)."""
    images, labels, classes = _load_cifar(dataset, Path(data_dir), split, download)
    return image_set(images, labels, classes, dataset.name, split)




def _load_cifar(dataset: Dataset, data_dir: Path, split: str, download: bool):
    layout = dataset.files
    folder = data_dir / layout["folder"]
    batches = layout[split]
    missing = [f for f in (*batches, layout["meta"]) if not (folder / f).is_file()]
    if missing:
        hint = f"pass --data-dir DIR where DIR/{layout['folder']}/ holds the python batches (cifar-*-python.tar.gz, extracted)"
        fetch(dataset.name, split, f"{', '.join(missing)} not found in {folder}", hint, download,
              lambda: _download_cifar(dataset, data_dir), data_dir)
    classes = _cifar_classes(folder / layout["meta"], layout)
    images, labels = [], []
    for batch in batches:
        batch_images, batch_labels = _cifar_batch(folder / batch, layout)
        images.append(batch_images)
        labels.append(batch_labels)
    labels = np.concatenate(labels)
    _check_cifar_labels(labels, len(classes), folder / batches[0])
    return np.concatenate(images), labels, classes


def _download_cifar(dataset: Dataset, data_dir: Path) -> None:
    """Fetch and unpack the archive with torchvision's URL and checksum, without letting it load the pickles."""
    import torchvision.datasets
    from torchvision.datasets.utils import download_and_extract_archive

    source = getattr(torchvision.datasets, dataset.torchvision)
    download_and_extract_archive(source.url, str(data_dir), filename=source.filename, md5=source.tgz_md5)


def _cifar_batch(path: Path, layout: dict) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    data, labels = batch.get("data"), batch.get(layout["labels_key"])
    size = int(np.prod(CIFAR_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        raise DataError(f"{path} is not a valid CIFAR batch (its data is not N x {size} bytes)")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(type(v) is int for v in labels):
        raise DataError(f"{path} is not a valid CIFAR batch ({layout['labels_key']} is not one whole number per image)")
    return data.reshape(-1, *CIFAR_SHAPE), np.asarray(labels, dtype=np.int64)


def _cifar_classes(path: Path, layout: dict) -> list[str]:
    names = read_pickle(path).get(layout["names_key"])
    if not isinstance(names, list) or len(names) != layout["num_classes"]:
        raise DataError(f"{path} is not a valid CIFAR meta file (no list of {layout['num_classes']} {layout['names_key']})")
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
