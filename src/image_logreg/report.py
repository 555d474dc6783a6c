"""One self-contained HTML page that explains a trained run: ``image-logreg report RUN``.

The page (``report.html`` in the run directory) embeds every figure as a base64 PNG, so it
opens from disk, offline, and can be mailed or archived as one file. Each figure is also
written beside it as a PNG of its own (``report-*.png``) for slides and notes.

Everything measured here is measured on the TEST set, now, with the model's recorded
preprocessing; validation numbers come from the run's own history.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CHECKPOINT_NAME, load_model
from .data import prepare_inputs
from .errors import CheckpointError
from .files import read_json, refuse_existing, write_text
from .metrics import expected_calibration_error, logits_of, per_class_scores, scores_of_logits  # noqa: F401  (importable from here too)
from .plots import WEIGHT_CMAP, colormaps, plot_curves, plot_grid, save_figure, subplots, template_rgb, weight_templates
from .run import read_eval_data

REPORT_NAME = "report.html"
FIGURES = {
    "weights": "report-weights.png",
    "confusion": "report-confusion.png",
    "mistakes": "report-mistakes.png",
    "samples": "report-samples.png",
    "calibration": "report-calibration.png",
    "novelty": "report-novelty.png",
}
RUN_FILES = ("config.json", "history.json", CHECKPOINT_NAME)
CALIBRATION_BINS = 15
MISTAKES = 16
SAMPLES = 24


def write_report(run_dir, data_dir=None, *, overwrite: bool = True, seed: int = 0, download: bool = True) -> Path:
    """Write ``report.html`` (and its ``report-*.png`` figures) into ``run_dir``; return its path.

    ``data_dir`` None means the data folder recorded in the run's ``config.json``.
    """
    return Path(make_report(run_dir, data_dir, overwrite=overwrite, seed=seed, download=download)["report"])


def make_report(run_dir, data_dir=None, *, overwrite: bool = True, seed: int = 0, download: bool = True) -> dict:
    """As :func:`write_report`, but return the headline numbers too (for ``--json``)."""
    run = _check_run_dir(run_dir)
    for name in (REPORT_NAME, *FIGURES.values()):  # refuse before any work, not halfway through
        refuse_existing(run / name, overwrite, "run directory")
    config, history = _read_json(run / "config.json"), _read_json(run / "history.json")
    if not isinstance(history, list) or not history or not isinstance(config, dict):
        raise CheckpointError(f"{run}: history.json holds no epochs, or config.json no settings")
    model, meta = load_model(run, device="cpu")
    test = read_eval_data(meta, "test", run / CHECKPOINT_NAME, data_dir, download=download)
    classes = meta["classes"]

    x_test = prepare_inputs(test.images, meta.get("preprocessing"), "cpu")
    logits = logits_of(model, x_test)
    calibrated = logits / model.temperature  # the probabilities predict and serve give
    result = scores_of_logits(calibrated, test.labels, classes)
    probs = torch.softmax(calibrated, dim=1)
    calibration = expected_calibration_error(probs, test.labels, CALIBRATION_BINS)
    uncalibrated = None if model.temperature == 1.0 else expected_calibration_error(torch.softmax(logits, 1), test.labels, CALIBRATION_BINS)
    cm = torch.tensor(result["confusion"])

    curves = run / "curves.png"
    if not curves.is_file():  # older or hand-pruned runs: the history has everything needed
        plot_curves(history, curves, title=f"{meta['dataset']} — logistic regression", kept_epoch=meta.get("kept_epoch"))
    figures = {
        "curves": curves,
        "weights": plot_weights(model, classes, run / FIGURES["weights"]),
        "confusion": plot_confusion(cm, classes, run / FIGURES["confusion"]),
        "mistakes": plot_mistakes(test.images, test.labels, probs, classes, run / FIGURES["mistakes"]),
        "samples": plot_samples(test.images, test.labels, probs, classes, run / FIGURES["samples"], seed=seed),
        "calibration": plot_calibration(calibration, run / FIGURES["calibration"], before=uncalibrated),
        "novelty": plot_novelty(model, x_test, logits, run / FIGURES["novelty"], seed=seed),
    }
    split = _read_json(run / "split.json") if (run / "split.json").is_file() else None
    page = _render_page(run, meta, config, history, split, result, cm, calibration, figures)
    report = write_text(run / REPORT_NAME, page)  # last, so a report.html is always a whole one
    return {
        "report": str(report),
        "dataset": meta["dataset"],
        "test_n": result["n"],
        "test_accuracy": result["accuracy"],
        "test_loss": result["loss"],
        "ece": calibration["ece"],
        "figures": {k: str(v) for k, v in figures.items()},
    }


def _check_run_dir(run_dir) -> Path:
    run = Path(run_dir)
    if not run.exists():
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not run.is_dir():
        raise CheckpointError(f"{run_dir}: not a run directory (a report needs the folder `image-logreg train` made)")
    missing = [name for name in RUN_FILES if not (run / name).is_file()]
    if missing:
        raise CheckpointError(f"{run_dir}: not a complete run directory (missing {', '.join(missing)})")
    return run


def _read_json(path: Path):
    try:
        return read_json(path)
    except ValueError as exc:  # JSONDecodeError and bad UTF-8 alike
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


# --- calibration ------------------------------------------------------------------------------


def calibration_reading(cal: dict) -> str:
    """One plain-English sentence on what the ECE means for someone reading probabilities."""
    gap = cal["mean_confidence"] - cal["overall_accuracy"]
    lean = "overconfident" if gap > 0.005 else "underconfident" if gap < -0.005 else "neither over- nor underconfident"
    return (
        f"The model's probabilities are trustworthy to within about {100 * cal['ece']:.1f} percentage points on average: "
        f"it is {lean} overall (mean confidence {100 * cal['mean_confidence']:.1f}% against "
        f"{100 * cal['overall_accuracy']:.1f}% of answers right)."
    )


# --- figures ----------------------------------------------------------------------------------


# Past this many classes the confusion matrix drops its per-cell numbers (they would not be legible)
# and the weight templates are drawn smaller, ten to a row.
MANY_CLASSES = 30


def plot_weights(model, classes: list[str], path) -> Path:
    """Each class's weight row as an image: where ink raises (red) or lowers (blue) its score.

    Colour models show each class's three channels as one RGB image on the same shared
    scale (``plots.template_rgb``: mid-gray is zero).
    """
    weights, limit = weight_templates(model)
    clipped = weights.abs().max().item() > limit  # arrows on the colour bar say so
    many = len(classes) > MANY_CLASSES
    cols = min(len(classes), 10 if many else 5)
    rows = -(-len(classes) // cols)
    cell = 1.3 if many else 2.1
    fig, axes = subplots(rows, cols, figsize=(cell * cols, cell * rows + 0.6), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    colour = weights.dim() == 4
    shown = template_rgb(weights.numpy(), limit) if colour else weights.numpy()
    for ax, w, name in zip(axes.flat, shown, classes):
        if colour:
            ax.imshow(w, interpolation="nearest")
        else:
            im = ax.imshow(w, cmap=WEIGHT_CMAP, vmin=-limit, vmax=limit)
        ax.set_title(name, fontsize=7 if many else 10)
    if colour:
        fig.suptitle(f"Learned weight templates, one per class, as RGB images on one scale (±{limit:.3g}):\n"
                     "mid-gray = 0, a channel brighter where that colour is evidence for the class", fontsize=10)
    else:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, extend="both" if clipped else "neither",
                     label="weight (red: evidence for, blue: against)")
        fig.suptitle("Learned weight templates, one per class")
    return save_figure(fig, path)


def plot_confusion(cm: torch.Tensor, classes: list[str], path) -> Path:
    """Test-set confusion counts; colour on a log scale so the rare mistakes are visible too."""
    from matplotlib.colors import LogNorm

    counts = cm.numpy()
    n = len(classes)
    many = n > MANY_CLASSES
    size = 0.16 * n + 4 if many else max(5.5, 0.62 * n + 2)
    fig, ax = subplots(figsize=(size + 1.2, size))
    cmap = colormaps["Blues"].with_extremes(bad="white")  # zero cells: no colour, and no number either
    masked = counts.astype(float)
    masked[masked == 0] = float("nan")
    norm = LogNorm(vmin=0.6, vmax=max(2, counts.max()))  # below 1, so a single mistake is tinted, unlike zero
    im = ax.imshow(masked, cmap=cmap, norm=norm)
    for i in range(0 if many else n):  # many classes: the colours alone, numbers would not fit
        for j in range(n):
            if counts[i, j]:
                dark = norm(counts[i, j]) > 0.6
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8 if n <= 12 else 6,
                        color="white" if dark else "black", fontweight="bold" if i == j else "normal")
    ticks = 5 if many else None
    ax.set_xticks(range(n), classes, rotation=45 if not many else 90, ha="right", rotation_mode="anchor", fontsize=ticks)
    ax.set_yticks(range(n), classes, fontsize=ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix on the test set ({int(counts.sum())} images)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="images (log scale)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_mistakes(images, labels, probs, classes: list[str], path, count: int = MISTAKES) -> Path:
    """The wrong answers the model was surest of: often mislabelled or genuinely ambiguous."""
    confidence, predicted = probs.max(dim=1)
    wrong = (predicted != labels).nonzero().flatten()
    picks = wrong[confidence[wrong].argsort(descending=True)][:count].tolist()
    if not picks:
        return _message_figure(f"No mistakes on the {len(labels)} test images.", path)
    title = (
        f"The {len(picks)} most confident of {len(wrong)} mistakes on the test set\n"
        "(true class → predicted class, and the probability the model gave its prediction)"
    )
    # the probability of the (wrong) prediction: how sure it was when it was wrong
    titles = [f"{classes[int(labels[i])]} → {classes[int(predicted[i])]}\np = {confidence[i]:.3f}" for i in picks]
    return plot_grid([images[i].numpy() for i in picks], titles, path, title, ["tab:red"] * len(picks))


def plot_samples(images, labels, probs, classes: list[str], path, count: int = SAMPLES, seed: int = 0) -> Path:
    """Random test images with the model's answer: what testing one image at a time shows, many at once."""
    confidence, predicted = probs.max(dim=1)
    picks = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    titles, colors = [], []
    for i in picks:
        right = int(predicted[i]) == int(labels[i])
        truth = "" if right else f"\ntrue: {classes[int(labels[i])]}"
        titles.append(f"{classes[int(predicted[i])]} ({confidence[i]:.2f}){truth}")
        colors.append("tab:green" if right else "tab:red")
    right = sum(c == "tab:green" for c in colors)
    title = (
        f"{len(picks)} random test images (seed {seed}) with the predicted class and its probability:\n"
        f"{right} right (green), {len(picks) - right} wrong (red, with the true class)"
    )
    return plot_grid([images[i].numpy() for i in picks], titles, path, title, colors)


def plot_novelty(model, x_test: torch.Tensor, logits: torch.Tensor, path, seed: int = 0) -> Path:
    """The novelty scores of the test images against those of uniform noise, and the threshold."""
    if model.novelty is None:
        return _message_figure("this checkpoint has no novelty score: it rejects nothing", path)
    test_scores = model.novelty.score(x_test, logits).numpy()
    noise = torch.rand(len(x_test[:1000]), *x_test.shape[1:], generator=torch.Generator().manual_seed(seed))
    noise_scores = model.novelty_scores(noise).numpy()
    threshold = model.novelty.threshold
    high = max(float(np.quantile(test_scores, 0.999)), threshold) * 3  # the test images' tail, and past the threshold
    low = float(test_scores.min())
    bins = np.linspace(low, high, 61)
    fig, ax = subplots(figsize=(8, 3.6), layout="constrained")
    kept = (test_scores <= threshold).mean()
    ax.hist(np.clip(test_scores, low, high), bins=bins, color="tab:blue", alpha=0.7,
            label=f"test images ({kept:.1%} accepted)")
    ax.hist(np.clip(noise_scores, low, high), bins=bins, color="tab:red", alpha=0.6,
            label=f"uniform noise ({(noise_scores > threshold).mean():.1%} rejected; past the axis drawn at its end)")
    ax.axvline(threshold, color="black", linestyle="--", lw=1.2, label=f"threshold {threshold:.2f} (keeps {model.novelty.keep:.0%} of validation)")
    ax.set_yscale("log")
    ax.set_xlabel("novelty score (largest of its parts, in units of their validation spread)")
    ax.set_ylabel("images")
    ax.set_title("How unlike the training images: above the threshold, an input is rejected")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_calibration(cal: dict, path, before: dict | None = None) -> Path:
    """Reliability diagram over a histogram of confidences, sharing the confidence axis; ``before``,
    the same without the run's temperature, drawn as a line."""
    edges = cal["edges"]
    lefts, width = edges[:-1], edges[1] - edges[0]
    fig, (ax, ax_hist) = subplots(
        2, 1, figsize=(6.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]}, layout="constrained"
    )
    filled = [(x, a, c) for x, a, c in zip(lefts, cal["accuracy"], cal["confidence"]) if a is not None]
    ax.bar([x for x, _, _ in filled], [a for _, a, _ in filled], width=width, align="edge",
           color="tab:blue", edgecolor="white", label="accuracy in bin")
    # The gap between what the model claims and what it gets, the thing ECE averages: an
    # unfilled hatched box, so it reads the same above a bar (overconfident) as inside one.
    ax.bar([x for x, _, _ in filled], [c - a for _, a, c in filled], bottom=[a for _, a, _ in filled], width=width,
           align="edge", facecolor="none", edgecolor="tab:red", hatch="///", lw=1.2, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    title = f"Reliability diagram ({cal['bins']} bins): ECE = {cal['ece']:.4f}"
    if before is not None:
        points = [(c, a) for c, a in zip(before["confidence"], before["accuracy"]) if a is not None]
        ax.plot([c for c, _ in points], [a for _, a in points], "o-", color="tab:orange", lw=1.2, ms=3,
                label=f"before the temperature (ECE {before['ece']:.4f})")
        title += f", {before['ece']:.4f} before the temperature"
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax_hist.bar(lefts, cal["count"], width=width, align="edge", color="gray", edgecolor="white")
    ax_hist.set_yscale("log")  # most answers sit in the top bin; a log axis keeps the rest visible
    ax_hist.set_ylim(bottom=0.5)  # so a bin of one or a few images still shows as a bar
    ax_hist.set_xlabel("confidence (largest predicted probability)")
    ax_hist.set_ylabel("test images")
    ax_hist.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def _message_figure(message: str, path) -> Path:
    fig, ax = subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    return save_figure(fig, path)


# --- the page ---------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.headline { display: flex; gap: 1em; flex-wrap: wrap; margin: 1.2em 0; }
.headline div { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 9em; }
.headline b { display: block; font-size: 1.5em; }
"""


def _render_page(run, meta, config, history, split, result, cm, cal, figures) -> str:
    from .runs import kept_record

    final = kept_record(history, config)  # the epoch whose weights the report measures
    e = html.escape
    headline = [
        ("test accuracy", f"{result['accuracy']:.4f}"),
        ("test loss (NLL)", f"{result['loss']:.4f}"),
        ("validation accuracy", _metric(final, "val_accuracy")),
        ("ECE (test)", f"{cal['ece']:.4f}"),
    ]
    parts = [
        f"<h1>{e(_heading(run.name, meta['dataset']))}</h1>",
        f'<p class="sub">{e(str(run.resolve()))} · trained {e(str(config.get("created", "?")))} · '
        f"{len(history)} epochs · report on {result['n']} test images</p>",
        '<div class="headline">' + "".join(f"<div>{e(k)}<b>{v}</b></div>" for k, v in headline) + "</div>",
        "<h2>Final metrics</h2>",
        _metrics_table(final, split, result),
        "<h2>Training curves</h2>",
        _img(figures["curves"], "training and validation loss and accuracy per epoch"),
        "<h2>What the model learned</h2>",
        _weights_reading(meta),
        _img(figures["weights"], "weight template of each class"),
        "<h2>Errors on the test set</h2>",
        _img(figures["confusion"], "confusion matrix on the test set"),
        _class_table(cm, meta["classes"]),
        _img(figures["mistakes"], "the most confident mistakes"),
        _img(figures["samples"], "random test images with predictions"),
        "<h2>Calibration</h2>",
        f"<p>Expected calibration error (ECE, {cal['bins']} equal-width confidence bins): <b>{cal['ece']:.4f}</b>. "
        f"{e(calibration_reading(cal))} Test loss (negative log-likelihood) {result['loss']:.4f}, "
        f"test accuracy {result['accuracy']:.4f}.</p>",
        _img(figures["calibration"], "reliability diagram and histogram of confidences"),
        "<h2>Unlike the training images</h2>",
        _novelty_reading(meta),
        _img(figures["novelty"], "novelty scores of the test images and of noise, with the threshold"),
        "<h2>Configuration</h2>",
        _table(["setting", "value"], [(k, _setting(k, v)) for k, v in config.items() if _applies(k, config)]),
    ]
    body = "\n".join(parts)
    title = f"image-logreg report: {run.name}"
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _novelty_reading(meta: dict) -> str:
    novelty = meta.get("novelty")
    if not novelty:
        return "<p>This checkpoint was made before image-logreg could tell: it answers every input.</p>"
    return (
        f"<p>An input whose novelty score is above {novelty['threshold']:.3f} is rejected as unlike the training "
        f"images: predict says <i>not recognised</i>, the server's <code>rejected</code> is true and the page asks "
        f"whether it is one of the classes at all. The threshold accepts {novelty['keep']:.0%} of the validation "
        f"images; the probabilities are divided by a temperature of {meta.get('temperature', 1.0):.3f} before the "
        f"softmax.</p>"
    )


def _weights_reading(meta: dict) -> str:
    if len(meta.get("input_shape", [])) == 3:
        return (
            "<p>Each class's score is the sum of the pixel values weighted by its template (plus a bias), every "
            "colour channel with its own weights. A template is drawn as an RGB image on one scale shared by all "
            "classes and channels: mid-gray is a weight of zero, a channel brighter where that colour is evidence "
            "for the class and darker where it is evidence against it.</p>"
        )
    return (
        "<p>Each class's score is the sum of the pixels weighted by its template (plus a bias). Red pixels are "
        "evidence for the class when inked, blue pixels evidence against it; all templates share one colour scale.</p>"
    )


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(os.path.basename(path))}">'


def _table(header: list[str], rows, numeric: set[int] = frozenset()) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{e(str(v))}</td>' for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _heading(run_name: str, dataset: str) -> str:
    return f"Logistic regression on {dataset}" + ("" if run_name == dataset else f": {run_name}")


# settings that mean something for one optimizer only
_OPTIMIZER_ONLY = {"momentum": "sgd", "lbfgs_iterations": "lbfgs", "tolerance": "lbfgs"}


def _applies(name: str, config: dict) -> bool:
    """Whether a setting had any effect on this run (L-BFGS's for an Adam run did not)."""
    if name in _OPTIMIZER_ONLY:
        return config.get("optimizer") == _OPTIMIZER_ONLY[name]
    if name in ("schedule", "batch_size"):
        return config.get("optimizer") != "lbfgs"
    return True


def _setting(name: str, value) -> str:
    if value is None:
        return "—"
    if name == "max_memory" and isinstance(value, int):
        return f"{value / 2**30:.1f} GiB"
    return value if isinstance(value, str) else json.dumps(value)  # as written in config.json


def _metrics_table(final: dict, split: dict | None, result: dict) -> str:
    sizes = (len(split["train_indices"]), len(split["val_indices"])) if split else ("?", "?")
    rows = [
        (f"training (epoch {final.get('epoch', '?')})", sizes[0], f"{final['train_loss']:.4f}", f"{final['train_accuracy']:.4f}"),
        (f"validation (epoch {final.get('epoch', '?')})", sizes[1], _metric(final, "val_loss"), _metric(final, "val_accuracy")),
        ("test (computed now)", result["n"], f"{result['loss']:.4f}", f"{result['accuracy']:.4f}"),
    ]
    return _table(["split", "images", "loss", "accuracy"], rows, numeric={1, 2, 3})


def _metric(record: dict, key: str) -> str:
    """A history figure, or a dash where the run had none (no validation set: --val-fraction 0)."""
    return f"{record[key]:.4f}" if record.get(key) is not None else "—"


def _class_table(cm: torch.Tensor, classes: list[str]) -> str:
    """Per-class scores; a class's accuracy is its recall (the share of its images named right)."""
    scores = per_class_scores(cm)
    fmt = lambda v: "—" if v is None else f"{v:.4f}"
    off = cm.clone().fill_diagonal_(0)
    rows = []
    for i, name in enumerate(classes):
        j = int(off[i].argmax())
        confused = f"{classes[j]} ({int(off[i, j])})" if off[i, j] else "—"
        rows.append((name, scores["support"][i], fmt(scores["recall"][i]), fmt(scores["precision"][i]),
                     fmt(scores["f1"][i]), confused))
    header = ["class", "support", "accuracy (= recall)", "precision", "F1", "most often mistaken for"]
    return _table(header, rows, numeric={1, 2, 3, 4})
