"""A training run from start to finish, and the run directory that records it.

A run directory holds everything needed to understand and repeat a run:
``config.json`` (every setting), ``split.json`` (the validation indices), ``history.json``
and ``history.csv`` (per-epoch metrics), ``model.safetensors`` (weights + metadata) and
``curves.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .checkpoint import CHECKPOINT_NAME, save_model
from .console import quiet, say
from .data import prepare_inputs, preprocessing_for
from .datasets import DATASETS, dataset, load_split
from .datasets.base import ImageSet, split_indices, subset_indices
from .distributed import Group, session
from .errors import CheckpointError, DataError, UsageError
from .files import default_run_dir, read_json, staged_dir, write_csv, write_json
from .confidence import calibrate
from .curves import drawing
from .metrics import confusion_matrix, expected_calibration_error, logits_of, per_class_scores, scores_of_logits
from .model import LogisticRegression
from .settings import RunConfig, default_data_dir
from .stream import StreamedImages, float_bytes, human_bytes, parse_memory
from .train import fit, resolve_device

FINAL_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")  # a run's last epoch, in summaries
SOURCE_FILE = "source.json"  # folder and CSV runs: the decode settings and each split's files
SKIPPED_FILE = "skipped.json"  # folder and CSV runs with unusable files: each one and why
# Settings that may differ between the ranks of one run: where each finds its data and keeps its cache.
LOCAL_SETTINGS = ("data_dir", "cache_dir", "no_cache", "download", "max_memory")


def resolve(config: RunConfig) -> RunConfig:
    """``config`` as a run records it: the optimizer's own learning rate where none is given, absolute
    folders (so that evaluate, predict and report find the data from any folder), the image size as
    [H, W] whatever form it was given in, and --max-memory in bytes (None: half this machine's memory)."""
    from .datasets.decode import parse_image_size

    size = parse_image_size(config.image_size)
    return replace(
        config.resolved(),
        data_dir=os.path.abspath(config.data_dir),
        cache_dir=os.path.abspath(config.cache_dir) if config.cache_dir else config.cache_dir,
        image_size=list(size) if size else None,
        max_memory=parse_memory(config.max_memory),
    )


def load_training_data(config: RunConfig, progress: bool = False, log=None) -> tuple[ImageSet, ImageSet | None]:
    """The training split, and for a folder or CSV the test split from the same decode (else None)."""
    name, options = config.dataset, config.dataset_options()
    if not dataset(name).user_images:
        return load_split(name, config.data_dir, "train", download=config.download, **options), None
    from .datasets import folder

    # --test-fraction 0: everything trains, nothing is held out (so there is no test split to load)
    splits = ("train",) if config.test_fraction == 0 else ("train", "test")
    sets = folder.load_splits(name, config.data_dir, splits, progress=None if progress else False, log=log, **options)
    return sets["train"], sets.get("test")


def decode_record(name: str, data: ImageSet) -> dict | None:
    """How a user's file is to be decoded for a model of dataset ``name``: None for digit-style datasets
    (normalised as MNIST digits), else the size, resize mode and colour the dataset's images have."""
    entry = dataset(name)
    if entry.digit_style:
        return None
    if entry.user_images:
        return {k: data.source[k] for k in ("image_size", "resize", "color")}
    return dict(entry.decode, image_size=list(data.input_shape[-2:]))


def source_record(train: ImageSet, test: ImageSet | None) -> dict:
    """A folder's or CSV's ``source.json``: where the images came from, how they were decoded, and
    exactly which files each split holds, so evaluate and report later use the same test images."""
    record = {k: v for k, v in train.source.items() if k not in ("files", "skipped")}
    record["skipped"] = len(train.source["skipped"])
    record["train_files"] = train.source["files"]
    record["test_files"] = test.source["files"] if test is not None else []
    return record


def split_for(config: RunConfig, n: int) -> dict:
    """The seeded train/validation split (and optional training subset): settings, and index tensors."""
    train_idx, val_idx = split_indices(n, config.val_fraction, config.seed)
    if config.train_subset is not None:
        train_idx = subset_indices(train_idx, config.train_subset, config.seed)
    return {
        "n": n,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "train_subset": config.train_subset,
        "train_indices": train_idx,  # tensors: write_json writes them a block at a time
        "val_indices": val_idx,
    }


def train_run(
    config: dict | RunConfig, out=None, *, overwrite: bool = False, progress: bool = False, log=None, tensorboard=None,
    init=None,
) -> dict:
    """Load data, split, fit, and write a complete run directory. Returns a summary dict.

    ``config``: a ``RunConfig``, or a dict of its settings by name (those left out, or None, take
    their defaults).
    ``tensorboard``: ``True`` logs TensorBoard events to the run's ``tensorboard/`` folder, a path
    logs them to ``<path>/<run name>``; ``None``/``False`` (the default) logs nothing.
    ``init``: a run directory or checkpoint whose weights training starts from (its classes and
    input shape must be the data's); the run records it as its ``parent``.
    """
    config = resolve(config if isinstance(config, RunConfig) else RunConfig.from_settings(config))
    out = Path(out) if out else default_run_dir("runs", config.dataset)
    # under torchrun, every rank trains; rank 0 alone speaks and writes the run directory
    with session(resolve_device(config.device)) as (group, device):
        if not group.main:
            progress, log, tensorboard = False, quiet, None
        history, seconds, parent = _train_and_save(config, out, overwrite, progress, log, tensorboard, group, device, init)
        group.barrier()  # a rank finishes only once the run is saved: a failure there fails them all
    log = log or quiet

    final = history.kept  # the epoch whose weights were kept: its figures are the model's
    summary = {
        "run_dir": str(out),
        "epochs": len(history),
        **({"kept_epoch": history.kept_epoch} if history.kept_epoch else {}),
        "seconds": seconds,
        **({"parent": parent} if parent else {}),
        **{k: final[k] for k in FINAL_METRICS if k in final},  # no val_* without a validation set
        "history": history,
    }
    if "converged" in final:  # L-BFGS says whether it reached the optimum
        summary["lbfgs"] = {k: final[k] for k in ("converged", "grad_norm", "iterations")}
        state = "converged" if final["converged"] else "stopped before converging"
        log(f"L-BFGS {state}: largest gradient entry {final['grad_norm']:.2e} after {final['iterations']} iterations")
    return summary


def _train_and_save(config: RunConfig, out: Path, overwrite, progress, log, tensorboard, group: Group, device,
                    init=None) -> tuple[list[dict], float, dict | None]:
    """``train_run``'s work, on one rank of ``group``: (history, seconds of training, the parent's record)."""
    log_warnings = log  # skipped files are worth a line even when progress is quiet (None: stderr)
    log = log or quiet
    if tensorboard:
        from .tensorboard import TensorBoardLogger, require

        require()  # a missing package fails before any work

    # refuses an existing --out before any work; the other ranks write nothing
    with (staged_dir(out, overwrite) if group.main else contextlib.nullcontext()) as stage, \
            (drawing() if group.main else contextlib.nullcontext()) as draw_curves:
        parent_run = _load_parent(init, device) if init else None  # a bad --init fails before the data is read
        if parent_run:
            _check_same_inputs(init, parent_run[1], config)
        data, test = load_training_data(config, progress, log_warnings)
        split = split_for(config, len(data))
        # ranks started with other settings or data would average different gradients
        group.check_same("settings or data", json.dumps({
            "settings": {k: v for k, v in config.to_dict().items() if k not in LOCAL_SETTINGS},
            "images": [len(data), list(data.input_shape), data.classes],
        }, sort_keys=True, default=str))
        preprocessing = preprocessing_for(config.deskew, decode_record(config.dataset, data))
        y = data.labels.to(device)
        train_idx = split["train_indices"].to(device)
        val_idx = split["val_indices"].to(device)  # may be empty: --val-fraction 0
        x_train, x_val = training_inputs(data, train_idx, val_idx, preprocessing, device, config, log)

        config = replace(config, epochs=config.epochs_for(len(train_idx)))  # recorded as trained, not as "default"
        torch.manual_seed(config.seed)
        model = LogisticRegression(data.input_shape, len(data.classes)).to(device)
        initial = _in_data_order(init, *parent_run[:2], data) if parent_run else None
        validating = f"validating on {len(val_idx)}" if len(val_idx) else "no validation set"
        ranks = f", {group.world_size} processes" if group.active else ""
        log(f"training on {len(train_idx)} {config.dataset} images, {validating} ({config.describe()}, {config.epochs} epochs, "
            f"{inputs_in_words(config)}, {device}{ranks})")

        board = None
        if tensorboard:  # inside the staging dir by default, so the events move with the run
            board = TensorBoardLogger(stage / "tensorboard" if tensorboard is True else Path(tensorboard) / out.name)

        # a small set's hundreds of short epochs: about 20 lines (L-BFGS may stop early: every line)
        every = 1 if config.optimizer == "lbfgs" else math.ceil(config.epochs / 20)

        def report(h):
            if board:
                board.on_epoch(h)
            if h["epoch"] % every and h["epoch"] != config.epochs:
                return
            val = f"val loss {h['val_loss']:.4f} acc {h['val_accuracy']:.4f}  " if "val_loss" in h else ""
            log(f"epoch {h['epoch']:>3}/{config.epochs}  train loss {h['train_loss']:.4f} acc {h['train_accuracy']:.4f}  {val}{h['seconds']:.2f}s")

        start = time.perf_counter()
        try:
            history = fit(model, x_train, y[train_idx], x_val, y[val_idx], config, progress=progress, on_epoch=report,
                          group=group, init=initial)
        except BaseException:
            if board:
                board.close()
            raise
        seconds = time.perf_counter() - start
        lineage = parent_run[2] if parent_run else None
        if not group.main:
            return history, seconds, lineage
        # drawn beside what follows (by a helper process, where there is one); on disk before the stage is renamed
        draw_curves(history, stage / "curves.png", title=f"{config.dataset} — logistic regression", kept_epoch=history.kept_epoch)
        say_how_it_ended(history, config, log)
        if len(val_idx):
            say_recall_if_imbalanced(model, x_val, y[val_idx], y[train_idx], data.classes, log, config.class_weight == "balanced")
        fitted = calibrate(model, x_train, x_val if len(val_idx) else None, y[val_idx], keep=config.keep,
                           temperature=config.calibrate)
        log(confidence_line(fitted))

        final = history.kept
        record = run_record(
            config, streamed=isinstance(x_train, StreamedImages), device_used=str(device), world_size=group.world_size,
            **_environment(), epochs_trained=len(history), kept_epoch=history.kept_epoch,
            stopped_early=history.stopped_early, temperature=model.temperature, novelty_threshold=model.novelty.threshold,
            **({"parent": lineage} if lineage else {}),
        )
        write_json(stage / "config.json", record)
        write_json(stage / "split.json", split)
        if dataset(config.dataset).user_images:
            write_json(stage / SOURCE_FILE, source_record(data, test))
            if data.source["skipped"]:
                write_json(stage / SKIPPED_FILE, data.source["skipped"])
        write_json(stage / "history.json", history)
        write_csv(stage / "history.csv", history)
        metadata = {
            "dataset": config.dataset,
            "classes": data.classes,
            "preprocessing": preprocessing,
            "config": {k: v for k, v in config.to_dict().items() if k != "data_dir"},
            "metrics": {k: final[k] for k in FINAL_METRICS if k in final},
            "epochs": len(history),
            "kept_epoch": history.kept_epoch,
            "created": record["created"],
            **({"parent": lineage} if lineage else {}),
        }
        save_model(stage / CHECKPOINT_NAME, model, metadata)
        if board:
            board.finish(model, data.classes, step=len(history))  # closes the event files before the rename
    return history, seconds, lineage


def _load_parent(init, device) -> tuple:
    """``--init``'s model, its metadata, and its record as a parent (path and SHA-256 of its weights)."""
    from .checkpoint import load_model, resolve_checkpoint
    from .lineage import weights_record

    checkpoint = resolve_checkpoint(init)
    model, meta = load_model(checkpoint, device=device)
    return model, meta, weights_record(checkpoint)


def _check_same_inputs(init, meta: dict, config: RunConfig) -> None:
    """The parent's weights read pixels as its own preprocessing made them: a deskewed model's
    weights on raw pixels (or the other way round) would start from nowhere near a fit."""
    deskewed = bool((meta.get("preprocessing") or {}).get("deskew"))
    if deskewed != config.deskew:
        raise UsageError(f"--init {init}: its model was trained {'with' if deskewed else 'without'} --deskew; "
                         "train this run the same way")


def _in_data_order(init, parent: LogisticRegression, meta: dict, data: ImageSet) -> LogisticRegression:
    """The parent's weights with its classes in the data's order; a UsageError naming ``--init`` unless
    the data has the parent's classes (by name, index or leading digit) and input shape."""
    from .lineage import class_order

    if tuple(parent.input_shape) != tuple(data.input_shape):
        raise UsageError(f"--init {init}: its model takes {'x'.join(map(str, parent.input_shape))} inputs, "
                         f"but the {data.dataset} images are {'x'.join(map(str, data.input_shape))}")
    try:
        order = class_order(meta["classes"], data.classes)
    except UsageError as exc:
        raise UsageError(f"--init {init}: {exc}") from None
    start = LogisticRegression(parent.input_shape, parent.num_classes).to(parent.device)
    with torch.no_grad():
        start.linear.weight.copy_(parent.linear.weight[order])
        start.linear.bias.copy_(parent.linear.bias[order])
    return start


def inputs_in_words(config: RunConfig) -> str:
    """What is done to the images and their losses before fitting, for the start line."""
    words = ["deskewed" if config.deskew else "pixels / 255"]
    if config.image_size:
        words.append("decoded at " + "x".join(map(str, config.image_size)))
    if config.class_weight == "balanced":
        words.append("balanced class weights")
    return ", ".join(words)


def confidence_line(fitted: dict) -> str:
    """What ``calibrate`` fitted, in words."""
    where = "the validation split" if fitted["held_out"] else "the training images (there is no validation split)"
    temperature = f"temperature {fitted['temperature']:.3f}, " if "temperature" in fitted else "no temperature (uncalibrated), "
    return (f"fitted on {where}: {temperature}a novelty threshold that accepts {fitted['keep']:.0%} of such images "
            "(--keep; --no-calibrate)")


def say_how_it_ended(history, config: RunConfig, log) -> None:
    """A line when training stopped before its planned epochs, and one when it kept an earlier epoch."""
    if history.stopped_early:
        log(f"stopped after epoch {len(history)} of {config.epochs}: the validation loss has not improved "
            f"for {config.patience_for(config.epochs)} epochs (--patience)")
    if history.kept_epoch and history.kept_epoch != len(history):
        kept = history.kept
        log(f"kept the weights of epoch {kept['epoch']}, of least validation loss ({kept['val_loss']:.4f}, "
            f"accuracy {kept['val_accuracy']:.4f}); --no-keep-best keeps the last")


IMBALANCE = 2.0  # the largest class this many times the smallest: per-class recall is worth a line


def say_recall_if_imbalanced(model, x_val, y_val, y_train, classes: list[str], log, balanced: bool, shown: int = 10) -> None:
    """Where the training classes are imbalanced, each class's recall on the validation set (the
    least first): accuracy alone hides a small class the model gives up on."""
    counts = torch.bincount(y_train, minlength=len(classes))
    if counts.min().item() * IMBALANCE > counts.max().item():
        return
    cm = confusion_matrix(y_val, logits_of(model, x_val).argmax(1), len(classes))
    scores = per_class_scores(cm)
    recall = [r for r in scores["recall"] if r is not None]  # None: no validation image of the class
    names = [c for c, r in zip(classes, scores["recall"]) if r is not None]
    worst = sorted(zip(recall, names))[:shown]
    weighing = "weighed equally" if balanced else "--class-weight balanced weighs them equally"
    log(f"imbalanced classes ({counts.min().item()} to {counts.max().item()} training images; {weighing}): "
        f"validation recall " + ", ".join(f"{name} {r:.3f}" for r, name in worst)
        + (f" (the {shown} lowest of {len(recall)})" if len(recall) > shown else ""))


def training_inputs(data: ImageSet, train_idx, val_idx, preprocessing, device, config: RunConfig, log=None):
    """The training and validation inputs: float tensors in memory, or, when their float form
    exceeds ``config.max_memory`` (bytes), ``StreamedImages`` that read each batch from the uint8
    file (and ``log`` says so)."""
    need = float_bytes(len(train_idx) + len(val_idx), data.images)
    if need <= config.max_memory:  # rows gathered as uint8, then made floats: a quarter of the bytes moved
        return tuple(prepare_inputs(data.images[rows.cpu()], preprocessing, device) for rows in (train_idx, val_idx))
    if config.optimizer == "lbfgs":
        raise UsageError(
            f"L-BFGS takes full-batch steps over the training set in memory, and its inputs take {human_bytes(need)}, "
            f"more than --max-memory {human_bytes(config.max_memory)}; raise --max-memory or use --optimizer adam or sgd"
        )
    (log or quiet)(f"streaming batches from disk: {human_bytes(need)} of inputs exceed --max-memory {human_bytes(config.max_memory)}")
    return (StreamedImages(data.images, train_idx, preprocessing, device, data.file),
            StreamedImages(data.images, val_idx, preprocessing, device, data.file))


def run_record(config: RunConfig, **records) -> dict:
    """A run's ``config.json``: its settings, then what the run itself records (the device it used,
    the epochs it trained, its temperature, ...). ``RunConfig.from_dict`` reads the settings back."""
    return dict(config.to_dict(), **records)


def _environment() -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image_logreg_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "host": platform.node(),
    }


def run_config(checkpoint: Path) -> dict:
    """The ``config.json`` of the run a checkpoint belongs to; empty for a checkpoint on its own."""
    config_file = Path(checkpoint).parent / "config.json"
    return read_json(config_file) if config_file.is_file() else {}


def run_settings(checkpoint: Path) -> RunConfig | None:
    """The settings the run a checkpoint belongs to was trained with (None: a checkpoint on its own).
    Its config.json's other keys, the run's records or an older version's settings, are left out."""
    config = run_config(checkpoint)
    if not config:
        return None
    try:
        return RunConfig.from_dict(config)
    except (UsageError, AttributeError) as exc:  # AttributeError: a config.json that holds no object
        raise CheckpointError(f"{Path(checkpoint).parent / 'config.json'}: {exc}") from None


def data_dir_for(checkpoint: Path, data_dir=None) -> str:
    """The data folder for a checkpoint: ``data_dir`` if given, else ``$IMAGE_LOGREG_DATA`` if
    set, else where the checkpoint's run found its data, else ``./data``.

    A folder or CSV run's own path comes before ``$IMAGE_LOGREG_DATA``, which names a folder
    of the classic datasets, not the user's images.
    """
    return data_source_for(checkpoint, data_dir)[0]


RECORDED = "recorded in the run"


def data_source_for(checkpoint: Path, data_dir=None) -> tuple[str, str | None]:
    """``data_dir_for``'s folder, with ``RECORDED`` when it is the one the run recorded (else None)."""
    config = run_config(checkpoint)
    if not data_dir and not (config.get("dataset") in DATASETS and dataset(config["dataset"]).user_images):
        data_dir = os.environ.get("IMAGE_LOGREG_DATA")
    if data_dir:
        return str(data_dir), None
    if config.get("data_dir"):
        return str(config["data_dir"]), RECORDED
    return default_data_dir(), None


def read_eval_data(meta: dict, split: str, checkpoint: Path, data_dir=None, download: bool = True, log=None) -> ImageSet:
    """``eval_data`` from the folder ``data_source_for`` picks, saying so when it is the run's own.

    That folder may be anywhere, on another disk, or gone: it is read but never downloaded
    into, as only a folder named on the command line or in ``$IMAGE_LOGREG_DATA`` is.
    """
    folder, origin = data_source_for(checkpoint, data_dir)
    if origin != RECORDED:
        return eval_data(meta, split, folder, checkpoint, download=download)
    try:
        data = eval_data(meta, split, folder, checkpoint, download=False)
    except DataError as exc:
        raise DataError(f"{exc} ({folder} is the data folder {RECORDED}, where nothing is downloaded; "
                        "--data-dir DIR reads another)") from None
    (log or say)(f"reading {split} data from {Path(folder).resolve()} ({RECORDED}; --data-dir to change)")
    return data


def evaluate_model(model, meta: dict, data: ImageSet, device="cpu") -> dict:
    """``metrics.evaluate`` on ``data``, fed through the model's own recorded preprocessing."""
    x = prepare_inputs(data.images, meta.get("preprocessing"), device)
    model, y = model.to(device), data.labels.to(device)
    logits = logits_of(model, x)
    calibrated = logits / model.temperature  # the probabilities predict and serve give
    result = scores_of_logits(calibrated, y, data.classes)
    result["ece"] = expected_calibration_error(calibrated.softmax(1), y)["ece"]
    result["temperature"] = model.temperature
    scores = model.novelty_scores(x, logits)
    if scores is not None:
        accepted = ~model.rejects(scores).to(y.device)
        result["rejected"] = 1 - accepted.double().mean().item()
        result["accepted_accuracy"] = (calibrated.argmax(1)[accepted] == y[accepted]).double().mean().item() if accepted.any() else None
    return result


def eval_data(meta: dict, split: str, data_dir, checkpoint: Path, download: bool = True) -> ImageSet:
    """The test set, or the run's own validation or training set (read back from its ``split.json``).

    A folder or CSV is loaded with the run's recorded options, and each split holds exactly
    the files it held in training (``source.json``), wherever the files fall now.
    """
    if split not in ("test", "val", "train"):
        raise UsageError(f"unknown split {split!r}; choose from test, val, train")
    checkpoint = Path(checkpoint)
    split_file = checkpoint.parent / "split.json"
    indices = None  # train without split.json: the whole training set
    if split == "val":
        if not split_file.is_file():
            raise UsageError(f"--split val needs the run's split.json beside {checkpoint.name}; none in {checkpoint.parent}")
        indices = torch.tensor(read_json(split_file)["val_indices"], dtype=torch.long)
        if not len(indices):
            raise UsageError(f"{checkpoint.parent} has no validation split: it was trained with --val-fraction 0; use --split test")
    elif split == "train" and split_file.is_file():
        indices = torch.tensor(read_json(split_file)["train_indices"], dtype=torch.long)
    name = meta["dataset"]
    if dataset(name).user_images:
        data = _recorded_split(meta, "test" if split == "test" else "train", data_dir, checkpoint)
    else:
        data = load_split(name, data_dir, "test" if split == "test" else "train", download=download)
    if indices is None:
        return data
    if len(indices) and int(indices.max()) >= len(data):
        raise UsageError(f"{checkpoint.parent / 'split.json'} does not match the {name} training set in {data_dir}")
    return ImageSet(data.images[indices], data.labels[indices], data.classes, data.dataset, split, source=data.source)


def _recorded_split(meta: dict, split: str, data_dir, checkpoint: Path) -> ImageSet:
    """A folder's or CSV's split as the run trained and held it out, decoded as the run decoded it."""
    from .datasets import folder

    config = run_settings(checkpoint)
    if config:
        options = config.dataset_options()
    else:  # a checkpoint on its own: its recorded decode, the default test split with its seed
        decode = (meta.get("preprocessing") or {}).get("image_files") or {}
        options = {k: decode.get(k) for k in ("image_size", "resize", "color")}
        options["seed"] = (meta.get("config") or {}).get("seed")
    record_file = checkpoint.parent / SOURCE_FILE
    record = read_json(record_file) if record_file.is_file() else None
    splits = ("train", "test") if split == "test" or (record and record.get("test_files")) else ("train",)
    # the skipped files were reported when the run was trained, and are listed in its skipped.json
    sets = folder.load_splits(meta["dataset"], data_dir, splits, progress=False, log=quiet, **options)
    data = sets[split]
    if list(data.input_shape) != list(meta["input_shape"]):
        raise DataError(
            f"{data_dir} now decodes to {'x'.join(map(str, data.input_shape))} images, but the model takes "
            f"{'x'.join(map(str, meta['input_shape']))}; its images changed since training"
        )
    if data.classes != meta["classes"]:
        raise DataError(f"{data_dir} now has the classes {', '.join(data.classes[:5])}..., not the model's")
    files = record and record.get(f"{split}_files")
    if not files or data.source["files"] == files:
        return data
    return _gather(sets, files, split, data_dir)


def _gather(sets: dict, files: list[str], split: str, data_dir) -> ImageSet:
    """The recorded ``files`` in their recorded order, from wherever they fall in today's splits
    (files added since training change a held-out split; the run's own stays the same)."""
    names = [f for s in sets.values() for f in s.source["files"]]
    where = {name: i for i, name in enumerate(names)}
    missing = [f for f in files if f not in where]
    if missing:
        raise DataError(
            f"{len(missing)} of the run's {len(files)} {split} images are no longer usable in {data_dir} "
            f"(first: {missing[0]}); evaluate with the files the run was trained on"
        )
    chosen = torch.tensor([where[f] for f in files], dtype=torch.long)
    images = torch.cat([s.images for s in sets.values()])[chosen]
    labels = torch.cat([s.labels for s in sets.values()])[chosen]
    first = next(iter(sets.values()))
    return ImageSet(images, labels, first.classes, first.dataset, split, source=dict(first.source, files=list(files)))
