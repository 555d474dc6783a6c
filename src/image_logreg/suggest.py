"""What to label next: unlabelled images ranked by how much a person's labels for them would teach the model.

An image's worth is the model's uncertainty about it: by default one less the margin between its two
most probable classes (a digit the model cannot tell between 4 and 9 shows it where that boundary
lies; one it is sure of teaches little), or the expected gradient length (``by="egl"``: how far, on
average over the model's own probabilities for its label, learning it would move the weights; on
MNIST it fell well behind the margin, and behind random picks).

The model's novelty score (``confidence``) decides the order too, as measured in
``benchmarks/active.py`` (a pool of MNIST digits, and the same with 5% non-digits mixed in): an image
the model rejects as unlike its training images comes only after every image it accepts. Much of
what it rejects is no digit at all (a garment, a dot, a scribble), whose label teaches nothing, and
a linear model is most sure far from its data, so its margin means little there: ranked by margin
alone, 71 of 500 picks were non-digits (random picks: 22), with the rejected last 20. Among the
rejected, the least unlike come first: a non-digit scores above a rejected digit (a digit in a style
the model has not seen) with probability 0.98, so the digits worth a person's time lead. A further
discount of the uncertain but atypical accepted images (``typical``: of two equally uncertain images,
prefer the one like many others) was measured and left off: 3% changed nothing, 10% cost accuracy.
A model without a novelty score (an old checkpoint) ranks by uncertainty alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError, ImageLogregError, UsageError
from .files import file_sha256
from .settings import SUGGEST_BY

TYPICAL = 0.0  # by default no discount for an accepted image's novelty: measured no better (see above)
CHUNK = 8192  # images scored at a time: bounds the novelty score's temporary arrays
SKIPPED_SHOWN = 10  # unreadable files named one by one; past this, one line counts the rest


@dataclass
class Ranking:
    """``rank``'s answer: per image (in the order given) its figures, and the order to label them in."""

    order: torch.Tensor  # indices of the images, most worth labelling first
    worth: torch.Tensor  # the uncertainty (``by``), less any ``typical`` discount; higher: sooner
    proba: torch.Tensor  # N x K, as ``predict`` gives them (temperature included)
    margin: torch.Tensor  # the top probability less the runner-up's
    novelty: torch.Tensor | None  # the novelty score, None for a model without one
    rejected: torch.Tensor | None  # bool: above the novelty threshold (ranked after every accepted image)


@torch.no_grad()
def rank(model, x: torch.Tensor, *, by: str = "margin", typical: float = TYPICAL) -> Ranking:
    """Rank the images ``x`` (the model's inputs, as ``data.prepare_inputs`` makes them) by how much
    labelling each would teach ``model``: see the module's docstring. ``typical``: the most an accepted
    image's worth is scaled down as its novelty score rises from 0 to the threshold."""
    if by not in SUGGEST_BY:
        raise UsageError(f"unknown ranking {by!r}; choose from {', '.join(SUGGEST_BY)}")
    probas, scores = [], []
    for start in range(0, len(x), CHUNK):
        proba, score = model.proba_and_novelty(x[start : start + CHUNK])
        probas.append(proba.cpu().float())
        scores.append(score)
    proba = torch.cat(probas) if probas else torch.empty(0, model.num_classes)
    novelty = None if model.novelty is None else (torch.cat(scores) if scores else torch.empty(0))
    top = proba.topk(min(2, proba.shape[1]), dim=1).values
    margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else top[:, 0]
    worth = 1 - margin if by == "margin" else expected_gradient_length(proba, x)
    rejected = None
    if novelty is not None:
        rejected = model.rejects(novelty)
        threshold = model.novelty.threshold
        if typical:
            atypical = (novelty / threshold).clamp(0, 1) if threshold > 0 else (novelty > 0).float()
            worth = worth * (1 - typical * atypical)
    # stable sorts, so ties keep the files' own order: the accepted by worth, the rejected by novelty
    key = -worth if rejected is None else torch.where(rejected, novelty, -worth)
    order = torch.sort(key, stable=True).indices
    if rejected is not None:
        order = order[torch.sort(rejected[order].to(torch.uint8), stable=True).indices]
    return Ranking(order, worth, proba, margin, novelty, rejected)


def expected_gradient_length(proba: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per image, the norm of the cross-entropy's gradient in the weights and bias, averaged over its
    label drawn from ``proba``. For label k that gradient is ``(p - e_k) [x, 1]^T``, whose norm is
    ``||p - e_k|| sqrt(||x||^2 + 1)``, and ``||p - e_k||^2 = ||p||^2 - 2 p_k + 1``."""
    squared = (proba * proba).sum(1, keepdim=True)
    lengths = (squared - 2 * proba + 1).clamp(min=0).sqrt()
    inputs = (x.reshape(len(x), -1).float().pow(2).sum(1) + 1).sqrt().cpu()
    return (proba * lengths).sum(1) * inputs


# --- a folder of image files --------------------------------------------------------------------


def check_folder(folder) -> Path:
    """``folder`` if it is a folder; else a one-line error."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file; suggest ranks the image files in a folder (searched recursively)")
    return folder


def suggest_files(model, meta: dict, folder, n: int, *, by: str = "margin", normalize: bool = True,
                  max_pixels: int | None = None, labelled=None, log=None) -> dict:
    """The ``n`` image files under ``folder`` (searched recursively; hidden files and folders left
    out) most worth labelling, most first, each read as ``predict`` reads a file.

    Files that cannot be used are skipped (``log`` names the first few, then counts the rest), and
    a file whose content is the same as another's, or as a file anywhere under ``labelled`` (where
    an earlier ``suggest --copy-to`` put its picks, sorted or not), is not suggested again.
    Returns a JSON-ready dict: the counts, the skipped files and ``suggestions``, each with its
    ``rank``, ``source``, predicted ``label`` (``index``), ``probability``, ``runner_up``,
    ``margin``, ``worth`` and, for a model with a novelty score, ``ood_score`` and ``rejected``.
    """
    import numpy as np

    from .data import prepare_inputs
    from .predict import prepare_file
    from .preprocess import find_image_files

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    folder = check_folder(folder)
    paths = find_image_files([folder])
    if not paths:
        raise DataError(f"no image files (PNG, JPEG, GIF, BMP, WebP, TIFF) found in {folder}")
    known = set()
    if labelled is not None and Path(labelled).is_dir():
        for path in find_image_files([labelled]):
            try:
                known.add(file_sha256(path))
            except OSError:
                continue  # unreadable there: it cannot be told apart from anything here either
    images, sources, seen, skipped = [], [], set(), []
    duplicates = already = 0
    for path in paths:
        try:
            digest = file_sha256(path)
            if digest in known:
                already += 1
                continue
            if digest in seen:
                duplicates += 1
                continue
            image = prepare_file(model, meta, path, normalize, max_pixels=max_pixels)
        except ImageLogregError as exc:
            skipped.append({"source": str(path), "error": str(exc).removeprefix(f"{path}: ")})
            continue
        except OSError as exc:
            skipped.append({"source": str(path), "error": exc.strerror or type(exc).__name__})
            continue
        seen.add(digest)
        images.append(image)
        sources.append(str(path))
    if log:
        for entry in skipped[:SKIPPED_SHOWN]:
            log(f"warning: skipped {entry['source']}: {entry['error']}")
        if len(skipped) > SKIPPED_SHOWN:
            log(f"warning: skipped {len(skipped) - SKIPPED_SHOWN} more files ({len(skipped)} in all)")
    if not images:
        why = [f"{len(skipped)} unusable"] if skipped else []
        why += [f"{already} already in {labelled}"] if already else []
        why += [f"{duplicates} the same as another"] if duplicates else []
        raise DataError(f"no images left to suggest in {folder} ({', '.join(why)})")
    x = prepare_inputs(torch.from_numpy(np.stack(images)), meta.get("preprocessing"), model.device)
    ranking = rank(model, x, by=by)
    return {
        "folder": str(folder), "by": by, "found": len(paths), "ranked": len(images), "duplicates": duplicates,
        "already_labelled": already, "skipped": skipped,
        "novelty_threshold": None if model.novelty is None else model.novelty.threshold,
        "suggestions": suggestion_entries(ranking, sources, meta["classes"], n),
    }


def suggestion_entries(ranking: Ranking, sources: list[str], classes: list[str], n: int) -> list[dict]:
    """The first ``n`` of ``ranking.order`` as dicts (see ``suggest_files``)."""
    chosen = ranking.order[:n]
    values, indices = ranking.proba[chosen].topk(min(2, ranking.proba.shape[1]), dim=1)
    entries = []
    for place, (i, p, k) in enumerate(zip(chosen.tolist(), values.tolist(), indices.tolist()), start=1):
        entry = {"rank": place, "source": sources[i], "label": classes[k[0]], "index": k[0], "probability": p[0],
                 "runner_up": classes[k[1]] if len(k) > 1 else None, "margin": float(ranking.margin[i]),
                 "worth": float(ranking.worth[i])}
        if ranking.novelty is not None:
            entry["ood_score"] = float(ranking.novelty[i])
            entry["rejected"] = bool(ranking.rejected[i])
        entries.append(entry)
    return entries


# --- ready for a person to sort ------------------------------------------------------------------

NAME_BYTES = 240  # a copy's file name is kept under the usual limit of 255 bytes


def copy_suggestions(entries: list[dict], folder, classes: list[str]) -> Path:
    """Copy each suggested file into ``folder`` itself, named ``<rank> [<guess>] <its name>``, and make
    an empty folder for each class that ``folder`` has none for (named as ``learn.class_folder``
    names it): a person drags each file into its class's folder, and ``image-logreg learn RUN
    folder`` reads ``folder/<class>/``. Files not yet sorted sit beside the class folders, where
    ``learn`` passes them by, so a guess is never learnt as a label. No file is replaced: a name
    taken gets ``-2`` and so on (``files.copy_new``). Each entry gets ``copied_to``."""
    from .files import copy_new
    from .lineage import class_folder, class_of_folder

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--copy-to {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    has = {class_of_folder(classes, p.name) for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for k in range(len(classes)):
        if k not in has:
            (folder / class_folder(classes, k)).mkdir(exist_ok=True)
    width = max(3, len(str(len(entries))))
    for entry in entries:
        guess = "unrecognised" if entry.get("rejected") else class_folder(classes, entry["index"])
        source = Path(entry["source"])
        prefix = f"{entry['rank']:0{width}d} [{guess}] "
        stem = source.stem
        while len((prefix + stem + source.suffix).encode()) > NAME_BYTES and stem:
            stem = stem[:-1]
        entry["copied_to"] = str(copy_new(source, folder / f"{prefix}{stem}{source.suffix}"))
    return folder
