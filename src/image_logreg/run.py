"""A training run from start to finish, and the run directory that records it.

A run directory holds everything needed to understand and repeat a run:
``config.json`` (every setting), ``split.json`` (the validation indices), ``history.json``
and ``history.csv`` (per-epoch metrics), ``model.safetensors`` (weights + metadata) and
``curves.png``.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .checkpoint import CHECKPOINT_NAME, save_model
from .data import ImageSet, check_val_fraction, load_split, prepare_inputs, preprocessing_for, split_indices, subset_indices
from .errors import UsageError
from .files import default_run_dir, read_json, staged_dir, write_csv, write_json
from .metrics import evaluate
from .model import LogisticRegression
from .settings import DATA_DEFAULTS, default_data_dir
from .train import TrainConfig, fit, resolve_device

FINAL_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")  # a run's last epoch, in summaries


def default_config(**overrides) -> dict:
    """The full, flat run configuration: data settings plus ``TrainConfig``'s fields."""
    config = dict(DATA_DEFAULTS, **TrainConfig().to_dict())
    unknown = set(overrides) - set(config)
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    config.update(overrides)
    return config


def check_data_config(config: dict) -> None:
    """Refuse a validation fraction or training subset no dataset could satisfy, before any work."""
    check_val_fraction(config["val_fraction"])
    subset = config.get("train_subset")
    if subset is not None and subset < 1:  # 0 must not quietly mean "all"
        raise UsageError(f"--train-subset must be at least 1, got {subset}")


def split_for(config: dict, n: int) -> dict:
    """The seeded train/validation split (and optional training subset) as plain lists."""
    train_idx, val_idx = split_indices(n, config["val_fraction"], config["seed"])
    if config.get("train_subset") is not None:
        train_idx = subset_indices(train_idx, int(config["train_subset"]), config["seed"])
    return {
        "n": n,
        "val_fraction": config["val_fraction"],
        "seed": config["seed"],
        "train_subset": config.get("train_subset"),
        "train_indices": train_idx.tolist(),
        "val_indices": val_idx.tolist(),
    }


def train_run(
    config: dict, out=None, *, overwrite: bool = False, progress: bool = False, log=None, tensorboard=None
) -> dict:
    """Load data, split, fit, and write a complete run directory. Returns a summary dict.

    ``tensorboard``: ``True`` logs TensorBoard events to the run's ``tensorboard/`` folder, a path
    logs them to ``<path>/<run name>``; ``None``/``False`` (the default) logs nothing.
    """
    config = default_config(**config)
    cfg = TrainConfig.from_dict(config).check()
    check_data_config(config)
    config.update(cfg.to_dict())  # record resolved defaults such as the optimizer's lr
    # absolute, so that evaluate, predict and report find the data from any folder
    config["data_dir"] = os.path.abspath(config["data_dir"])
    device = resolve_device(config["device"])
    out = Path(out) if out else default_run_dir("runs", config["dataset"])
    log = log or (lambda msg: None)
    if tensorboard:
        from .tensorboard import TensorBoardLogger, require

        require()  # a missing package fails before any work

    with staged_dir(out, overwrite) as stage:  # refuses an existing --out before any work
        data = load_split(config["dataset"], config["data_dir"], "train", download=config["download"])
        split = split_for(config, len(data))
        preprocessing = preprocessing_for(config["deskew"])
        x = prepare_inputs(data.images, preprocessing, device)
        y = data.labels.to(device)
        train_idx = torch.tensor(split["train_indices"], dtype=torch.long, device=device)
        val_idx = torch.tensor(split["val_indices"], dtype=torch.long, device=device)  # may be empty: --val-fraction 0

        torch.manual_seed(cfg.seed)
        model = LogisticRegression(data.input_shape, len(data.classes)).to(device)
        validating = f"validating on {len(val_idx)}" if len(val_idx) else "no validation set"
        log(f"training on {len(train_idx)} {config['dataset']} images, {validating} ({cfg.describe()}, {cfg.epochs} epochs, {device})")

        board = None
        if tensorboard:  # inside the staging dir by default, so the events move with the run
            board = TensorBoardLogger(stage / "tensorboard" if tensorboard is True else Path(tensorboard) / out.name)

        def report(h):
            val = f"val loss {h['val_loss']:.4f} acc {h['val_accuracy']:.4f}  " if "val_loss" in h else ""
            log(f"epoch {h['epoch']:>3}/{cfg.epochs}  train loss {h['train_loss']:.4f} acc {h['train_accuracy']:.4f}  {val}{h['seconds']:.2f}s")
            if board:
                board.on_epoch(h)

        start = time.perf_counter()
        try:
            history = fit(model, x[train_idx], y[train_idx], x[val_idx], y[val_idx], cfg, progress=progress, on_epoch=report)
        except BaseException:
            if board:
                board.close()
            raise
        seconds = time.perf_counter() - start

        final = history[-1]
        record = dict(config, device_used=str(device), **_environment())
        write_json(stage / "config.json", record)
        write_json(stage / "split.json", split)
        write_json(stage / "history.json", history)
        write_csv(stage / "history.csv", history)
        metadata = {
            "dataset": config["dataset"],
            "classes": data.classes,
            "preprocessing": preprocessing,
            "config": {k: config[k] for k in config if k != "data_dir"},
            "metrics": {k: final[k] for k in FINAL_METRICS if k in final},
            "epochs": len(history),
            "created": record["created"],
        }
        save_model(stage / CHECKPOINT_NAME, model, metadata)
        from .plots import plot_curves  # matplotlib: only where a figure is drawn

        plot_curves(history, stage / "curves.png", title=f"{config['dataset']} — logistic regression")
        if board:
            board.finish(model, data.classes, step=len(history))  # closes the event files before the rename

    summary = {
        "run_dir": str(out),
        "epochs": len(history),
        "seconds": seconds,
        **{k: final[k] for k in FINAL_METRICS if k in final},  # no val_* without a validation set
        "history": history,
    }
    if "converged" in final:  # L-BFGS says whether it reached the optimum
        summary["lbfgs"] = {k: final[k] for k in ("converged", "grad_norm", "iterations")}
        state = "converged" if final["converged"] else "stopped before converging"
        log(f"L-BFGS {state}: largest gradient entry {final['grad_norm']:.2e} after {final['iterations']} iterations")
    return summary


def _environment() -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image_logreg_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "host": platform.node(),
    }


def data_dir_for(checkpoint: Path, data_dir=None) -> str:
    """The data folder for a checkpoint: ``data_dir`` if given, else ``$IMAGE_LOGREG_DATA`` if
    set, else where the checkpoint's run found its data, else ``./data``.
    """
    data_dir = data_dir or os.environ.get("IMAGE_LOGREG_DATA")
    config_file = Path(checkpoint).parent / "config.json"
    if not data_dir and config_file.is_file():
        data_dir = read_json(config_file).get("data_dir")
    return data_dir or default_data_dir()


def evaluate_model(model, meta: dict, data: ImageSet, device="cpu") -> dict:
    """``metrics.evaluate`` on ``data``, fed through the model's own recorded preprocessing."""
    x = prepare_inputs(data.images, meta.get("preprocessing"), device)
    return evaluate(model.to(device), x, data.labels.to(device), data.classes)


def eval_data(meta: dict, split: str, data_dir, checkpoint: Path, download: bool = True) -> ImageSet:
    """The test set, or the run's own validation set (read back from its ``split.json``)."""
    if split == "test":
        return load_split(meta["dataset"], data_dir, "test", download=download)
    if split != "val":
        raise UsageError(f"unknown split {split!r}; choose from test, val")
    split_file = checkpoint.parent / "split.json"
    if not split_file.is_file():
        raise UsageError(f"--split val needs the run's split.json beside {checkpoint.name}; none in {checkpoint.parent}")
    indices = torch.tensor(read_json(split_file)["val_indices"], dtype=torch.long)
    if not len(indices):
        raise UsageError(f"{checkpoint.parent} has no validation split: it was trained with --val-fraction 0; use --split test")
    data = load_split(meta["dataset"], data_dir, "train", download=download)
    if len(indices) and int(indices.max()) >= len(data):
        raise UsageError(f"{split_file} does not match the {meta['dataset']} training set in {data_dir}")
    return ImageSet(data.images[indices], data.labels[indices], data.classes, data.dataset, "val")

