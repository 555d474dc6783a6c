"""Where image-logreg stands against what a user would otherwise pick, measured in one run.

    python benchmarks/compare.py --data-dir ../shared/data            # full run, a few minutes
    python benchmarks/compare.py --data-dir ../shared/data --quick    # small subsets, seconds

Measures, on this machine and in this one process (scikit-learn in a child process, see below):
1. seconds per epoch with the tutorial's settings: the tutorial's own pipeline vs image-logreg;
2. fit time to >= 0.925 MNIST test accuracy: image-logreg defaults vs scikit-learn's
   ``LogisticRegression()`` on the same 60k images (data loading timed separately);
3. best test accuracy on MNIST and Fashion-MNIST: the tutorial's settings for 30 epochs,
   scikit-learn, image-logreg on raw pixels, image-logreg with ``--deskew``;
4. a fresh ``image-logreg train`` process end to end, with ``python -c "import torch"`` timed
   beside it, so that a one-off cost (an import, a first call) cannot hide inside a figure.

Writes ``benchmarks/results.md`` (or ``--out``) and, with ``--update-readme``, the results table in
``docs/speed.md``. scikit-learn runs in a child process without the OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE overrides some machines set, so it gets its fastest BLAS kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import epoch_speed  # noqa: E402  (the tutorial's pipeline, reproduced)
from sections import cpu_name, replace_block, vendor  # noqa: E402

from image_logreg import LogisticRegression, TrainConfig, fit, load_split, split_indices  # noqa: E402
from image_logreg.data import prepare_inputs, preprocessing_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.925
TUTORIAL = TrainConfig(optimizer="sgd", lr=0.001, batch_size=100, schedule="constant", epochs=30)
DATASETS = ("mnist", "fashion-mnist")


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(), "date": date.today().isoformat()}


def load(dataset: str, data_dir, quick: bool):
    """Train and test uint8 images and labels; ``quick`` keeps small slices."""
    start = time.perf_counter()
    train = load_split(dataset, data_dir, "train", download=False)
    test = load_split(dataset, data_dir, "test", download=False)
    seconds = time.perf_counter() - start
    if quick:
        return (train.images[:3000], train.labels[:3000], test.images[:1000], test.labels[:1000]), seconds
    return (train.images, train.labels, test.images, test.labels), seconds


SHORT_FIT = 2.0  # seconds: a fit this short is a snapshot of a noisy machine, so it is timed again


def image_logreg_fit(data, cfg: TrainConfig, deskew: bool = False, repeats: int = 1) -> dict:
    """Train as ``image-logreg train`` does (seeded 20% validation split) and score on test; a
    fit shorter than ``SHORT_FIT`` is timed ``repeats`` times (the same seeded fit: median taken)."""
    images, labels, test_images, test_labels = data
    start = time.perf_counter()
    preprocessing = preprocessing_for(deskew)
    x, xt = prepare_inputs(images, preprocessing), prepare_inputs(test_images, preprocessing)
    prep_seconds = time.perf_counter() - start
    train_idx, val_idx = split_indices(len(x), 0.2, cfg.seed)
    # the split is data preparation, as scikit-learn's x is: outside the timed fit
    x_train, y_train, x_val, y_val = x[train_idx], labels[train_idx], x[val_idx], labels[val_idx]
    times = []
    while not times or (len(times) < repeats and max(times) < SHORT_FIT):
        torch.manual_seed(cfg.seed)
        model = LogisticRegression(tuple(images.shape[1:]), 10)
        start = time.perf_counter()
        history = fit(model, x_train, y_train, x_val, y_val, cfg)
        times.append(time.perf_counter() - start)
    return {
        "fit_seconds": statistics.median(times),
        "fits_timed": len(times),
        "prep_seconds": prep_seconds,
        "epochs": len(history),
        "val_accuracy": history[-1]["val_accuracy"],
        "test_accuracy": model.score(xt, test_labels),
    }


def sklearn_fit(dataset: str, data_dir, quick: bool) -> dict:
    """scikit-learn's ``LogisticRegression()`` on all training images, in a child process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    cmd = [sys.executable, __file__, "--sklearn-worker", dataset, "--data-dir", str(data_dir)] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"scikit-learn run failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout)


def sklearn_worker(dataset: str, data_dir, quick: bool) -> None:
    import warnings

    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression
    from threadpoolctl import threadpool_info

    (images, labels, test_images, test_labels), _ = load(dataset, data_dir, quick)
    start = time.perf_counter()
    x = images.reshape(len(images), -1).numpy() / 255.0
    xt = test_images.reshape(len(test_images), -1).numpy() / 255.0
    prep_seconds = time.perf_counter() - start
    clf = SkLogisticRegression()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, labels.numpy())
    fit_seconds = time.perf_counter() - start
    blas = sorted({f"{i.get('internal_api')} {i.get('architecture', '')}".strip() for i in threadpool_info() if i.get("user_api") == "blas"})
    print(json.dumps({
        "fit_seconds": fit_seconds,
        "prep_seconds": prep_seconds,
        "test_accuracy": float(clf.score(xt, test_labels.numpy())),
        "iterations": int(max(clf.n_iter_)),
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "sklearn": sklearn.__version__,
        "blas": ", ".join(blas),
    }))


def fresh_process(data_dir, quick: bool, repeats: int) -> dict:
    """Wall time of ``image-logreg train --json`` with the defaults, and of ``import torch`` (also
    with the exit image-logreg's commands take, ``gc.freeze()``), each a new process, taken in
    turns (medians); the summary's ``seconds`` against its epochs' sum."""
    cli = [sys.executable, "-m", "image_logreg", "train", "--data-dir", str(data_dir), "--json", "--quiet", "--no-download"]
    cli += ["--train-subset", "3000"] if quick else []
    walls, imports, frozen, summaries = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="compare-") as scratch:
        for k in range(repeats):
            imports.append(_wall([sys.executable, "-c", "import torch"]))
            frozen.append(_wall([sys.executable, "-c", "import gc, torch; gc.freeze()"]))
            out = Path(scratch) / f"run{k}"
            start = time.perf_counter()
            done = subprocess.run([*cli, "--out", str(out)], capture_output=True, text=True, check=False)
            walls.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise SystemExit(f"image-logreg train failed: {done.stderr.strip()[-500:]}")
            summaries.append(json.loads(done.stdout))
    seconds = [s["seconds"] for s in summaries]
    epochs = [sum(e["seconds"] for e in s["history"]) for s in summaries]
    return {
        "wall_seconds": statistics.median(walls),
        "import_torch_seconds": statistics.median(imports),
        "import_torch_frozen_seconds": statistics.median(frozen),
        "train_seconds": statistics.median(seconds),
        "epochs_seconds": statistics.median(epochs),
        "overhead_seconds": max(s - e for s, e in zip(seconds, epochs)),
        "repeats": repeats,
    }


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def run(data_dir, quick: bool, repeats: int, process_repeats: int) -> dict:
    results = {"machine": machine(), "quick": quick}
    log("a fresh image-logreg train process, and import torch ...")
    results["fresh_process"] = fresh_process(data_dir, quick, process_repeats)
    log("epoch speed, tutorial settings ...")
    results["epoch_speed"] = epoch_speed.main(["--data-dir", str(data_dir), "--repeats", str(repeats), "--quiet"])

    tutorial = TUTORIAL if not quick else TrainConfig(**{**TUTORIAL.to_dict(), "epochs": 2})
    results["datasets"] = {}
    for dataset in DATASETS:
        data, load_seconds = load(dataset, data_dir, quick)
        row = {"load_seconds": load_seconds}
        log(f"{dataset}: image-logreg defaults ...")
        row["image_logreg"] = image_logreg_fit(data, TrainConfig(), repeats=repeats)
        log(f"{dataset}: image-logreg --deskew ...")
        row["image_logreg_deskew"] = image_logreg_fit(data, TrainConfig(), deskew=True, repeats=repeats)
        log(f"{dataset}: image-logreg --optimizer lbfgs --weight-decay 1e-4 ...")
        row["image_logreg_lbfgs"] = image_logreg_fit(data, TrainConfig(optimizer="lbfgs", epochs=40, weight_decay=1e-4))
        log(f"{dataset}: tutorial settings, {tutorial.epochs} epochs ...")
        row["tutorial"] = image_logreg_fit(data, tutorial)
        log(f"{dataset}: scikit-learn LogisticRegression() ...")
        row["sklearn"] = sklearn_fit(dataset, data_dir, quick)
        results["datasets"][dataset] = row
    mnist = results["datasets"]["mnist"]
    results["fit_ratio_vs_sklearn"] = mnist["sklearn"]["fit_seconds"] / mnist["image_logreg"]["fit_seconds"]
    results["process_ratio_vs_sklearn"] = mnist["sklearn"]["fit_seconds"] / results["fresh_process"]["train_seconds"]
    return results


def data_epochs(results: dict) -> int:
    return results["datasets"]["mnist"]["image_logreg"]["epochs"]


def render(results: dict) -> str:
    m, speed, mnist, fresh = results["machine"], results["epoch_speed"], results["datasets"]["mnist"], results["fresh_process"]
    ours, sk = mnist["image_logreg"], mnist["sklearn"]
    quick = " (`--quick`: small subsets, figures not comparable)" if results["quick"] else ""
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}{quick}.",
        "Reproduce: `python benchmarks/compare.py --data-dir ../shared/data --update-readme`.",
        "",
        "| | tutorial pipeline | image-logreg | ratio |",
        "|---|---:|---:|---:|",
        f"| one epoch, tutorial settings (SGD, lr 0.001, batch 100; train + validation pass) | "
        f"{speed['tutorial_seconds']:.3f} s | {speed['image_logreg_seconds']:.3f} s | **{speed['ratio']:.1f}x** |",
        "",
        "Where an image-logreg epoch spends its time (torch profiler, self CPU time on every thread: "
        "the steps' own and the one gathering their batches): "
        + ", ".join(f"`{row['op']}` {row['share']:.0%}" for row in speed["profile"]) + ".",
        "",
        f"| MNIST, fit to >= {TARGET} test accuracy | scikit-learn `LogisticRegression()` | image-logreg defaults | ratio |",
        "|---|---:|---:|---:|",
        f"| fit time | {sk['fit_seconds']:.2f} s ({sk['iterations']} L-BFGS iterations) | "
        f"{ours['fit_seconds']:.2f} s ({ours['epochs']} epochs; median of {ours['fits_timed']} fits) | "
        f"**{results['fit_ratio_vs_sklearn']:.1f}x** |",
        f"| test accuracy | {sk['test_accuracy']:.4f} | {ours['test_accuracy']:.4f} | |",
        f"| data loading (not in fit time) | {mnist['load_seconds'] + sk['prep_seconds']:.2f} s | "
        f"{mnist['load_seconds'] + ours['prep_seconds']:.2f} s | |",
        "",
        f"A fresh `image-logreg train --json` process with the defaults (median of {fresh['repeats']}, each a new process, "
        "taken in turns with `python -c \"import torch\"`):",
        "",
        "| | seconds | target | met |",
        "|---|---:|---:|---|",
        f"| `python -c \"import torch\"` | {fresh['import_torch_seconds']:.2f} | (the floor) | |",
        f"| the same, ending as image-logreg's commands do (`gc.freeze()`: no last collections) | "
        f"{fresh['import_torch_frozen_seconds']:.2f} | | |",
        f"| `image-logreg train`, wall time of the whole process | {fresh['wall_seconds']:.2f} | "
        f"<= import torch + 2 = {fresh['import_torch_seconds'] + 2:.2f} | {_met(fresh['wall_seconds'] <= fresh['import_torch_seconds'] + 2)} |",
        f"| its `seconds` (fit) less the sum of its epochs' | {fresh['overhead_seconds']:.2f} | <= 0.30 | {_met(fresh['overhead_seconds'] <= 0.3)} |",
        f"| scikit-learn's fit time over that process's `seconds` | **{results['process_ratio_vs_sklearn']:.1f}x** | >= 30x | "
        f"{_met(results['process_ratio_vs_sklearn'] >= 30)} |",
        "",
        "| test accuracy | MNIST | Fashion-MNIST | fit time (MNIST) |",
        "|---|---:|---:|---:|",
    ]
    rows = [
        ("tutorial settings, 30 epochs" if not results["quick"] else "tutorial settings, 2 epochs", "tutorial"),
        ("scikit-learn `LogisticRegression()`", "sklearn"),
        (f"image-logreg defaults (Adam, {data_epochs(results)} epochs)", "image_logreg"),
        ("image-logreg `--optimizer lbfgs --weight-decay 1e-4`", "image_logreg_lbfgs"),
        ("image-logreg `--deskew`", "image_logreg_deskew"),
    ]
    data = results["datasets"]
    for label, key in rows:
        lines.append(
            f"| {label} | {data['mnist'][key]['test_accuracy']:.4f} | {data['fashion-mnist'][key]['test_accuracy']:.4f} "
            f"| {data['mnist'][key]['fit_seconds']:.2f} s |"
        )
    lines += [
        "",
        f"scikit-learn {sk['sklearn']} ran with BLAS {sk['blas'] or 'unknown'}"
        f"{'' if sk['converged'] else ' and stopped at its default max_iter=100 before converging'}. "
        "The tutorial-settings row runs the tutorial's model, loss, optimizer and batch size through "
        "image-logreg (same arithmetic, faster pipeline); the epoch timing above runs the tutorial's own code.",
    ]
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--quick", action="store_true", help="small subsets: checks the script, not the figures")
    parser.add_argument("--repeats", type=int, default=3, help="epoch-speed repeats, and timings of each short fit (median taken)")
    parser.add_argument("--process-repeats", type=int, default=9, help="fresh processes of each kind (median taken)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.md"))
    parser.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    parser.add_argument("--update-readme", action="store_true", help="replace the results table in docs/speed.md")
    parser.add_argument("--sklearn-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sklearn_worker:
        sklearn_worker(args.sklearn_worker, args.data_dir, args.quick)
        return 0

    results = run(args.data_dir, args.quick, args.repeats if not args.quick else 1, args.process_repeats if not args.quick else 1)
    table = render(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_block(out, f"compare-{vendor()}", table)  # the other benchmarks' and CPUs' blocks stay as they are
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.update_readme:
        replace_block(ROOT / "docs" / "speed.md", f"results-{vendor()}", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
