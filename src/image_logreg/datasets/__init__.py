"""Datasets: every set the tool trains on, each split returned as an ``ImageSet`` of uint8 tensors.

- ``registry``: the table of datasets (name, loader, classes, torchvision class, files, how a
  user's file meets it). Plain data: the command line reads it without importing torch.
- ``base``: ``ImageSet``, file regions, the train/validation split, the one fetch.
- ``idx``: MNIST, Fashion-MNIST, KMNIST and EMNIST (IDX files); ``cifar``: CIFAR-10/100
  (python batches, read by a safe unpickler).
- ``folder``: a folder of the user's images in ImageFolder layout, or a CSV of paths and
  labels, decoded (``decode``, in worker processes: ``workers``) and cached (``cache``).

A loader module has one entry point, ``load(dataset, data_dir, split, download, **options)``.
This module imports nothing heavy: the loaders are imported when a split is loaded.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import UsageError
from .registry import DATASETS, NAMES, Dataset, dataset

__all__ = ["DATASETS", "NAMES", "Dataset", "dataset", "load_split", "check_options",
           "IMAGE_OPTIONS", "LOADING_OPTIONS", "ImageSet", "split_indices", "subset_indices"]

# load_split options that decide the images of a folder or CSV, and those that only decide
# how they are loaded (accepted, and ignored, for every dataset).
IMAGE_OPTIONS = ("image_size", "resize", "color", "test_fraction", "seed", "max_pixels")
LOADING_OPTIONS = ("cache_dir", "no_cache", "progress", "workers", "log")
SPLITS = ("train", "test")


def load_split(name: str, data_dir="data", split: str = "train", download: bool = True, **options):
    """One split of dataset ``name`` from ``data_dir`` as an ``ImageSet``, fetched if missing and allowed.

    For ``folder`` and ``csv``, ``data_dir`` is the folder or the CSV file and ``options`` are
    ``folder.load_split``'s (image size, resize, colour, test fraction, cache); the other
    datasets accept only the loading options (and image options left at None).
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    entry = dataset(name)
    check_options(entry, options)
    loader = import_module(f".{entry.loader}", __name__)
    return loader.load(entry, data_dir, split, download, **options)


def check_options(entry: Dataset | str, options: dict) -> None:
    """Refuse options a dataset has no use for (a misspelt one, or ``--image-size`` for CIFAR)."""
    entry = dataset(entry) if isinstance(entry, str) else entry
    unknown = sorted(set(options) - set(IMAGE_OPTIONS) - set(LOADING_OPTIONS))
    if unknown:
        raise TypeError(f"load_split() got unexpected options: {', '.join(unknown)}")
    if not entry.user_images:
        given = [k for k in IMAGE_OPTIONS if options.get(k) is not None]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(f"{flags} {verb} to --dataset folder and csv only, not {entry.name}")


def __getattr__(name: str):
    # The split's type and the split helpers import torch: only when asked for.
    if name in ("ImageSet", "split_indices", "subset_indices", "FileRegion", "file_region"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
