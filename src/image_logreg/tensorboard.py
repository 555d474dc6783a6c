"""Optional TensorBoard logging for a training run (``pip install 'image-logreg[tensorboard]'``).

Per-epoch scalars (``loss/train``, ``loss/val``, ``accuracy/train``, ``accuracy/val``, ``lr``,
``seconds``) go out as each epoch ends; when training is over, each class's weight template is
added as an image, red for positive and blue for negative weights, white at zero, on one scale
shared by all classes (the 99.5th percentile of the weights' magnitude; the rare larger ones clip).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from .errors import UsageError

INSTALL_HINT = "pip install 'image-logreg[tensorboard]'"
SCALARS = {
    "loss/train": "train_loss",
    "loss/val": "val_loss",
    "accuracy/train": "train_accuracy",
    "accuracy/val": "val_accuracy",
    "lr": "lr",
    "seconds": "seconds",
}
UPSCALE = 4  # 28x28 templates are tiny in TensorBoard's image panel


def require() -> None:
    """Fail up front, in one line, when the ``tensorboard`` package is missing."""
    try:
        found = importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}")


def template_images(model) -> np.ndarray:
    """``num_classes x H x W x 3`` float RGB images of the weights, diverging colours centred at 0
    (a colour model's templates as RGB, mid-gray at 0: ``plots.template_rgb``)."""
    from matplotlib import colormaps

    from .plots import WEIGHT_CMAP, template_rgb, weight_templates

    weights, limit = weight_templates(model)
    if weights.dim() == 4:
        rgb = template_rgb(weights.numpy(), limit)
    else:
        rgb = colormaps[WEIGHT_CMAP](np.clip(0.5 + 0.5 * weights.numpy() / limit, 0, 1))[..., :3]  # [-limit, limit] -> [0, 1]
    return np.repeat(np.repeat(rgb, UPSCALE, axis=1), UPSCALE, axis=2).astype(np.float32)


def tag_for(index: int, name: str) -> str:
    return f"weights/{index}_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}"


class TensorBoardLogger:
    """``on_epoch(record)`` after each epoch, then ``finish(model, classes)`` (or ``close()``)."""

    def __init__(self, logdir: str | os.PathLike):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def on_epoch(self, record: dict) -> None:
        for tag, key in SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], global_step=record["epoch"])
        self.writer.flush()

    def finish(self, model, classes: list[str], step: int | None = None) -> None:
        images = template_images(model)
        for i, (image, name) in enumerate(zip(images, classes)):
            self.writer.add_image(tag_for(i, name), image, global_step=step, dataformats="HWC")
        self.close()

    def close(self) -> None:
        self.writer.close()
