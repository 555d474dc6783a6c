"""MNIST as a folder of PNG files trains to the test accuracy MNIST's own files give.

    python benchmarks/folder_parity.py --data-dir ../shared/data [--folder /tmp/mnist-png] [--seeds 5] [--update-results]

The folder (``benchmarks/export_folder.py``: 70,000 PNG files in ``train/`` and ``test/``) holds
the same images as the IDX files, in another order: class by class, files sorted by name. So a
seeded validation split holds out other images and the two runs' weights differ; what must
agree is the test accuracy. For each seed, both are trained with the defaults and with
``--val-fraction 0`` (every training image: the same set in both) and evaluated on the 10,000
test images. Target: the mean test accuracies over the seeds within 0.002, for both settings.

Exit status 1 if the target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import machine, replace_block  # noqa: E402

TARGET = 0.002
SETTINGS = {"defaults": {}, "`--val-fraction 0`": {"val_fraction": 0.0}}


def test_accuracy(dataset: str, data_dir: str, out: Path, cache: Path, seed: int, extra: dict) -> float:
    from image_logreg.checkpoint import load_model
    from image_logreg.run import eval_data, evaluate_model, train_run

    config = {"dataset": dataset, "data_dir": data_dir, "seed": seed, "download": False, **extra}
    if dataset == "folder":
        config["cache_dir"] = str(cache)
    train_run(config, out, overwrite=True)
    model, meta = load_model(out)
    return evaluate_model(model, meta, eval_data(meta, "test", data_dir, out, download=False))["accuracy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--folder", default=None, help="an exported MNIST folder (default: export one into a temporary folder)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="export only the first N images of each split: a check of the script, whose figures then mean nothing")
    parser.add_argument("--update-results", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="folder-parity-") as tmp:
        work = Path(tmp)
        folder = Path(args.folder) if args.folder else work / "png"
        if not args.folder:
            from export_folder import main as export_main

            limit = ["--limit", str(args.limit)] if args.limit else []
            if export_main([str(folder), "--data-dir", args.data_dir, *limit]) != 0:
                raise SystemExit("exporting the folder failed")
        results = {}
        for name, extra in SETTINGS.items():
            for seed in range(args.seeds):
                for dataset, data_dir in (("mnist", args.data_dir), ("folder", str(folder))):
                    accuracy = test_accuracy(dataset, data_dir, work / f"{dataset}-{seed}", work / "cache", seed, extra)
                    results.setdefault(name, {}).setdefault(dataset, []).append(accuracy)
                print(f"{name}, seed {seed}: mnist {results[name]['mnist'][-1]:.4f}, folder {results[name]['folder'][-1]:.4f}",
                      flush=True)

    met = True
    lines = [
        f"Measured {date.today().isoformat()} on {machine('torch')}.",
        "Reproduce: `python benchmarks/folder_parity.py --data-dir ../shared/data --update-results` "
        f"(exports the 70,000 files to a temporary folder; {args.seeds} seeds, 0..{args.seeds - 1}).",
        "",
        "| settings | `--dataset mnist` | `--dataset folder` | mean difference | target |",
        "|---|---|---|---:|---|",
    ]
    for name, by_dataset in results.items():
        mnist, folder_acc = by_dataset["mnist"], by_dataset["folder"]
        diff = statistics.mean(folder_acc) - statistics.mean(mnist)
        met &= abs(diff) <= TARGET
        each = lambda values: f"{statistics.mean(values):.4f} ({', '.join(f'{v:.4f}' for v in values)})"
        lines.append(f"| {name} | {each(mnist)} | {each(folder_acc)} | {diff:+.4f} | "
                     f"within {TARGET}: {'met' if abs(diff) <= TARGET else '**not met**'} |")
    largest = max(abs(f - m) for r in results.values() for m, f in zip(r["mnist"], r["folder"]))
    lines += [
        "",
        f"Test accuracy on MNIST's 10,000 test images: the mean over the seeds, and each seed's in brackets. "
        f"The largest difference for one seed is {largest:.4f}: with the defaults, a seed holds out other "
        "images for validation in the two orders, so single runs differ as runs with two seeds do.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.update_results:
        replace_block(ROOT / "benchmarks" / "results.md", "parity", text,
                      title="A folder of PNG files vs the IDX files: `benchmarks/folder_parity.py`")
        replace_block(ROOT / "docs" / "own-images.md", "parity-results", text)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
