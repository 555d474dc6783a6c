"""Figures: training curves and labelled sample grids, written as PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_path  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_curves(history: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy and loss per epoch, training and validation side by side."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((ax_acc, "accuracy", "Accuracy"), (ax_loss, "loss", "Cross-entropy loss")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="training")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs. epochs")
        ax.grid(alpha=0.3)
        ax.legend()
    if len(epochs) < 15:
        for ax in (ax_acc, ax_loss):
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_grid(images, titles: list[str], path: str | os.PathLike, title: str = "", colors: list[str] | None = None) -> Path:
    """A grid of grayscale images, each with a caption."""
    n = len(images)
    cols = min(n, 8) or 1
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.7 * rows + (0.4 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=255 if images[i].max() > 1 else 1)
            ax.set_title(titles[i], fontsize=8, color=(colors[i] if colors else "black"))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
