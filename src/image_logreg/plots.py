"""Figures: training curves and labelled sample grids, written as PNG files."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib import colormaps  # noqa: F401  (the colour maps the figures use, for report and sweep)
from matplotlib.figure import Figure

from .files import atomic_path

# Figures are built as plain Figure objects, not through pyplot: they belong to no backend and
# no global list, so drawing one neither changes a notebook's backend nor keeps memory alive.


def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, layout=None, **kwargs):
    """As ``pyplot.subplots``, for a figure that is only ever saved to a file."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


WEIGHT_CMAP = "RdBu_r"  # diverging: red for positive weights, blue for negative, white at zero


def weight_templates(model):
    """Each class's weights shaped as an image, and one symmetric colour limit for them all.

    One scale lets the classes compare directly. A few rarely lit border pixels get extreme
    weights that would wash every template out, so the top 0.5% of magnitudes saturate.
    """
    weights = model.linear.weight.detach().cpu().float().reshape(model.num_classes, *model.input_shape)
    magnitudes = weights.abs().flatten()
    limit = magnitudes.quantile(0.995).item() or magnitudes.max().item() or 1.0
    return weights, limit


def template_rgb(weights, limit: float):
    """Colour templates (K x 3 x H x W weights) as K x H x W x 3 RGB images in [0, 1].

    Each channel shows its own weights on the shared symmetric scale, ``0.5 + w / (2 * limit)``
    clipped to [0, 1]: mid-gray is a weight of zero, a brighter red where red light is evidence
    for the class, darker where it is evidence against, and so on for green and blue. A
    diverging colour map cannot show three signed channels at once; this keeps one scale
    for every class and channel, as the gray templates have.
    """
    import numpy as np

    values = np.asarray(weights, dtype=np.float32)
    return np.clip(0.5 + values / (2 * limit), 0.0, 1.0).transpose(0, 2, 3, 1)


MARKED_EPOCHS = 40  # past this many epochs, markers would merge into a band: lines alone


def plot_curves(history: list[dict], path: str | os.PathLike, title: str = "", kept_epoch: int | None = None) -> Path:
    """Accuracy and loss per epoch, training and validation (when there was one) side by side.

    A long run's curves are plain lines, its loss on a log scale when it spans more than a factor
    of 20 (a small set's training loss falls by orders of magnitude while the validation loss
    turns back up); ``kept_epoch``, when an earlier epoch's weights were kept, is marked.
    """
    epochs = [h["epoch"] for h in history]
    validated = all("val_loss" in h for h in history)
    marked = len(epochs) <= MARKED_EPOCHS
    fig, (ax_acc, ax_loss) = subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((ax_acc, "accuracy", "Accuracy"), (ax_loss, "loss", "Cross-entropy loss")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-" if marked else "-", label="training")
        if validated:
            ax.plot(epochs, [h[f"val_{metric}"] for h in history], "s-" if marked else "-", label="validation")
        if kept_epoch and kept_epoch != epochs[-1]:
            ax.axvline(kept_epoch, color="gray", linestyle="--", linewidth=1, label=f"kept (epoch {kept_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs. epochs")
        ax.grid(alpha=0.3)
        ax.legend()
    losses = [h[k] for h in history for k in ("train_loss", "val_loss") if k in h]
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        ax_loss.set_yscale("log")
    if len(epochs) < 15:
        for ax in (ax_acc, ax_loss):
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_grid(images, captions: list[str], path: str | os.PathLike, title: str = "", colors: list[str] | None = None, cols: int = 8) -> Path:
    """Captioned uint8 images (H x W gray, or 3 x H x W colour) tiled on one axes, each row as tall
    as its longest caption needs.

    One axes for all images keeps multi-line captions clear of the row above and draws a
    large grid several times faster than one axes per image.
    """
    colors = colors or ["black"] * len(images)
    h, w = images[0].shape[-2:]  # H x W gray, or 3 x H x W colour
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    lines = max(c.count("\n") + 1 for c in captions)
    cell_in = 1.6  # inches per column; the image fills 90% of it
    unit = 0.9 * cell_in / w  # inches per pixel
    gap_x, gap_y = 0.1 * cell_in / unit, (0.16 * lines + 0.1) / unit  # in pixels: room for the captions
    width, height = cols * (w + gap_x), rows * (h + gap_y)
    fig = Figure(figsize=(width * unit, height * unit))
    ax = fig.add_axes((0, 0, 1, 1))
    for k, (image, caption, color) in enumerate(zip(images, captions, colors)):
        x0, y0 = (k % cols) * (w + gap_x) + gap_x / 2, (k // cols) * (h + gap_y) + gap_y
        # raw uint8, as stored: what a person would see, whatever the model's preprocessing
        if image.ndim == 3:  # colour, channels first as torch keeps them; imshow wants H x W x 3
            ax.imshow(image.transpose(1, 2, 0), extent=(x0, x0 + w, y0 + h, y0), interpolation="nearest")
        else:
            ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(x0, x0 + w, y0 + h, y0), interpolation="nearest")
        ax.text(x0 + w / 2, y0 - 0.05 / unit, caption, ha="center", va="bottom", fontsize=8, color=color)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    if title:
        fig.suptitle(title, y=1.0, va="bottom")  # just above the top row's caption band
    return save_figure(fig, path)
