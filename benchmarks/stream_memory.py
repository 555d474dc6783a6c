"""Training on a set larger than memory as floats: peak memory and epoch time, streamed vs in memory.

    python benchmarks/stream_memory.py --data-dir ../shared/data [--work /tmp/stream-bench] [--gib 4] [--update-results]

1. Writes a generated training set of at least ``--gib`` GiB of uint8 pixels in MNIST's layout
   (``WORK/big/MNIST/raw``: MNIST's 60,000 training digits repeated, each copy shifted by up to
   two pixels (25 shifts, in turn); MNIST's own test files beside them). As float32 it would
   take four times that. It is written once and reused while its size is right.
2. Trains one epoch on it with ``--max-memory 1G`` in a fresh process (batches gathered from the
   file, one pread a row), and reads that process's peak resident memory (``VmHWM``) as it ends.
   Target: under 1.5 GiB.
3. Same run, a set that fits: MNIST's 60,000 training images, 3 epochs in memory and 3 epochs
   streamed (``--max-memory 1M`` forces it), alternating; the median epoch time of each. Target:
   streamed at most 2x the in-memory epoch. The two runs' weights must be identical.

Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import machine, replace_block  # noqa: E402

TARGETS = {"peak_gib": 1.5, "epoch_ratio": 2.0}
HEADER = 16  # an IDX image file's header: magic and three sizes
CHUNK = 20_000  # images generated and written at a time, so the generator itself stays small

# Runs the command line in this process and reports the process's peak memory as it ends.
CHILD = """
import json, sys
from image_logreg.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read().split("\\n")
peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "peak_kib": peak}), file=sys.stderr)
sys.exit(code)
"""


def write_big_set(mnist_raw: Path, out: Path, gib: float) -> int:
    """MNIST's training digits, repeated and shifted, to at least ``gib`` GiB; returns the image count."""
    raw = out / "MNIST" / "raw"
    images = np.fromfile(mnist_raw / "train-images-idx3-ubyte", dtype=np.uint8, offset=HEADER).reshape(-1, 28, 28)
    labels = np.fromfile(mnist_raw / "train-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    n = math.ceil(gib * (1 << 30) / (28 * 28) / len(images)) * len(images)
    image_file, label_file = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if image_file.is_file() and image_file.stat().st_size == HEADER + n * 784 and label_file.is_file():
        return n
    raw.mkdir(parents=True, exist_ok=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copyfile(mnist_raw / name, raw / name)
    shifts = [(dy, dx) for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2)]
    with open(image_file, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            copy, first = divmod(start, len(images))
            dy, dx = shifts[copy % len(shifts)]
            rows = np.arange(first, first + (stop - start)) % len(images)
            f.write(np.roll(images[rows], (dy, dx), axis=(1, 2)).tobytes())
    with open(label_file, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big"))
        f.write(np.tile(labels, n // len(labels)).tobytes())
    return n


def train(data_dir: Path, out: Path, *flags: str) -> dict:
    """One ``image-logreg train`` in a fresh process: its summary, peak memory and epoch times."""
    argv = ["train", "--data-dir", str(data_dir), "--out", str(out), "--overwrite", "--quiet", "--json", "--no-download", *flags]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"training failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    summary = json.loads(proc.stdout)
    history = json.loads((out / "history.json").read_text())
    config = json.loads((out / "config.json").read_text())
    return {"summary": summary, "peak_gib": report["peak_kib"] / (1 << 20), "wall": wall,
            "epochs": [h["seconds"] for h in history], "streamed": config.get("streamed")}


def weights(run: Path):
    from safetensors.numpy import load_file

    return load_file(str(run / "model.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("IMAGE_LOGREG_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--work", default="/tmp/stream-bench", help="where the generated set and runs go")
    parser.add_argument("--gib", type=float, default=4.0, help="size of the generated set's uint8 pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--update-results", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    mnist_raw = Path(args.data_dir) / "MNIST" / "raw"

    n = write_big_set(mnist_raw, work / "big", args.gib)
    big = train(work / "big", work / "run-big", "--epochs", "1", "--val-fraction", "0.01", "--max-memory", "1G")
    print(f"generated set: {n:,} images, {n * 784 / (1 << 30):.2f} GiB uint8 ({n * 784 * 4 / (1 << 30):.1f} GiB as float32); "
          f"one streamed epoch {big['epochs'][0]:.1f} s, peak memory {big['peak_gib']:.2f} GiB", flush=True)

    flags = ["--epochs", str(args.repeats)]
    in_memory, streamed = [], []
    for _ in range(2):  # alternating, so a machine that gets busier slows both alike
        in_memory.append(train(Path(args.data_dir), work / "run-memory", *flags))
        streamed.append(train(Path(args.data_dir), work / "run-streamed", *flags, "--max-memory", "1M"))
    assert not in_memory[0]["streamed"] and streamed[0]["streamed"], "the runs did not take the paths asked for"
    memory_epoch = statistics.median(e for r in in_memory for e in r["epochs"])
    stream_epoch = statistics.median(e for r in streamed for e in r["epochs"])
    a, b = weights(work / "run-memory"), weights(work / "run-streamed")
    max_diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    ratio = stream_epoch / memory_epoch

    checks = {
        "peak memory, streaming the generated set": (f"{big['peak_gib']:.2f} GiB (< {TARGETS['peak_gib']} GiB)",
                                                     big["peak_gib"] < TARGETS["peak_gib"]),
        "streamed epoch vs in-memory epoch (MNIST)": (f"{ratio:.2f}x (<= {TARGETS['epoch_ratio']}x)", ratio <= TARGETS["epoch_ratio"]),
        "weights, streamed vs in memory": (f"max abs difference {max_diff:g} (identical)", max_diff == 0.0),
    }
    text = "\n".join([
        f"Measured {date.today().isoformat()} on {machine('torch')}.",
        f"Reproduce: `python benchmarks/stream_memory.py --data-dir ../shared/data --update-results` "
        f"(writes {n * 784 / (1 << 30):.1f} GiB under `--work`, default /tmp/stream-bench).",
        "",
        "| run | images | epoch | peak memory |",
        "|---|---:|---:|---:|",
        f"| generated set, streamed (`--max-memory 1G`; {n * 784 * 4 / (1 << 30):.1f} GiB as floats) | {n:,} | "
        f"{big['epochs'][0]:.1f} s | {big['peak_gib']:.2f} GiB |",
        f"| MNIST, in memory | 60,000 | {memory_epoch:.3f} s | {statistics.median(r['peak_gib'] for r in in_memory):.2f} GiB |",
        f"| MNIST, streamed (`--max-memory 1M`) | 60,000 | {stream_epoch:.3f} s | {statistics.median(r['peak_gib'] for r in streamed):.2f} GiB |",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {name} | {measured} | {'yes' if met else '**no**'} |" for name, (measured, met) in checks.items()),
        "",
        "Epoch: one training pass and one validation pass, the median over the runs' epochs. Peak memory: the "
        "training process's peak resident set size, read as it ends. The generated set is read from the page "
        "cache: from a cold disk, an epoch takes as long as the disk needs to read it.",
    ])
    print(text)
    if args.update_results:
        replace_block(ROOT / "benchmarks" / "results.md", "stream", text, title="Streaming a set larger than memory: `benchmarks/stream_memory.py`")
        replace_block(ROOT / "docs" / "scaling.md", "stream-results", text)
    return 0 if all(met for _, met in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
