"""Names and defaults as plain data, and one run's configuration: ``RunConfig`` (``TrainConfig``, its training part).

Nothing here imports torch, torchvision, numpy or Pillow (each takes a while to import), so the
command line builds its ``--help`` and answers ``--version`` from this module alone; the modules
that do the work import their names and defaults from here.

What each setting may be is one table, ``CONSTRAINTS``, in the spirit of scikit-learn's
``_parameter_constraints``: every configuration is checked against it once, when it is made, and
refused with one line that names the setting's flag. Each setting's field carries its flag's help,
so a new setting is a field and a row, and ``train`` and ``sweep`` offer its flag.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace

from .datasets import IMAGE_OPTIONS, check_options, dataset
from .datasets.registry import NAMES as DATASET_NAMES
from .errors import UsageError

# The most pixels an image file may have, checked from its header before anything is decoded
# (--max-pixels). A phone photo is 12 Mpixels (4032x3024; 48- and 50-Mpixel sensors save that by
# default too) and a DSLR frame 24 (6000x4000), so a photo of a digit fits, and decoding one takes
# about 100 MB. Pillow's own limit, 89.5 Mpixels, lets a file of a few hundred bytes that claims
# 9000x9000 cost seconds and gigabytes, for a model whose input is 28x28.
MAX_PIXELS = 25_000_000

# ``suggest``: how an image's worth to a person labelling it is measured (``suggest.rank``), and
# how many images it picks unless told.
SUGGEST_BY = ("margin", "egl")
SUGGEST_N = 20

OPTIMIZERS = ("sgd", "adam", "lbfgs")
DEFAULT_LR = {"adam": 0.02, "sgd": 0.1, "lbfgs": 1.0}  # each tuned on MNIST and Fashion-MNIST (see below)
SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")
DEVICES = ("auto", "cpu", "cuda")
# How a folder's or CSV's images are brought to one size and colour (datasets.decode reads them
# from here: it imports numpy and Pillow, which --help must not).
RESIZE_MODES = ("fit", "stretch", "crop")
COLORS = ("gray", "rgb")
# The defaults were tuned on MNIST and Fashion-MNIST: 3 epochs of 48,000 images in batches of 128
# with Adam at 0.02 reach test accuracy 0.927 and 0.848 (5 epochs at 0.01: 0.926 and 0.846), in 60%
# of the steps: 1,125. A small collection takes only a few steps per epoch, so without --epochs it
# trains for as many epochs as it takes to make as many steps (scikit-learn's 1,150 training digits:
# 125 epochs of 9 steps). L-BFGS takes one full-batch step an epoch.
DEFAULT_EPOCHS = 3
LBFGS_EPOCHS = 5
MIN_DEFAULT_STEPS = 1125
# A small set's validation loss is noisy from epoch to epoch: wait this many epochs at least
# before calling a run stalled.
MIN_PATIENCE = 10

# ``learn``: the replayed training images' share of its objective, and the share of each class's
# new images held out to measure it on. The replay share is the least of benchmarks/learn.py's
# whose worst seed costs the parent's test accuracy at most half the 0.3 points allowed: room for
# styles that cost more than its drawings do.
LEARN_REPLAY = 0.95
LEARN_HOLD_OUT = 0.2

# Named sets of settings; flags given on the command line override them.
PRESETS = {
    # the tutorial's run: plain SGD at a constant learning rate of 0.001, batches of 100,
    # 20% held out for validation, and the 5 epochs it trains first
    "tutorial": {
        "optimizer": "sgd", "lr": 0.001, "batch_size": 100, "schedule": "constant", "momentum": 0.0,
        "weight_decay": 0.0, "val_fraction": 0.2, "epochs": 5, "keep_best": False, "patience": 0,
    },
}


def default_data_dir() -> str:
    return os.environ.get("IMAGE_LOGREG_DATA", "data")


def preset(name: str | None, given: dict) -> dict:
    """The settings in ``given`` whose value is not None, over preset ``name``'s (None: no preset)."""
    if name is not None and name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    chosen = {k: v for k, v in given.items() if v is not None}
    return dict(PRESETS[name], **chosen) if name else chosen


# --- what a setting may be ---------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Numbers of ``kind`` (int: whole numbers only; float: any) from ``left`` to ``right`` (None: no
    bound); ``closed`` names the bounds that belong: "left", "right", "both" or "neither". NaN and
    the infinities never belong: no setting means them."""

    kind: type
    left: float | None
    right: float | None
    closed: str = "both"

    def applies(self, value) -> bool:
        """Whether ``value`` is a number, so that what is wrong with it is this interval's to say."""
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def accepts(self, value) -> bool:
        if not self.applies(value) or (self.kind is int and not isinstance(value, int)) or not math.isfinite(value):
            return False
        above = self.left is None or value > self.left or (value == self.left and self.closed in ("left", "both"))
        below = self.right is None or value < self.right or (value == self.right and self.closed in ("right", "both"))
        return above and below

    def words(self, value=None) -> str:
        """What a good value is: ``positive``, ``at least 0 and below 1``, ``a whole number``."""
        if not self.applies(value) or (self.kind is int and not isinstance(value, int)):
            return "a whole number" if self.kind is int else "a number"
        low, high = self.closed in ("left", "both"), self.closed in ("right", "both")
        if self.left == 0 and self.right is None:
            return "zero or positive" if low else "positive"
        bounds = [f"at least {self.left}" if low else f"above {self.left}"] if self.left is not None else []
        bounds += [f"at most {self.right}" if high else f"below {self.right}"] if self.right is not None else []
        return " and ".join(bounds)

    def refusal(self, name: str, value) -> str:
        return f"{flag(name)} must be {self.words(value)}, got {_shown(value)}"


@dataclass(frozen=True)
class Options:
    """One of ``choices``; ``what`` names them in the error (default: the setting's name)."""

    choices: tuple
    what: str | None = None

    def applies(self, value) -> bool:
        return True

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.choices

    def refusal(self, name: str, value) -> str:
        what = self.what or name.replace("_", " ")
        return f"{flag(name)}: unknown {what} {value!r}; choose from {', '.join(self.choices)}"


_TYPE_WORDS = {str: "text", bool: "true or false", os.PathLike: "a path", list: "a list", tuple: "a list"}


def _shown(value) -> str:
    return str(value) if isinstance(value, (int, float)) else repr(value)


# Each setting of a run, in the order config.json and --help list them, and what it may be: an
# Interval, an Options, a type (str, bool, ...), or None (not given: its default). A value is
# good when one entry of its row takes it.
POSITIVE = Interval(float, 0, None, closed="neither")
COUNT = Interval(int, 0, None, closed="neither")  # 1 or more, said "positive"
SHARE = Interval(float, 0, 1, closed="left")  # a share held out: 0 holds out nothing, 1 would leave nothing
CONSTRAINTS = {
    "dataset": [Options(DATASET_NAMES)],
    "data_dir": [str, os.PathLike],
    "download": [bool],
    "val_fraction": [SHARE],
    "train_subset": [Interval(int, 1, None, closed="left"), None],
    "optimizer": [Options(OPTIMIZERS)],
    "lr": [POSITIVE, None],
    "batch_size": [COUNT],
    "epochs": [COUNT, None],
    "momentum": [Interval(float, 0, None, closed="left")],
    "weight_decay": [Interval(float, 0, None, closed="left")],
    "schedule": [Options(SCHEDULES)],
    "lbfgs_iterations": [COUNT],
    "tolerance": [POSITIVE],
    "keep_best": [bool],
    "patience": [Interval(int, 0, None, closed="left"), None],
    "class_weight": [Options(CLASS_WEIGHTS)],
    "calibrate": [bool],
    "keep": [Interval(float, 0, 1, closed="right")],
    "seed": [Interval(int, 0, 2**63 - 1)],  # numpy's generators (a folder's test split) take no negative seed
    "deskew": [bool],
    "device": [Options(DEVICES)],
    "max_memory": [str, Interval(float, 1, None, closed="left"), None],  # text such as 4G: read by stream.parse_memory
    # folder and CSV datasets only (the other datasets refuse them)
    "image_size": [str, Interval(int, 1, 4096), list, tuple, None],  # "HxW", a side, or [H, W]: datasets.decode reads it
    "resize": [Options(RESIZE_MODES, "resize mode"), None],
    "color": [Options(COLORS, "colour"), None],
    "test_fraction": [SHARE, None],
    "max_pixels": [Interval(int, 1, None, closed="left"), None],
    "cache_dir": [str, os.PathLike, None],
    "no_cache": [bool],
}
# The settings whose flag is not the name's: the switches that turn a default off.
FLAGS = {"download": "--no-download", "calibrate": "--no-calibrate"}
# The settings that decide how a folder's or CSV's images are read (their own group in --help).
FOLDER_SETTINGS = ("image_size", "resize", "color", "test_fraction", "cache_dir", "no_cache", "max_pixels")


def flag(name: str) -> str:
    """The command-line flag of setting ``name``: ``--batch-size``, ``--no-download``."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def check_settings(values: dict, constraints: dict = CONSTRAINTS) -> None:
    """Refuse the first value that its row of ``constraints`` does not take: one line that names its flag."""
    for name, value in values.items():
        if not _takes(constraints[name], value):
            raise UsageError(_refusal(name, value, constraints[name]))


def _takes(row: list, value) -> bool:
    return any(value is None if c is None else isinstance(value, c) if isinstance(c, type) else c.accepts(value) for c in row)


def _refusal(name: str, value, row: list) -> str:
    """What is wrong with ``value``, said by the entry of ``row`` for its kind of value (a number's
    interval), else by naming the kinds the row takes."""
    kinds = [c for c in row if c is not None]
    judge = next((c for c in kinds if not isinstance(c, type) and c.applies(value)), None)
    if judge is not None:
        return judge.refusal(name, value)
    wanted = dict.fromkeys(_TYPE_WORDS.get(c, c.__name__) if isinstance(c, type) else c.words() for c in kinds)
    return f"{flag(name)} must be {' or '.join(wanted)}, got {_shown(value)}"


def setting(default=None, help: str = "", *, metavar: str | None = None, factory=None):
    """A field of the configuration: its default, and its flag's help, which names the default
    unless it is None (the help says what then), a switch's, or named already."""
    if default is not None and not isinstance(default, bool) and "(default" not in help:
        help = f"{help} (default: {default})".strip()
    metadata = {"help": help, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# --- the configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how the weights are fitted. Defaults are the tuned ones."""

    optimizer: str = setting("adam", "how the weights are fitted")
    lr: float | None = setting(
        None, "learning rate (default: " + ", ".join(f"{v} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    batch_size: int = setting(128, "images per minibatch step")
    epochs: int | None = setting(
        None, f"passes over the training set (default: {DEFAULT_EPOCHS}, or more on a small training set: enough for "
              f"{MIN_DEFAULT_STEPS:,} steps)")
    momentum: float = setting(0.0, "SGD momentum")
    weight_decay: float = setting(0.0, "L2 penalty")
    schedule: str = setting("cosine", "learning-rate schedule")
    seed: int = setting(0, "seed for the split, initialisation and shuffling")
    lbfgs_iterations: int = setting(20, "L-BFGS iterations per epoch (one full-batch step)", metavar="N")
    tolerance: float = setting(1e-5, "L-BFGS stops once no gradient entry exceeds this")
    keep_best: bool = setting(
        True, "end with the weights of the epoch of least validation loss (default: on, when there is a validation set)")
    patience: int | None = setting(
        None, "with --keep-best, stop once the validation loss has not improved for this many epochs "
              "(default: a tenth of the epochs, at least 10; 0: never stop early)", metavar="EPOCHS")
    class_weight: str = setting(
        "none", "balanced: weigh each class's images by n / (classes x its count), for imbalanced folders")
    # After training, on the validation split: a temperature for the probabilities (calibrate), and
    # a novelty threshold that accepts this share of images like the training ones (keep).
    calibrate: bool = setting(True, "no temperature: the softmax probabilities as they come")
    keep: float = setting(0.99, "the novelty threshold accepts this share of validation images; others are rejected "
                                "as unlike the training images", metavar="SHARE")

    def __post_init__(self):
        check_settings({f.name: getattr(self, f.name) for f in fields(self)})

    def resolved(self):
        """These settings with the optimizer's own learning rate where none is given."""
        return self if self.lr is not None else replace(self, lr=DEFAULT_LR[self.optimizer])

    def check(self):
        """``resolved()``, by the name earlier versions gave it (a configuration is checked when made)."""
        return self.resolved()

    def patience_for(self, epochs: int) -> int:
        """Epochs without a better validation loss after which training stops (0: it never does)."""
        if self.patience is not None:
            return self.patience
        return max(MIN_PATIENCE, math.ceil(epochs / 10))

    def epochs_for(self, n_train: int) -> int:
        """The epochs to train on ``n_train`` images: ``epochs`` if set, else the default rule above."""
        if self.epochs is not None:
            return self.epochs
        if self.optimizer == "lbfgs":  # full batch: an epoch is one L-BFGS step, whatever the size
            return LBFGS_EPOCHS
        steps_per_epoch = math.ceil(n_train / self.batch_size)
        return max(DEFAULT_EPOCHS, math.ceil(MIN_DEFAULT_STEPS / steps_per_epoch))

    @classmethod
    def from_dict(cls, d: dict):
        """The settings recorded in ``d`` (a run's config.json, a checkpoint's ``config``): other keys,
        such as the run's own records or an older version's settings, are left out, and None reads as
        not recorded (the default)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_dict(self) -> dict:
        """The settings, in ``CONSTRAINTS``' order: what config.json records of them."""
        names = {f.name for f in fields(self)}
        return {name: getattr(self, name) for name in CONSTRAINTS if name in names}

    def describe(self) -> str:
        """How the weights will be fitted, in words: ``sgd, constant lr 0.001, batch 100``."""
        lr = self.resolved().lr
        if self.optimizer == "lbfgs":  # full batch, its own line search: no schedule, no batches
            return f"lbfgs, lr {lr}, full batch"
        rate = f"constant lr {lr}" if self.schedule == "constant" else f"lr {lr} with cosine decay"
        return f"{self.optimizer}, {rate}, batch {self.batch_size}"


@dataclass(frozen=True)
class RunConfig(TrainConfig):
    """A whole run's settings: its data, and how its weights are fitted (``TrainConfig``'s)."""

    dataset: str = setting("mnist", "dataset; folder: DIR in ImageFolder layout, csv: a path,label CSV file")
    data_dir: str = setting(
        help="folder holding MNIST/raw/, FashionMNIST/raw/ and the like (default: ./data, or $IMAGE_LOGREG_DATA); "
             "for --dataset folder the image folder, for csv the CSV file", factory=default_data_dir)
    download: bool = setting(True, "never download missing dataset files")
    val_fraction: float = setting(0.2, "fraction held out for validation; 0 trains on the whole training split")
    train_subset: int | None = setting(None, "train on a random N of the training split", metavar="N")
    deskew: bool = setting(False, "straighten slanted digits first (moment-based deskewing)")
    device: str = setting("auto")
    max_memory: str | int | None = setting(
        None, "memory the training inputs may take as floats, e.g. 4G or 800M; a larger set is streamed batch by batch "
              "from its uint8 file (default: half of this machine's memory, or of its container's limit)", metavar="SIZE")
    # folder and CSV datasets only (None: decided by the images, or the default)
    image_size: str | list | None = setting(None, "bring every image to this size (default: the size all images share)",
                                            metavar="HxW")
    resize: str | None = setting(
        None, "fit: keep the aspect ratio, pad with the background; stretch; crop: cover, cut the overflow (default: fit)")
    color: str | None = setting(None, "(default: rgb if any image has colour)")
    test_fraction: float | None = setting(
        None, "share of each class held out as the test split when there are no train/ and test/ (default: 0.2)")
    max_pixels: int | None = setting(None, f"refuse images of more than N pixels, unread (default: {MAX_PIXELS:,})",
                                     metavar="N")
    cache_dir: str | None = setting(None, "where decoded images are cached (default: $XDG_CACHE_HOME/image-logreg)")
    no_cache: bool = setting(False, "decode every file, read and write no cache")

    def __post_init__(self):
        super().__post_init__()
        self._check_with_the_dataset()

    def _check_with_the_dataset(self) -> None:
        """Settings the dataset has no use for (--image-size for MNIST), and --deskew on colour images."""
        entry = dataset(self.dataset)
        check_options(entry, self.dataset_options())
        if self.deskew and entry.decode.get("color") == "rgb":
            raise UsageError(f"--deskew works on grayscale images only; {self.dataset} is colour")
        if self.deskew and self.color == "rgb":
            raise UsageError("--deskew works on grayscale images only; --color rgb makes colour ones (use --color gray)")

    @classmethod
    def from_settings(cls, settings: dict | None = None, preset_name: str | None = None) -> "RunConfig":
        """The configuration ``settings`` give (by field name; None: not given) over preset ``preset_name``'s,
        the defaults filling the rest; a name that is no setting is refused."""
        unknown = set(settings or {}) - set(CONSTRAINTS)
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**preset(preset_name, settings or {}))

    def dataset_options(self) -> dict:
        """The ``load_split`` options these settings give their dataset.

        Image options go to every dataset (``datasets.check_options`` refuses those given for a
        dataset without use for them); the held-out test split's seed only to folders and CSVs.
        """
        options = {k: getattr(self, k) for k in IMAGE_OPTIONS if k != "seed"}
        if dataset(self.dataset).user_images:
            options["seed"] = self.seed
        return dict(options, cache_dir=self.cache_dir, no_cache=self.no_cache)
