"""Every dataset the tool knows, as one table of plain data: a new torchvision-style set is one entry here
and, if its files are in a new format, one loader module beside this one.

Nothing here imports torch, torchvision or numpy: the command line builds ``--dataset``'s choices
and ``--help`` from this table alone.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import UsageError


@dataclass(frozen=True)
class Dataset:
    """One dataset: where its files are, which module reads them, its classes, and how a user's file meets it."""

    name: str  # as --dataset spells it
    # the module of this package whose ``load(dataset, data_dir, split, download, **options)`` reads it
    loader: str
    # class names in label order; empty: read from the files (CIFAR's meta file, a folder's subfolders)
    classes: tuple[str, ...] = ()
    # torchvision's dataset class, which downloads the files when they are missing
    torchvision: str = ""
    # the loader's own description of the files (names per split, label offset, ...), as plain data
    files: dict = field(default_factory=dict)
    # True: centred gray glyphs on a dark ground, made as MNIST was, so a user's image file is
    # brought into that form (``preprocess.prepare_image``). False: photographs or anything at
    # all, so a file is decoded as the dataset's own files were (``decode``).
    digit_style: bool = False
    # how a user's file of another size and colour is matched to the images (CIFAR: colour, crop)
    decode: dict = field(default_factory=dict)

    @property
    def user_images(self) -> bool:
        """A folder or CSV of the user's own images: decoded at the size and colour the image options
        say, a test split held out from it, its classes named by its files."""
        return self.loader == "folder"


def _idx(prefix_train: str, prefix_test: str, **more) -> dict:
    """An IDX dataset's files: ``<prefix>-images-idx3-ubyte`` and ``<prefix>-labels-idx1-ubyte`` per split."""
    return MappingProxyType({"train": prefix_train, "test": prefix_test, **more})


# The class names torchvision gives each dataset, in label order (a test keeps them in step).
MNIST_CLASSES = tuple(f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split()))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
# EMNIST's merged splits fold the letters whose upper and lower case look alike into one class.
_EMNIST_MERGED = set("cijklmopsuvwxyz")
EMNIST_CLASSES = {
    # torchvision lists "N/A" first: the letters are labelled 1..26. They become 0..25 here.
    "letters": tuple(string.ascii_lowercase),
    "balanced": tuple(sorted(set(string.digits + string.ascii_letters) - _EMNIST_MERGED)),
    "digits": tuple(string.digits),
}
_EMNIST_LABEL_OFFSET = {"letters": 1, "balanced": 0, "digits": 0}
# CIFAR's 32x32 photographs are object-centred crops: a user's file of another size is scaled to
# cover the square and cut to it.
_CIFAR_DECODE = MappingProxyType({"resize": "crop", "color": "rgb"})


def _emnist(split: str) -> Dataset:
    return Dataset(
        f"emnist-{split}", "idx", EMNIST_CLASSES[split], "EMNIST",
        # stored column by column: the loader stands each image upright
        _idx(f"emnist-{split}-train", f"emnist-{split}-test", label_offset=_EMNIST_LABEL_OFFSET[split], transposed=True,
             download={"split": split}),
        digit_style=True,
    )


DATASETS = MappingProxyType({d.name: d for d in (
    Dataset("mnist", "idx", MNIST_CLASSES, "MNIST", _idx("train", "t10k"), digit_style=True),
    Dataset("fashion-mnist", "idx", FASHION_CLASSES, "FashionMNIST", _idx("train", "t10k"), digit_style=True),
    Dataset("folder", "folder"),  # data_dir: a folder in ImageFolder layout
    Dataset("csv", "folder"),  # data_dir: a CSV of image paths and labels
    Dataset("kmnist", "idx", KMNIST_CLASSES, "KMNIST", _idx("train", "t10k"), digit_style=True),
    *(_emnist(split) for split in EMNIST_CLASSES),
    Dataset("cifar10", "cifar", (), "CIFAR10", MappingProxyType({
        "folder": "cifar-10-batches-py", "train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",),
        "meta": "batches.meta", "names_key": "label_names", "labels_key": "labels", "num_classes": 10,
    }), decode=_CIFAR_DECODE),
    Dataset("cifar100", "cifar", (), "CIFAR100", MappingProxyType({
        "folder": "cifar-100-python", "train": ("train",), "test": ("test",),
        "meta": "meta", "names_key": "fine_label_names", "labels_key": "fine_labels", "num_classes": 100,
    }), decode=_CIFAR_DECODE),
)})
NAMES = tuple(DATASETS)


def dataset(name: str) -> Dataset:
    """The entry for ``name``; a one-line error naming the choices if there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(NAMES)}") from None
