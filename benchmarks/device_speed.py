"""The same work on the CPU and on a CUDA GPU, side by side, in one process.

    python benchmarks/device_speed.py --data-dir ../shared/data [--devices cpu,cuda] [--repeats 3] [--json PATH]

Measures, on each device (cuda only where one is available):
1. one epoch at the tutorial's settings (SGD, lr 0.001, batch 100, constant; training pass +
   validation pass on the seeded 48k/12k split), median of ``--repeats``;
2. the defaults (``TrainConfig()``: Adam, 5 epochs): fit time, median of ``--repeats``, and the
   test accuracy (target: >= 0.925);
3. L-BFGS to convergence (``--optimizer lbfgs --weight-decay 1e-4``, up to 50 steps): seconds,
   iterations, whether it converged, test accuracy;
4. deskewing all 70,000 MNIST images (uint8, already on the device), median of ``--repeats``;
and, once, the move of those images to the device as floats, which training does once per run.

Every device is warmed up first (a GPU's first calls load kernels and grow the allocator), and
GPU timings wait for the device (``torch.cuda.synchronize``) before the clock is read. Prints a
Markdown table: one row per measure, a column per device, and the speed-up of cuda over cpu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import machine  # noqa: E402

from image_logreg import LogisticRegression, TrainConfig, fit, load_split, split_indices, to_float  # noqa: E402
from image_logreg.deskew import deskew  # noqa: E402
from image_logreg.settings import PRESETS  # noqa: E402

TARGET = 0.925
TUTORIAL = TrainConfig.from_dict(dict(PRESETS["tutorial"], epochs=1))
LBFGS = dict(optimizer="lbfgs", weight_decay=1e-4, epochs=50)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work):
    """``(seconds, result)`` of ``work()``, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - start, result


def load(data_dir, quick: bool) -> dict:
    """MNIST's uint8 images and labels, the tutorial's seeded 80/20 split of the training set."""
    train = load_split("mnist", data_dir, "train", download=False)
    test = load_split("mnist", data_dir, "test", download=False)
    images, labels, test_images, test_labels = train.images, train.labels, test.images, test.labels
    if quick:
        images, labels, test_images, test_labels = images[:3000], labels[:3000], test_images[:1000], test_labels[:1000]
    train_idx, val_idx = split_indices(len(images), 0.2, 0)
    return {"images": images, "labels": labels, "test_images": test_images, "test_labels": test_labels,
            "train_idx": train_idx, "val_idx": val_idx}


def on_device(data: dict, device: torch.device) -> dict:
    """The split as float tensors on ``device``, moved there once, as ``image-logreg train`` does."""
    x, y = to_float(data["images"], device), data["labels"].to(device)
    train_idx, val_idx = data["train_idx"].to(device), data["val_idx"].to(device)
    return {
        "x_train": x[train_idx], "y_train": y[train_idx], "x_val": x[val_idx], "y_val": y[val_idx],
        "x_test": to_float(data["test_images"], device), "y_test": data["test_labels"].to(device),
    }


def train(t: dict, cfg: TrainConfig, device: torch.device):
    torch.manual_seed(cfg.seed)
    model = LogisticRegression().to(device)
    seconds, history = timed(device, lambda: fit(model, t["x_train"], t["y_train"], t["x_val"], t["y_val"], cfg))
    return seconds, history, model.score(t["x_test"], t["y_test"])


def measure(data: dict, device: torch.device, repeats: int) -> dict:
    all_images = torch.cat([data["images"], data["test_images"]])
    move_seconds, t = timed(device, lambda: on_device(data, device))
    images = all_images.to(device)
    # warm-up: kernels, allocator, thread pools
    train(t, TUTORIAL, device)
    timed(device, lambda: deskew(images[:1024]))

    epochs = [train(t, TUTORIAL, device) for _ in range(repeats)]
    defaults = [train(t, TrainConfig(), device) for _ in range(repeats)]
    try:
        lbfgs_seconds, lbfgs_history, lbfgs_acc = train(t, TrainConfig(**LBFGS), device)
        last = lbfgs_history[-1]
        lbfgs = {"lbfgs_seconds": lbfgs_seconds, "lbfgs_iterations": last["iterations"],
                 "lbfgs_converged": bool(last["converged"]), "lbfgs_test_accuracy": lbfgs_acc}
    except RuntimeError as exc:  # one failed measure must not cost the others (a GPU run is rare)
        print(f"L-BFGS on {device} failed: {exc}", file=sys.stderr)
        lbfgs = {"lbfgs_seconds": None, "lbfgs_iterations": None, "lbfgs_converged": None,
                 "lbfgs_test_accuracy": None, "lbfgs_error": str(exc)}
    deskews = [timed(device, lambda: deskew(images))[0] for _ in range(repeats)]
    return {
        "move_images_seconds": move_seconds,
        "tutorial_epoch_seconds": statistics.median(s for s, _, _ in epochs),
        "tutorial_epoch_val_accuracy": epochs[-1][1][-1]["val_accuracy"],
        "defaults_fit_seconds": statistics.median(s for s, _, _ in defaults),
        "defaults_epochs": len(defaults[-1][1]),
        "defaults_test_accuracy": defaults[-1][2],
        **lbfgs,
        "deskew_seconds": statistics.median(deskews),
        "deskew_images": len(images),
    }


# (label, key, how a value is shown, whether the row is a time and gets a speed-up)
ROWS = [
    ("one epoch, tutorial settings (SGD, lr 0.001, batch 100; train + validation pass)", "tutorial_epoch_seconds", "{:.3f} s", True),
    ("defaults (Adam, {defaults_epochs} epochs): fit time", "defaults_fit_seconds", "{:.3f} s", True),
    ("defaults: test accuracy (target >= 0.925)", "defaults_test_accuracy", "{:.4f}", False),
    ("L-BFGS, weight decay 1e-4, to convergence (or float32's floor): fit time", "lbfgs_seconds", "{:.2f} s", True),
    ("L-BFGS: iterations", "lbfgs_iterations", "{}", False),
    ("L-BFGS: converged", "lbfgs_converged", "{}", False),
    ("L-BFGS: test accuracy", "lbfgs_test_accuracy", "{:.4f}", False),
    ("deskew all {deskew_images:,} images (uint8 on the device)", "deskew_seconds", "{:.3f} s", True),
    ("training images to floats on the device, split (once a run)", "move_images_seconds", "{:.3f} s", True),
]


def speedup(figures: dict[str, dict], key: str) -> float | None:
    cpu, cuda = figures["cpu"][key], figures["cuda"][key]
    return cpu / cuda if cpu and cuda else None


def table(figures: dict[str, dict]) -> str:
    devices = list(figures)
    both = "cpu" in figures and "cuda" in figures
    head = "| | " + " | ".join(devices) + (" | speed-up |" if both else " |")
    rule = "|---|" + "---:|" * (len(devices) + both)
    lines = [head, rule]
    first = next(iter(figures.values()))
    for label, key, fmt, is_time in ROWS:
        cells = ["failed" if figures[d][key] is None else fmt.format(figures[d][key]) for d in devices]
        if both:
            cells.append(f"{speedup(figures, key):.1f}x" if is_time and speedup(figures, key) else "")
        lines.append(f"| {label.format(**first)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--devices", default=None,
                        help="comma-separated, from cpu and cuda (default: cpu, and cuda where one is available)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3,000 training and 1,000 test images: a check that it runs")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    unknown = [d for d in devices if d not in ("cpu", "cuda")]
    if unknown:
        parser.error(f"unknown device(s) {', '.join(unknown)}; choose from cpu, cuda")
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device here: measuring the CPU only", file=sys.stderr)
        devices = [d for d in devices if d != "cuda"]

    data = load(args.data_dir, args.quick)
    figures = {}
    for name in devices:
        print(f"measuring on {name} ...", file=sys.stderr, flush=True)
        figures[name] = measure(data, torch.device(name), args.repeats)

    result = {
        "date": date.today().isoformat(),
        "machine": machine("torch"),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if "cuda" in figures else None,
        "quick": args.quick,
        "repeats": args.repeats,
        "figures": figures,
    }
    if "cpu" in figures and "cuda" in figures:
        result["speedup"] = {key: speedup(figures, key) for _, key, _, is_time in ROWS if is_time}
    gpu = f"; GPU {result['gpu']}" if result["gpu"] else ""
    print(f"Measured {result['date']} on {result['machine']}{gpu}{' (--quick subsets)' if args.quick else ''}.")
    print(f"Times are medians of {args.repeats} after a warm-up, except L-BFGS (one run).\n")
    print(table(figures))
    missed = [d for d, f in figures.items() if not args.quick and f["defaults_test_accuracy"] < TARGET]
    if missed:
        print(f"\nthe defaults missed {TARGET} test accuracy on: {', '.join(missed)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
