"""Datasets beyond MNIST and Fashion-MNIST.

- ``folder``: a folder of the user's images in ImageFolder layout (``folder.py``);
- ``csv``: a CSV of image paths and labels (``folder.py``);
- ``kmnist``, ``emnist-letters``, ``emnist-balanced``, ``emnist-digits``, ``cifar10``,
  ``cifar100``: torchvision's classic sets, in its file layouts (``classic.py``).

Each split comes back as ``data.ImageSet``: uint8 images (N x H x W gray, or N x 3 x H x W
colour), int64 labels and the class names. This module imports nothing heavy: worker
processes that decode images import the package too.
"""

from __future__ import annotations

FOLDER_KINDS = ("folder", "csv")
CLASSIC = ("kmnist", "emnist-letters", "emnist-balanced", "emnist-digits", "cifar10", "cifar100")
NAMES = FOLDER_KINDS + CLASSIC

# load_split options that decide the images of a folder or CSV, and those that only decide
# how they are loaded (accepted, and ignored, for every dataset).
IMAGE_OPTIONS = ("image_size", "resize", "color", "test_fraction", "seed", "max_pixels")
LOADING_OPTIONS = ("cache_dir", "no_cache", "progress", "workers", "log")


def provides(name: str) -> bool:
    """Whether ``name`` is a dataset loaded here (rather than by ``data``'s MNIST reader)."""
    return name in NAMES


def load_split(name: str, data_dir, split: str = "train", download: bool = True, **options):
    """One split of dataset ``name`` as a ``data.ImageSet``.

    For ``folder`` and ``csv``, ``data_dir`` is the folder or the CSV file and ``options``
    are ``folder.load_split``'s; other datasets accept only the loading options (and
    image options left at None).
    """
    check_options(name, options)
    if name in FOLDER_KINDS:
        from .folder import load_split as load_folder_split

        return load_folder_split(name, data_dir, split, **options)
    from .classic import load_classic

    return load_classic(name, data_dir, split, download)


def check_options(name: str, options: dict) -> None:
    """Refuse options a dataset has no use for (a misspelt one, or ``--image-size`` for CIFAR)."""
    from ..errors import UsageError

    unknown = sorted(set(options) - set(IMAGE_OPTIONS) - set(LOADING_OPTIONS))
    if unknown:
        raise TypeError(f"load_split() got unexpected options: {', '.join(unknown)}")
    if name not in FOLDER_KINDS:
        given = [k for k in IMAGE_OPTIONS if options.get(k) is not None]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(f"{flags} {verb} to --dataset folder and csv only, not {name}")
