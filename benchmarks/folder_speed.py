"""Loading a folder of image files: image-logreg against the torchvision pipeline a user would write.

    python benchmarks/folder_speed.py                              # exports MNIST as PNG files first
    python benchmarks/folder_speed.py --folder /tmp/mnist-png      # or uses an export of your own
    python benchmarks/folder_speed.py --folder /tmp/mnist-png --update-results

The folder is in ImageFolder layout with ``train/`` and ``test/`` (``benchmarks/export_folder.py``
writes MNIST so: 70,000 PNG files). Each measurement is a fresh Python process, so each starts
cold and has its own peak memory; the runs are interleaved, so a machine that gets busier slows
all alike, and the median of ``--repeats`` (3) is taken, after one untimed load that brings the
files into the page cache for every row alike:

- torchvision: ``ImageFolder`` of ``train/`` and of ``test/`` with
  ``Compose([Grayscale(), ToTensor()])``, one full pass of ``DataLoader(batch_size=256)``
  with ``num_workers=0`` (the plain pipeline; the reference all ratios are taken against), and
  as a further row the same with ``num_workers=2``;
- image-logreg, first load: ``datasets.folder.load_splits("folder", FOLDER, ("train", "test"))``
  into a fresh, empty cache folder (every file listed, stat'ed and decoded; the cache written);
- image-logreg, cached load: the same call with that cache in place (every file listed and
  stat'ed, so a changed file is still noticed; the decoded images read from the cache).

Each is timed from the call, after the libraries are imported, up to the last image in memory:
the DataLoader's last batch, or every page of image-logreg's (memory-mapped) images touched.
Peak memory is the process's peak resident set size, and its largest worker process's (the
DataLoader's workers; image-logreg decodes in one process per core).

Targets: the first load at least 2x faster than the torchvision pass, the cached load at least
20x faster. Exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import machine, replace_block  # noqa: E402

TARGETS = {"first_load": 2.0, "cached_load": 20.0}  # times faster than the torchvision pass
REFERENCE = "torchvision"
LABELS = {
    "torchvision": "torchvision `ImageFolder` + `DataLoader(batch_size=256)`, `num_workers=0`",
    "torchvision_workers2": "the same, `num_workers=2`",
    "first_load": "image-logreg, first load (decode, write the cache)",
    "cached_load": "image-logreg, cached load",
}


# --- one measurement, in its own process ---------------------------------------------------


def child(which: str, folder: str, cache_dir: str) -> dict:
    """Run one load in this (fresh) process; its seconds, image count and peak memory."""
    import torch  # noqa: F401  (both pipelines need it: imported before the clock starts)

    watcher = _WorkerWatch()

    if which.startswith("torchvision"):
        from torch.utils.data import DataLoader
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        workers = 2 if which == "torchvision_workers2" else 0
        transform = transforms.Compose([transforms.Grayscale(), transforms.ToTensor()])
        start = time.perf_counter()
        images = 0
        for split in ("train", "test"):
            dataset = ImageFolder(os.path.join(folder, split), transform=transform)
            for _, labels in DataLoader(dataset, batch_size=256, num_workers=workers):
                images += len(labels)
        seconds = time.perf_counter() - start
        extra = {}
    else:
        from image_logreg.datasets.folder import load_splits

        start = time.perf_counter()
        splits = load_splits("folder", folder, ("train", "test"), cache_dir=cache_dir, progress=False)
        images = sum(len(s) for s in splits.values())
        for s in splits.values():
            int(s.images.max())  # every page read, as training will
        seconds = time.perf_counter() - start
        extra = {"cache_hit": splits["train"].source["cache"]["hit"]}
    watcher.stop()
    return {"seconds": seconds, "images": images, "peak_rss_mib": _peak_mib("self"),
            "worker_peak_rss_mib": watcher.peak_mib, **extra}


def _peak_mib(pid) -> float:
    """A process's peak resident set size (``VmHWM``: its own, unlike ``ru_maxrss``, which a
    process started from a large one inherits), in MiB; 0 when it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


class _WorkerWatch:
    """The largest peak memory of this process's worker processes, looked at every 50 ms."""

    def __init__(self):
        self.peak_mib = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            for pid in self._children():
                self.peak_mib = max(self.peak_mib, _peak_mib(pid))

    @staticmethod
    def _children() -> list[str]:
        pids = []
        for task in os.listdir("/proc/self/task"):
            try:
                pids += open(f"/proc/self/task/{task}/children").read().split()
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def measure_once(which: str, folder: Path, cache_dir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", which, str(folder), str(cache_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{which} failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(folder: Path, repeats: int, workers_row: bool) -> dict:
    rows = ["torchvision"] + (["torchvision_workers2"] if workers_row else []) + ["first_load", "cached_load"]
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="folder-speed-") as tmp:
        warm = Path(tmp) / "warm"
        measure_once("first_load", folder, warm)  # untimed: files in the page cache, and the cache written
        for repeat in range(repeats):  # interleaved, so load that comes and goes hits every row
            for row in rows:
                cache_dir = Path(tmp) / f"fresh-{repeat}" if row == "first_load" else warm
                runs[row].append(measure_once(row, folder, cache_dir))
    figures = {}
    for row, results in runs.items():
        if row == "first_load" and any(r["cache_hit"] for r in results):
            raise SystemExit("a first load found a cache entry; it must start from an empty cache")
        if row == "cached_load" and not all(r["cache_hit"] for r in results):
            raise SystemExit("a cached load missed the cache")
        figures[row] = {
            "seconds": statistics.median(r["seconds"] for r in results),
            "runs": [r["seconds"] for r in results],
            "images": results[0]["images"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            "worker_peak_rss_mib": max(r["worker_peak_rss_mib"] for r in results),
        }
    images = {f["images"] for f in figures.values()}
    if len(images) != 1:
        raise SystemExit(f"the pipelines loaded different numbers of images: {sorted(images)}")
    reference = figures[REFERENCE]["seconds"]
    for f in figures.values():
        f["speedup"] = reference / f["seconds"]
    return figures


# --- the report ------------------------------------------------------------------------------


def met(figures: dict) -> dict[str, bool]:
    return {row: figures[row]["speedup"] >= target for row, target in TARGETS.items()}


def render(figures: dict, repeats: int, reproduce: str) -> str:
    images = figures[REFERENCE]["images"]
    ok = met(figures)
    lines = [
        f"Measured {date.today().isoformat()} on {machine('torch', 'torchvision')}; {images:,} PNG files (MNIST, both splits); "
        f"median of {repeats} runs, each a fresh process.",
        f"Reproduce: `{reproduce}`.",
        "",
        "| load | seconds | images/s | speed-up | target | peak memory (worker) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row, f in figures.items():
        target = f">= {TARGETS[row]:.0f}x, {'met' if ok[row] else '**missed**'}" if row in TARGETS else ""
        worker = f" ({f['worker_peak_rss_mib']:.0f} MiB)" if f["worker_peak_rss_mib"] >= 1 else ""
        lines.append(f"| {LABELS[row]} | {f['seconds']:.2f} | {images / f['seconds']:,.0f} | {f['speedup']:.1f}x | "
                     f"{target} | {f['peak_rss_mib']:.0f} MiB{worker} |")
    lines += [
        "",
        "Speed-up: against the first row. Peak memory: the process's peak resident set size; in brackets, "
        "its largest worker process's. Both pipelines import torch, which is most of each process's memory.",
    ]
    return "\n".join(lines) + "\n"


def export(data_dir: str, out: Path, limit: int | None) -> None:
    from export_folder import main as export_main

    argv = [str(out), "--data-dir", data_dir] + (["--limit", str(limit)] if limit else [])
    if export_main(argv) != 0:
        raise SystemExit("exporting the folder failed")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # one measurement, in a process of its own
        print(json.dumps(child(*argv[1:4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="the folder to load (default: export MNIST into a temporary one)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="where MNIST/raw/ is (for the export)")
    parser.add_argument("--limit", type=int, default=None, help="export only the first N images of each split")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median taken)")
    parser.add_argument("--no-workers-row", action="store_true", help="leave out the num_workers=2 reference row")
    parser.add_argument("--update-results", action="store_true", help="write the figures into results.md and the documentation (docs/)")
    parser.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    args = parser.parse_args(argv)

    if args.folder:
        figures = measure(Path(args.folder), args.repeats, not args.no_workers_row)
        reproduce = ("python benchmarks/export_folder.py /tmp/mnist-png && "
                     "python benchmarks/folder_speed.py --folder /tmp/mnist-png --update-results")
    else:
        with tempfile.TemporaryDirectory(prefix="folder-export-") as tmp:
            export(args.data_dir, Path(tmp) / "png", args.limit)
            figures = measure(Path(tmp) / "png", args.repeats, not args.no_workers_row)
        reproduce = "python benchmarks/folder_speed.py --update-results" + (f" --limit {args.limit}" if args.limit else "")
    text = render(figures, args.repeats, reproduce)
    print(text)
    ok = met(figures)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "targets": TARGETS, "met": ok}, indent=2) + "\n",
                                   encoding="utf-8")
    if args.update_results:
        replace_block(ROOT / "benchmarks" / "results.md", "folder", text, title="Loading image folders: `benchmarks/folder_speed.py`")
        replace_block(ROOT / "docs" / "own-images.md", "folder-results", text)
    for row in (row for row, good in ok.items() if not good):
        print(f"missed: {LABELS[row]} is {figures[row]['speedup']:.1f}x the torchvision pass, target {TARGETS[row]:.0f}x",
              file=sys.stderr)
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
