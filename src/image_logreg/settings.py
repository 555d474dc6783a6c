"""Names and defaults as plain data: datasets, optimizers, schedules, presets, ``TrainConfig``.

Nothing here imports torch or torchvision (each takes seconds to import), so the command line
builds its ``--help`` and answers ``--version`` from this module alone; the modules that do the
work import their names and defaults from here.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

from .errors import UsageError
from .datasets.registry import NAMES as DATASET_NAMES  # noqa: F401  (the datasets live in one table there)

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

DATA_DEFAULTS = {
    "dataset": "mnist",
    "data_dir": "data",
    "val_fraction": 0.2,
    "train_subset": None,
    "device": "auto",
    "download": True,
    "deskew": False,
    # folder and CSV datasets only (None: decided by the images, or the default)
    "image_size": None,
    "resize": None,
    "color": None,
    "test_fraction": None,
    "max_pixels": None,  # None: MAX_PIXELS
    # how a folder or CSV is loaded: the decoded-image cache
    "cache_dir": None,
    "no_cache": False,
    # bytes the float training inputs may take before batches are streamed from disk (None: half the memory)
    "max_memory": None,
}
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
    return os.environ.get("IMAGE_LOGREG_DATA", DATA_DEFAULTS["data_dir"])


def preset(name: str | None, given: dict) -> dict:
    """The settings in ``given`` whose value is not None, over preset ``name``'s (None: no preset)."""
    if name is not None and name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    chosen = {k: v for k, v in given.items() if v is not None}
    return dict(PRESETS[name], **chosen) if name else chosen


@dataclass
class TrainConfig:
    """Everything that decides how the weights are fitted. Defaults are the tuned ones."""

    optimizer: str = "adam"
    lr: float | None = None  # None: the optimizer's entry in DEFAULT_LR
    batch_size: int = 128
    epochs: int | None = None  # None: DEFAULT_EPOCHS, or more on a small training set (epochs_for)
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    lbfgs_iterations: int = 20  # L-BFGS iterations per epoch (one full-batch step)
    tolerance: float = 1e-5  # L-BFGS stops once no gradient entry exceeds this
    # With a validation set: end with the weights of the epoch of least validation loss, and stop
    # once it has not improved for ``patience`` epochs (None: a tenth of the epochs, at least 10; 0: never).
    keep_best: bool = True
    patience: int | None = None
    class_weight: str = "none"  # "balanced": each class weighs n / (classes x its count) in the loss
    # After training, on the validation split: a temperature for the probabilities (calibrate), and
    # a novelty threshold that accepts this share of images like the training ones (keep).
    calibrate: bool = True
    keep: float = 0.99

    def check(self) -> "TrainConfig":
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        for name in ("lr", "batch_size", "epochs", "lbfgs_iterations", "tolerance"):
            value = getattr(self, name)
            if value is None and name == "epochs":
                continue
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"--{name.replace('_', '-')} must be zero or positive, got {value}")
        if self.patience is not None and not (isinstance(self.patience, int) and self.patience >= 0):
            raise UsageError(f"--patience must be a whole number of epochs, 0 or more, got {self.patience}")
        if not (isinstance(self.keep, (int, float)) and 0 < self.keep <= 1):
            raise UsageError(f"--keep must be a share above 0 and at most 1, got {self.keep}")
        if self.class_weight not in CLASS_WEIGHTS:
            raise UsageError(f"unknown class weight {self.class_weight!r}; choose from {', '.join(CLASS_WEIGHTS)}")
        return self

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
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """How the weights will be fitted, in words: ``sgd, constant lr 0.001, batch 100``."""
        if self.optimizer == "lbfgs":  # full batch, its own line search: no schedule, no batches
            return f"lbfgs, lr {self.lr}, full batch"
        rate = f"constant lr {self.lr}" if self.schedule == "constant" else f"lr {self.lr} with cosine decay"
        return f"{self.optimizer}, {rate}, batch {self.batch_size}"
