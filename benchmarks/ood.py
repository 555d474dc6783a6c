"""Knowing when it does not know: what the default runs reject, and how well their probabilities are calibrated.

    python benchmarks/ood.py --data-dir ../shared/data [--update-results]

Trains MNIST and Fashion-MNIST with the defaults (a few seconds each), then scores, with each
model's novelty score (``confidence``) and two baselines in the same table, the maximum softmax
probability (Hendrycks & Gimpel) and the energy of the logits:
- MNIST test against Fashion-MNIST test (AUROC, and at the threshold: shares kept and rejected);
- uniform noise in the model's input form, blank pages with one dot and random scribbles as a
  user's files (through ``predict``'s own preprocessing), and the 300 user-style digits of
  ``tests/user_digits.py`` (MNIST test digits re-rendered on paper);
- the Fashion-MNIST model the other way round (Fashion test against MNIST test).
Each baseline's threshold is taken as ours is: its value that keeps ``--keep`` of the run's
validation images. The calibration table gives each model's test ECE before and after its
temperature.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from sections import machine, replace_block  # noqa: E402

from image_logreg import load_split, to_float  # noqa: E402
from image_logreg.checkpoint import load_model  # noqa: E402
from image_logreg.confidence import energy, fit_temperature  # noqa: E402
from image_logreg.files import read_json  # noqa: E402
from image_logreg.metrics import expected_calibration_error, logits_of  # noqa: E402
from image_logreg.run import train_run  # noqa: E402

TARGETS = {"auroc": 0.995, "fashion_rejected": 0.95, "mnist_kept": 0.99, "odd_rejected": 0.99, "user_rejected": 0.02,
           "reverse_auroc": 0.99, "ece": 0.01}


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """The chance that an outside image scores higher than an inside one (ties count half)."""
    scores = torch.cat([inside, outside]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique()[torch.unique(scores, return_counts=True)[1] > 1]:  # mid-ranks for ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_in, n_out = len(inside), len(outside)
    return ((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out)).item()


class Scores:
    """The three scores of one model on an input set; higher means less like the training images."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = logits_of(self.model, x)
        probability = torch.softmax(logits / self.model.temperature, 1).max(1).values
        return {"softmax": -probability, "energy": energy(logits), "image-logreg": self.model.novelty_scores(x, logits)}


def user_files(kind: str, n: int, seed: int) -> list[bytes]:
    """PNG files as a user would bring them: a white page with one dot, or with a random scribble."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    files = []
    for _ in range(n):
        page = Image.new("L", (200, 200), 255)
        draw = ImageDraw.Draw(page)
        if kind == "dot":
            x, y, r = (int(v) for v in (*rng.integers(20, 180, 2), rng.integers(2, 8)))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
        else:
            points = [tuple(int(v) for v in rng.integers(10, 190, 2)) for _ in range(int(rng.integers(4, 12)))]
            draw.line(points, fill=0, width=int(rng.integers(6, 14)))
        buffer = io.BytesIO()
        page.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def as_inputs(model, meta, files: list) -> tuple[torch.Tensor, int]:
    """Files through predict's own preprocessing; those it refuses (a blank page) are counted apart."""
    from image_logreg.errors import ImageError
    from image_logreg.predict import prepare_file

    images, refused = [], 0
    for k, source in enumerate(files):
        try:
            images.append(prepare_file(model, meta, source, name=f"file{k}.png"))
        except ImageError:
            refused += 1
    return to_float(torch.from_numpy(np.stack(images))), refused


def validation_images(run: Path, dataset: str, data_dir) -> torch.Tensor:
    split = read_json(run / "split.json")
    train = load_split(dataset, data_dir, "train", download=False)
    return to_float(train.images[torch.as_tensor(split["val_indices"])])


def measure(data_dir, keep: float) -> dict:
    from user_digits import write_user_digit_set

    results = {"keep": keep}
    with tempfile.TemporaryDirectory(prefix="ood-") as scratch:
        runs = {}
        for dataset in ("mnist", "fashion-mnist"):
            out = Path(scratch) / dataset
            train_run({"dataset": dataset, "data_dir": str(data_dir), "download": False, "keep": keep}, out)
            runs[dataset] = out
        tests = {name: load_split(name, data_dir, "test", download=False) for name in runs}
        x_test = {name: to_float(data.images) for name, data in tests.items()}

        model, meta = load_model(runs["mnist"])
        score = Scores(model)
        thresholds = {name: torch.quantile(value.double(), keep).item()
                      for name, value in score(validation_images(runs["mnist"], "mnist", data_dir)).items()}
        thresholds["image-logreg"] = model.novelty.threshold
        user = write_user_digit_set(tests["mnist"].images[:300].numpy(), Path(scratch) / "user", seed=0)
        sets = {"noise": (torch.rand(1000, 28, 28, generator=torch.Generator().manual_seed(0)), 0)}
        sets["dot"] = as_inputs(model, meta, user_files("dot", 300, 1))
        sets["scribble"] = as_inputs(model, meta, user_files("scribble", 300, 2))
        sets["user digits"] = as_inputs(model, meta, user)
        inside, outside = score(x_test["mnist"]), score(x_test["fashion-mnist"])
        rows = {}
        for name in ("softmax", "energy", "image-logreg"):
            t = thresholds[name]
            row = {"auroc": auroc(inside[name], outside[name]), "mnist_kept": (inside[name] <= t).double().mean().item(),
                   "fashion_rejected": (outside[name] > t).double().mean().item()}
            for label, (x, refused) in sets.items():  # a file preprocessing refuses is not answered: rejected
                row[label] = ((score(x)[name] > t).sum().item() + refused) / (len(x) + refused)
            rows[name] = row
        results["mnist"] = rows
        results["refused_by_preprocessing"] = {label: refused for label, (_, refused) in sets.items()}

        fashion, _ = load_model(runs["fashion-mnist"])
        reverse = Scores(fashion)
        f_in, f_out = reverse(x_test["fashion-mnist"]), reverse(x_test["mnist"])
        results["reverse_auroc"] = {name: auroc(f_in[name], f_out[name]) for name in f_in}

        results["calibration"] = {}
        for name, run in runs.items():
            m, _ = load_model(run)
            logits, labels = logits_of(m, x_test[name]), tests[name].labels
            best = fit_temperature(logits, labels)  # fitted on the test split itself: temperature's limit
            results["calibration"][name] = {
                "temperature": m.temperature,
                "before": expected_calibration_error(torch.softmax(logits, 1), labels)["ece"],
                "after": expected_calibration_error(torch.softmax(logits / m.temperature, 1), labels)["ece"],
                "test_temperature": best,
                "test_fitted": expected_calibration_error(torch.softmax(logits / best, 1), labels)["ece"],
            }
    return results


def render(r: dict) -> str:
    rows, keep = r["mnist"], r["keep"]
    met = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    lines = [
        f"Measured on {machine('torch')}; the default MNIST and Fashion-MNIST runs, thresholds keeping {keep:.0%} of each run's validation images.",
        "Reproduce: `python benchmarks/ood.py --data-dir ../shared/data --update-results`.",
        "",
        "| MNIST model | AUROC, MNIST test vs Fashion test | MNIST test kept | Fashion rejected | noise rejected | one dot rejected "
        "| scribbles rejected | user-style digits rejected | AUROC, Fashion model (Fashion vs MNIST) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("softmax", "energy", "image-logreg"):
        row = rows[name]
        label = {"softmax": "max softmax probability", "energy": "energy (-logsumexp)", "image-logreg": "**image-logreg**"}[name]
        lines.append(
            f"| {label} | {row['auroc']:.4f} | {row['mnist_kept']:.2%} | {row['fashion_rejected']:.2%} | {row['noise']:.2%} "
            f"| {row['dot']:.2%} | {row['scribble']:.2%} | {row['user digits']:.2%} | {r['reverse_auroc'][name]:.4f} |"
        )
    ours = rows["image-logreg"]
    lines += [
        "",
        "| target (image-logreg) | measured | met |",
        "|---|---|---|",
        f"| AUROC MNIST vs Fashion >= {TARGETS['auroc']} | {ours['auroc']:.4f} | {met(ours['auroc'] >= TARGETS['auroc'])} |",
        f"| Fashion rejected >= 95% while MNIST test kept >= 99% | {ours['fashion_rejected']:.2%}, {ours['mnist_kept']:.2%} | "
        f"{met(ours['fashion_rejected'] >= TARGETS['fashion_rejected'] and ours['mnist_kept'] >= TARGETS['mnist_kept'])} |",
    ]
    for label in ("noise", "dot", "scribble"):
        lines.append(f"| {label} rejected >= 99% | {ours[label]:.2%} | {met(ours[label] >= TARGETS['odd_rejected'])} |")
    lines += [
        f"| user-style digits rejected <= 2% | {ours['user digits']:.2%} | {met(ours['user digits'] <= TARGETS['user_rejected'])} |",
        f"| Fashion model, AUROC Fashion vs MNIST >= {TARGETS['reverse_auroc']} | {r['reverse_auroc']['image-logreg']:.4f} | "
        f"{met(r['reverse_auroc']['image-logreg'] >= TARGETS['reverse_auroc'])} |",
        "",
        "| calibration, test split | temperature | ECE before | ECE after | target ECE <= 0.01 "
        "| temperature fitted to the test split's NLL, and its ECE |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, c in r["calibration"].items():
        lines.append(f"| {name} | {c['temperature']:.3f} | {c['before']:.4f} | {c['after']:.4f} | {met(c['after'] <= TARGETS['ece'])} "
                     f"| {c['test_temperature']:.3f}, {c['test_fitted']:.4f} |")
    lines += ["", "The last column is the best a temperature fitted to the negative log-likelihood can do: one fitted "
              "on the test split itself."]
    refused = r["refused_by_preprocessing"]
    lines += ["", "Files refused by preprocessing as blank count as rejected: "
              + ", ".join(f"{label} {n}" for label, n in refused.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--keep", type=float, default=0.99)
    parser.add_argument("--update-results", action="store_true", help="replace this benchmark's blocks in benchmarks/results.md and the documentation (docs/)")
    args = parser.parse_args(argv)
    table = render(measure(args.data_dir, args.keep))
    if args.update_results:
        replace_block(ROOT / "benchmarks" / "results.md", "ood", table, title="Knowing when it does not know: `benchmarks/ood.py`")
        replace_block(ROOT / "docs" / "predicting.md", "ood-results", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
