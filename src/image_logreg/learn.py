"""Learning after training: new labelled images taught to a trained model without forgetting.

``learn_run`` (the ``learn`` command) fine-tunes a run on a folder of newly labelled images
(``DIR/<class>/*.png``) and writes a new, complete run directory that names its parent.
``replay_fit`` is its learning: full-batch L-BFGS from the parent's weights on a mix of the new
images (their labels) and a replay of the parent's training images. The replayed images are
taught the parent's own probabilities, softened, not their labels: at the parent's weights their
gradient is zero, so they hold the model where it was instead of pulling it towards what suits a
few thousand images (``benchmarks/learn.py`` measures the choices against each other).

The cheapest form, a few exact full-batch gradient steps in milliseconds, is
``train.gradient_steps``, behind ``LogisticRegression.partial_fit`` and the server's corrections.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .console import quiet
from .errors import DataError, ImageLogregError, UsageError
from .settings import LEARN_HOLD_OUT, LEARN_REPLAY, RunConfig
from .lineage import class_of_folder, some_names, weights_record
from .train import target_rows

# --- the new images -------------------------------------------------------------------------------

SKIPPED_SHOWN = 10  # skipped files named one by one; past this, one line counts the rest


@dataclass
class LabelledImages:
    """Images read from class folders through the model's own preprocessing for files."""

    images: torch.Tensor  # uint8, N x H x W or N x 3 x H x W
    labels: torch.Tensor  # int64, N: the model's class indices
    files: list[str]
    digests: list[str]  # each file's SHA-256: the same file twice is learnt once
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def read_class_folders(folder, classes: list[str], prepare, log=None) -> LabelledImages:
    """The images of ``folder/<class>/`` (searched recursively), each class folder named as
    ``class_of_folder`` reads it; ``prepare(data, name)`` turns a file's bytes into the model's
    uint8 image. Unusable files are skipped and counted; a folder that names no class is an error."""
    from .preprocess import IMAGE_SUFFIXES, find_image_files

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; learn reads labelled images from DIR/<class>/*.png")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    subfolders = [p for p in entries if p.is_dir()]
    if not subfolders:
        raise DataError(f"{folder} holds no class folders; learn reads labelled images from {folder}/<class>/*.png, "
                        "one folder per class named by the class's name or index")
    found = LabelledImages(torch.empty(0), torch.empty(0, dtype=torch.long), [], [], [])
    found.skipped += [(str(p), "not in a class folder") for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    images, targets = [], []
    for sub, k in _class_folders(subfolders, classes).items():
        for path in find_image_files([sub]):
            try:
                data = path.read_bytes()
                image = prepare(data, str(path))
            except ImageLogregError as exc:
                found.skipped.append((str(path), str(exc).removeprefix(f"{path}: ")))  # named once, by the warning
                continue
            except OSError as exc:
                found.skipped.append((str(path), exc.strerror or type(exc).__name__))
                continue
            images.append(image)
            targets.append(k)
            found.files.append(str(path))
            found.digests.append(hashlib.sha256(data).hexdigest())
    _say_skipped(found.skipped, log)
    if not images:
        raise DataError(f"no usable images in {folder}'s class folders" + (f" ({len(found.skipped)} skipped)" if found.skipped else ""))
    found.images = torch.from_numpy(np.stack(images))
    found.labels = torch.tensor(targets, dtype=torch.long)
    return found


def _class_folders(subfolders: list[Path], classes: list[str]) -> dict[Path, int]:
    """Each folder's class; a UsageError naming the first folder that names none."""
    labels = {}
    for sub in subfolders:
        labels[sub] = class_of_folder(classes, sub.name)
        if labels[sub] is None:
            raise UsageError(f"{sub}: the folder names none of the model's classes ({some_names(classes)}); "
                             "name each folder by its class's name or index")
    return labels


def _say_skipped(skipped: list[tuple[str, str]], log) -> None:
    if not log:
        return
    for path, why in skipped[:SKIPPED_SHOWN]:
        log(f"warning: skipped {path}: {why}")
    if len(skipped) > SKIPPED_SHOWN:
        log(f"warning: skipped {len(skipped) - SKIPPED_SHOWN} more files ({len(skipped)} in all)")


def hold_out(labels: torch.Tensor, share: float, seed: int = 0) -> torch.Tensor:
    """Which images to keep out of learning, to measure it on: a seeded ``share`` of each class,
    rounded down, so a class of fewer than ``1 / share`` images is learnt whole."""
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for k in labels.unique().tolist():
        rows = (labels == k).nonzero().squeeze(1)
        n = math.floor(len(rows) * share + 1e-9)
        held[rows[torch.randperm(len(rows), generator=generator)[:n]]] = True
    return held


# --- learning ---------------------------------------------------------------------------------------

REPLAY_SHARE = LEARN_REPLAY  # the replayed images' share of the objective (--replay)
REPLAY_ROWS = 5_000  # the parent's training images replayed, a seeded sample (10,000 or 20,000 kept no more accuracy)
HOLD_OUT = LEARN_HOLD_OUT  # the share of each class's new images kept out of learning to measure it (--hold-out)
ITERATIONS = 50  # L-BFGS iterations at most (30 lost up to 0.1 point more of the parent's accuracy, 100 kept no more)
ROUND = 10  # iterations per record of the history
# The replayed images are taught the parent's probabilities softened at this temperature (its
# logits / 4 through the softmax, as in distillation): at temperature 1 they are all but one-hot for
# most images, and learning may move a decision boundary at little cost to them; softened, they
# carry the parent's ranking of every class (benchmarks/learn.py: the worst of three sets of new
# drawings cost MNIST 0.13 points of test accuracy at 4, 0.34 at 1).
REPLAY_TEMPERATURE = 4.0
# A slight pull towards the parent's weights (anchor/2 * ||theta - parent||^2): directions no image
# constrains (pixels neither the replay nor the new images light) stay where the parent had them,
# and the problem is strictly convex, so L-BFGS settles instead of wandering along them.
ANCHOR = 1e-3
TOLERANCE = 1e-6  # L-BFGS stops once no gradient entry of the objective exceeds this


def replay_fit(model, x_new: torch.Tensor, y_new: torch.Tensor, x_replay: torch.Tensor, *, replay: float = REPLAY_SHARE,
               iterations: int = ITERATIONS, anchor: float = ANCHOR, temperature: float = REPLAY_TEMPERATURE,
               y_replay: torch.Tensor | None = None, on_round=None) -> list[dict]:
    """Teach ``model`` (in place, from its current weights) the images ``x_new`` with labels
    ``y_new`` while replaying ``x_replay``, taught the model's own probabilities now at
    ``temperature`` (``y_replay``, labels for them, makes it plain replay: the benchmark's comparison).

    The objective is ``replay`` x the replayed images' mean distillation loss (temperature^2 x the
    cross-entropy of softmax(logits / temperature) against the same of the starting logits) +
    (1 - ``replay``) x the new images' mean cross-entropy + ``anchor``/2 x the squared distance
    from the starting weights, minimised by full-batch L-BFGS for at most ``iterations``. Returns
    one record per ``ROUND`` iterations (``objective``, ``grad_norm``, ``iterations``,
    ``seconds``), each also passed to ``on_round`` (not timed).
    """
    from . import optim
    from .train import one_thread

    if not 0 <= replay < 1:
        raise UsageError(f"--replay must be a share from 0 up to (not including) 1, got {replay}")
    if len(x_new) == 0:
        raise UsageError("nothing new to learn")
    weight, bias = model.linear.weight, model.linear.bias
    device = weight.device
    x_replay = x_replay[:0] if replay == 0 else x_replay
    x = torch.cat([x_replay.to(device), x_new.to(device)]).reshape(len(x_replay) + len(x_new), -1).float()
    rows = _Rows(model, x, len(x_replay), y_new.to(device), replay, temperature, y_replay)
    start = [weight.detach().clone(), bias.detach().clone()]
    optimizer = optim.LBFGS([weight, bias], lr=1.0, max_iter=ROUND, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=TOLERANCE, tolerance_change=1e-12)

    @torch.no_grad()
    def closure():
        loss = rows.objective(model, x)
        for p, p0 in zip((weight, bias), start):
            moved = p - p0
            loss = loss + 0.5 * anchor * moved.double().pow(2).sum()
            p.grad.add_(moved, alpha=anchor)
        return loss

    records = []
    for k in range(1, math.ceil(iterations / ROUND) + 1):
        began = time.perf_counter()
        optimizer.param_groups[0]["max_iter"] = min(ROUND, iterations - (k - 1) * ROUND)
        # a few thousand rows: one thread is quicker than sharing each product, and gives the same
        # weights whatever the machine's thread count
        with one_thread(device.type == "cpu"):
            optimizer.step(closure)
            objective = float(closure())
        grad_norm = max(weight.grad.abs().max().item(), bias.grad.abs().max().item())
        records.append({"objective": objective, "grad_norm": grad_norm, "iterations": optimizer.iterations,
                        "seconds": time.perf_counter() - began})
        if on_round is not None:
            on_round(records[-1])
        stalled = len(records) > 1 and records[-2]["objective"] <= objective  # float32's floor
        if grad_norm <= TOLERANCE or stalled:
            break
    weight.grad = bias.grad = None
    return records


class _Rows:
    """Each row's target probabilities, temperature and weight, for ``replay_fit``'s objective: the
    replayed rows the model's own probabilities at ``temperature`` (or one-hot ``y_replay``), the
    new rows one-hot at temperature 1; the weights make the replayed rows ``replay`` of the whole
    and average 1 a row."""

    @torch.no_grad()
    def __init__(self, model, x, n_replay: int, y_new, replay: float, temperature: float, y_replay=None):
        from .metrics import logits_of

        n_new = len(x) - n_replay
        k = model.num_classes
        if not n_replay:
            old = torch.empty(0, k, device=x.device)
        elif y_replay is not None:
            old, temperature = target_rows(y_replay.to(y_new.device), k, None, torch.float32), 1.0
        else:
            old = torch.softmax(logits_of(model, x[:n_replay]).float() / temperature, 1)
        self.targets = torch.cat([old, target_rows(y_new, k, None, torch.float32)])
        t = torch.cat([torch.full((n_replay,), float(temperature)), torch.ones(n_new)]).to(x.device)
        w = torch.cat([torch.full((n_replay,), replay * len(x) / max(n_replay, 1)),
                       torch.full((n_new,), (1 - replay) * len(x) / n_new)]).to(x.device)
        self.inverse_t = (1 / t)[:, None]
        self.loss_scale = (w * t * t)[:, None] / len(x)  # a distilled row's loss counts temperature^2 times
        self.residual_scale = (w * t)[:, None] / len(x)

    def objective(self, model, x) -> torch.Tensor:
        """Set the gradient of the objective (less the anchor) on the weights; return the objective.

        For one row, d/dz [T^2 CE(q, softmax(z / T))] = T (softmax(z / T) - q): the closed form of
        ``train.batch_gradient``, with each row's temperature and weight."""
        weight, bias = model.linear.weight, model.linear.bias
        log_p = torch.addmm(bias, x, weight.t()).mul_(self.inverse_t).log_softmax(1)
        loss = -(log_p * self.targets).mul_(self.loss_scale).sum()
        residual = log_p.exp_().sub_(self.targets).mul_(self.residual_scale)
        weight.grad = residual.t().mm(x)
        bias.grad = residual.sum(0)
        return loss.double()


# --- a run that learnt ------------------------------------------------------------------------------

LEARNT_IMAGES = "learnt.npz"  # the images a run learnt, as the model saw them (with its ancestors')
LEARNT_FILES = "learnt.json"  # where each came from, its SHA-256, its class and whether it was held out


@dataclass
class Learnt:
    """The images a run learnt after training, its ancestors' included, in the model's input form."""

    images: torch.Tensor  # uint8
    labels: torch.Tensor  # int64
    held_out: torch.Tensor  # bool: kept out of learning, to measure it on
    records: list[dict]  # per image: file, sha256, class, held_out

    def __len__(self) -> int:
        return len(self.labels)

    def __add__(self, other: "Learnt") -> "Learnt":
        return Learnt(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]),
                      torch.cat([self.held_out, other.held_out]), self.records + other.records)


def read_learnt(run_dir, input_shape: tuple[int, ...], classes: list[str]) -> Learnt:
    """The images a run made by ``learn`` learnt (none for a run made by ``train``)."""
    run_dir = Path(run_dir)
    if not (run_dir / LEARNT_IMAGES).is_file():
        return Learnt(torch.empty(0, *input_shape, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                      torch.empty(0, dtype=torch.bool), [])
    from .files import read_json

    try:
        with np.load(run_dir / LEARNT_IMAGES, allow_pickle=False) as arrays:
            images, labels, held = arrays["images"], arrays["labels"], arrays["held_out"]
        records = read_json(run_dir / LEARNT_FILES)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{run_dir / LEARNT_IMAGES}: the images this run learnt cannot be read ({exc})") from None
    if (images.dtype != np.uint8 or tuple(images.shape[1:]) != tuple(input_shape) or not len(images) == len(labels) == len(held)
            == len(records) or (len(labels) and not 0 <= labels.min() <= labels.max() < len(classes))):
        raise DataError(f"{run_dir / LEARNT_IMAGES} does not fit the run's model: the images this run learnt are damaged")
    return Learnt(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(held.astype(bool)),
                  list(records))


def write_learnt(stage: Path, learnt: Learnt) -> None:
    from .files import atomic_path, write_json

    with atomic_path(stage / LEARNT_IMAGES) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=learnt.images.numpy(), labels=learnt.labels.numpy(), held_out=learnt.held_out.numpy())
    write_json(stage / LEARNT_FILES, learnt.records)


def learn_run(run, folder, out, *, replay: float = REPLAY_SHARE, held_out: float = HOLD_OUT, seed: int = 0,
              data_dir=None, device="cpu", overwrite: bool = False, download: bool = True, log=None) -> dict:
    """Fine-tune the model of ``run`` on the labelled images of ``folder`` (``<class>/*.png``) with a
    replay of its training images, and write the result to ``out`` as a run directory of its own.

    ``held_out`` of each class's new images are kept out of learning to measure it on. Returns the
    summary ``learn`` prints: accuracy before and after on the parent's test split and on the new
    images, what was read, skipped and learnt, and the seconds the learning took.
    """
    from .checkpoint import load_model, resolve_checkpoint
    from .files import refuse_existing
    from .predict import prepare_file
    from .train import one_thread, resolve_device

    started = time.perf_counter()
    for flag, share in (("--replay", replay), ("--hold-out", held_out)):
        if not 0 <= share < 1:
            raise UsageError(f"{flag} must be a share from 0 up to (not including) 1, got {share}")
    checkpoint = resolve_checkpoint(run)
    out = Path(out)
    _refuse_to_replace_inputs(out, checkpoint, Path(folder))
    refuse_existing(out, overwrite, "--out directory")
    device = resolve_device(str(device))
    model, meta = load_model(checkpoint, device=device)
    earlier = read_learnt(checkpoint.parent, model.input_shape, meta["classes"])
    found = read_class_folders(folder, meta["classes"], lambda data, name: prepare_file(model, meta, data, name=name), log)
    new = _new_only(found, earlier, held_out, seed, meta["classes"])
    counts = _image_counts(found, earlier, new)
    if not len(new):
        raise UsageError(f"nothing new to learn in {folder}: its {counts['already_learnt'] + counts['duplicates']} images "
                         f"were all learnt before, by {run} or the runs it came from")
    data = _parent_data(meta, checkpoint, data_dir, download, log or quiet)
    settings = {"folder": str(Path(folder).resolve()), "replay": replay, "hold_out": held_out, "seed": seed,
                "iterations": ITERATIONS, "anchor": ANCHOR, "temperature": REPLAY_TEMPERATURE}
    # every sum here is small: one thread is about as quick as several, which on a busy machine
    # wait on each other for seconds
    with one_thread(device.type == "cpu"):
        summary = _learn_and_write(model, meta, checkpoint, data, earlier, new, counts, settings, out, overwrite, data_dir)
    summary["seconds"] = time.perf_counter() - started
    return summary


def _learn_and_write(model, meta: dict, checkpoint: Path, data: dict, earlier: Learnt, new: Learnt, counts: dict,
                     settings: dict, out: Path, overwrite: bool, data_dir) -> dict:
    """``learn_run``'s work once everything is read: learn, measure, calibrate, write the run."""
    from .curves import drawing
    from .files import staged_dir

    device, replay = model.device, settings["replay"]
    inputs = lambda images: _inputs(images, meta, device)  # noqa: E731
    x_new, y_new = inputs(new.images[~new.held_out]), new.labels[~new.held_out]
    # what the ancestors learnt is replayed with the training images: taught the parent's own
    # probabilities, it stays learnt without being pushed further with every run of a chain
    sample = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(settings["seed"]))[:REPLAY_ROWS]
    x_old, x_earlier = inputs(data["train"].images[sample]), inputs(earlier.images[~earlier.held_out])
    replayed = {"images": len(x_old), "learnt_before": len(x_earlier)} if replay else {"images": 0, "learnt_before": 0}
    settings["replay_images"] = replayed["images"]
    checks = _Checks(model, data, new, inputs)
    before = checks.measure()
    history = []

    def on_round(record):
        history.append(dict(epoch=len(history) + 1, **checks.history_figures(x_new, y_new), lr=1.0, **record))

    with staged_dir(out, overwrite) as stage, drawing() as draw:
        rounds = replay_fit(model, x_new, y_new, torch.cat([x_old, x_earlier]), replay=replay, on_round=on_round)
        # drawn beside the checks and files that follow (by a helper process, where there is one)
        draw(history, stage / "curves.png", title=f"{meta['dataset']} — learning {counts['learnt']} new images "
             "(training) while keeping the parent's validation split")
        learnt = earlier + new
        held = learnt.held_out
        fitted = _recalibrate(model, meta, x_old, inputs(learnt.images[~held]),
                              (inputs(learnt.images[held]), learnt.labels[held].to(device)), replay, checks)
        summary = {
            "run_dir": str(out), "parent": weights_record(checkpoint), "dataset": meta["dataset"], "images": counts,
            "replay": {"share": replay, **replayed},
            "before": before, "after": checks.measure(), "calibration": fitted,
            "learning_seconds": sum(r["seconds"] for r in rounds), "iterations": rounds[-1]["iterations"],
        }
        _write_run(stage, model, meta, checkpoint, data_dir, history, learnt, summary, settings, device)
    return summary


def _refuse_to_replace_inputs(out: Path, checkpoint: Path, folder: Path) -> None:
    """``--overwrite`` replaces ``out`` whole: never the parent run, nor a folder holding the new images."""
    target = out.resolve()
    if target == checkpoint.parent.resolve() and (checkpoint.parent / "config.json").is_file():
        raise UsageError(f"--out {out} is the run learnt from; learn writes a new run and leaves its parent as it was")
    if target == folder.resolve() or target in folder.resolve().parents:
        raise UsageError(f"--out {out} holds the images to learn ({folder}); choose an --out outside it")


def _image_counts(found: LabelledImages, earlier: Learnt, new: Learnt) -> dict:
    """What became of the files found: skipped, learnt by an ancestor, the same as another, new
    (learnt or held out); and how many images the ancestors learnt."""
    known = {r["sha256"] for r in earlier.records}
    already = sum(digest in known for digest in found.digests)
    return {"found": len(found.files) + len(found.skipped), "skipped": len(found.skipped), "already_learnt": already,
            "duplicates": len(found.files) - len(new) - already, "new": len(new), "learnt": int((~new.held_out).sum()),
            "held_out": int(new.held_out.sum()), "learnt_before": int((~earlier.held_out).sum())}


def _new_only(found: LabelledImages, earlier: Learnt, share: float, seed: int, classes: list[str]) -> Learnt:
    """The images of ``found`` that no ancestor learnt, each file once (by content), marked held out or not."""
    seen = {r["sha256"] for r in earlier.records}
    keep = []
    for i, digest in enumerate(found.digests):
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    chosen = torch.tensor(keep, dtype=torch.long)
    labels = found.labels[chosen]
    held = hold_out(labels, share, seed)
    records = [{"file": str(Path(found.files[i]).resolve()), "sha256": found.digests[i], "class": classes[int(found.labels[i])],
                "held_out": bool(h)} for i, h in zip(keep, held.tolist())]
    return Learnt(found.images[chosen], labels, held, records)


def _parent_data(meta: dict, checkpoint: Path, data_dir, download: bool, log) -> dict:
    """The parent's training split (to replay), test split and validation split (None without one)."""
    from .run import read_eval_data

    data = {"train": read_eval_data(meta, "train", checkpoint, data_dir, download=download, log=log),
            "test": read_eval_data(meta, "test", checkpoint, data_dir, download=download, log=quiet)}
    try:
        data["val"] = read_eval_data(meta, "val", checkpoint, data_dir, download=download, log=quiet)
    except UsageError:  # trained with --val-fraction 0, or a checkpoint without its split.json
        data["val"] = None
    return data


def _inputs(images: torch.Tensor, meta: dict, device) -> torch.Tensor:
    from .data import prepare_inputs

    return prepare_inputs(images, meta.get("preprocessing"), device)


class _Checks:
    """What learning is judged on: the parent's test split, and the new images held out and learnt."""

    def __init__(self, model, data: dict, new: Learnt, inputs):
        self.model = model
        self.test = (inputs(data["test"].images), data["test"].labels.to(model.device))
        self.val = None if data["val"] is None else (inputs(data["val"].images), data["val"].labels.to(model.device))
        held = new.held_out
        self.held_out = (inputs(new.images[held]), new.labels[held].to(model.device))
        self.learnt = (inputs(new.images[~held]), new.labels[~held].to(model.device))

    def measure(self) -> dict:
        """Accuracy and the share rejected as unlike the training images, on each set."""
        return {name: self._figures(*pair) for name, pair in
                (("parent_test", self.test), ("new_held_out", self.held_out), ("new_learnt", self.learnt))}

    def _figures(self, x, y) -> dict:
        if not len(y):
            return {"n": 0, "accuracy": None, "rejected": None}
        proba, scores = self.model.proba_and_novelty(x)
        rejected = self.model.rejects(scores)
        return {"n": len(y), "accuracy": (proba.argmax(1) == y).double().mean().item(),
                "rejected": None if rejected is None else rejected.double().mean().item()}

    def history_figures(self, x_learn, y_learn) -> dict:
        """A history record's figures: training on the images being learnt, validation on the
        parent's validation split (what must not be forgotten)."""
        from .metrics import loss_and_accuracy

        record = dict(zip(("train_loss", "train_accuracy"), loss_and_accuracy(self.model, x_learn, y_learn.to(self.model.device))))
        if self.val is not None:
            record.update(zip(("val_loss", "val_accuracy"), loss_and_accuracy(self.model, *self.val)))
        return record


def _recalibrate(model, meta: dict, x_old, x_learnt, held_out: tuple, replay: float, checks: _Checks) -> dict:
    """Fit the temperature and the novelty score again, for the images the model now answers for.

    The novelty score is fitted on the replayed training images ``x_old`` and the images learnt
    since training ``x_learnt`` (this run's and its ancestors'), mixed as the objective mixed them
    (``novelty_rows``). Left out, a learnt style stays as unlike the training images as it was
    for the parent, and is rejected as much (``benchmarks/learn.py``: a style the parent rejects,
    learnt, is then accepted). The temperature and threshold come from images learning never saw,
    of both kinds: the parent's validation split and the held-out new images (``held_out``); without
    a validation split, from the mix, as ``train`` does.
    """
    from .confidence import DEFAULT_KEEP, calibrate

    keep = model.novelty.keep if model.novelty is not None else DEFAULT_KEEP
    temperature = bool((meta.get("config") or {}).get("calibrate", True))
    x_fit = novelty_rows(x_old, x_learnt, replay)
    if checks.val is None:
        fitted = calibrate(model, x_fit, None, None, keep=keep, temperature=False)
    else:
        x_val, y_val = (torch.cat([a, b]) for a, b in zip(checks.val, held_out))
        fitted = calibrate(model, x_fit, x_val, y_val, keep=keep, temperature=temperature)
    return dict(fitted, temperature=model.temperature)


def novelty_rows(x_old: torch.Tensor, x_learnt: torch.Tensor, replay: float) -> torch.Tensor:
    """The rows the novelty score's components are fitted on, shuffled: training images and learnt
    ones, these repeated to make up their share of the objective (1 - ``replay``) but never more
    than half (the model still answers for the training images' kind, replayed or not); at their
    bare count (40 among 5,000) a learnt style's strokes barely move the components."""
    from .confidence import FIT_ROWS

    share = max(replay, 0.5)
    rows = min(FIT_ROWS, round(len(x_old) / share))
    n_old = round(rows * share)
    repeats = torch.arange(max(1, rows - n_old), device=x_learnt.device) % len(x_learnt)
    mixed = torch.cat([x_old[:n_old].to(x_learnt.device), x_learnt[repeats]])
    return mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(0)).to(mixed.device)]


def _write_run(stage: Path, model, meta: dict, checkpoint: Path, data_dir, history: list[dict], learnt: Learnt,
               summary: dict, settings: dict, device) -> None:
    """The learnt run's files, as ``train`` writes them, plus the images learnt (``LEARNT_*``)."""
    import shutil

    from .checkpoint import CHECKPOINT_NAME, save_model
    from .files import write_csv, write_json
    from .run import FINAL_METRICS, SKIPPED_FILE, SOURCE_FILE, _environment, data_source_for, run_record, run_settings

    parent_dir = checkpoint.parent
    parent = run_settings(checkpoint) or RunConfig.from_dict(dict(meta.get("config") or {}, dataset=meta["dataset"]))
    folder, _ = data_source_for(checkpoint, data_dir)
    # how these weights were fitted; the parent's own settings are its config.json's (``parent``)
    learnt_with = replace(parent, data_dir=os.path.abspath(folder), optimizer="lbfgs", lr=1.0, epochs=len(history),
                          schedule="constant", momentum=0.0, weight_decay=0.0, keep_best=False, patience=None,
                          class_weight="none", lbfgs_iterations=ROUND, tolerance=TOLERANCE)
    config = run_record(
        learnt_with, learn=settings, parent=summary["parent"], device_used=str(device), world_size=1, **_environment(),
        epochs_trained=len(history), kept_epoch=None, stopped_early=False, temperature=model.temperature,
        novelty_threshold=model.novelty.threshold if model.novelty is not None else None,
    )
    write_json(stage / "config.json", config)
    for name in ("split.json", SOURCE_FILE, SKIPPED_FILE):  # the parent's data, which evaluate and a later learn read
        if (parent_dir / name).is_file() and (parent_dir / "config.json").is_file():
            shutil.copyfile(parent_dir / name, stage / name)
    write_json(stage / "history.json", history)
    write_csv(stage / "history.csv", history)
    write_learnt(stage, learnt)
    final = history[-1]
    metadata = {
        "dataset": meta["dataset"],
        "classes": meta["classes"],
        "preprocessing": meta.get("preprocessing"),
        "config": {k: v for k, v in config.items() if k != "data_dir"},
        "metrics": {k: final[k] for k in FINAL_METRICS if k in final},
        "epochs": len(history),
        "kept_epoch": None,
        "created": config["created"],
        "parent": summary["parent"],
    }
    save_model(stage / CHECKPOINT_NAME, model, metadata)
