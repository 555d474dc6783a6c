"""How long the command line takes to answer, against the floor that importing torch sets.

    python benchmarks/startup.py                        # trains a one-epoch run to predict with
    python benchmarks/startup.py --run runs/mnist       # or uses yours
    python benchmarks/startup.py --update-results       # and writes the figures into results.md

Times, as a user waits for them (a fresh process each, wall clock), the median of ``--repeats``
(5) runs of each command, interleaved so that a machine that gets busier slows all alike, after
one untimed run of each (so every command finds its files in the page cache):

- ``python -c "import torch"``: what any command that touches a model must pay;
- ``image-logreg --help`` and ``image-logreg --version``, which need no torch at all;
- ``image-logreg predict RUN one.png`` on a test digit from ``--data-dir``, written as a PNG.

Targets: ``--help`` and ``predict`` within ``import torch`` + 0.5 s, ``--version`` within 0.3 s.
Exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import machine, replace_block  # noqa: E402

MARGIN = 0.5  # seconds over `import torch` allowed to --help and predict
VERSION_LIMIT = 0.3  # seconds for --version


def cli() -> list[str]:
    """The installed ``image-logreg`` beside this Python, as a user runs it; else ``-m``."""
    script = Path(sys.executable).with_name("image-logreg")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "image_logreg"]


def commands(run: Path, image: Path) -> dict[str, list[str]]:
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "image-logreg --help": [*cli(), "--help"],
        "image-logreg --version": [*cli(), "--version"],
        "image-logreg predict RUN one.png": [*cli(), "predict", str(run), str(image)],
    }


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return elapsed


def measure(cmds: dict[str, list[str]], repeats: int) -> dict[str, dict]:
    for argv in cmds.values():
        seconds(argv)  # untimed: file caches warm for every command alike
    times = {name: [] for name in cmds}
    for _ in range(repeats):  # interleaved, so load that comes and goes hits every command
        for name, argv in cmds.items():
            times[name].append(seconds(argv))
    return {name: {"median": statistics.median(t), "runs": t} for name, t in times.items()}


def targets(figures: dict[str, dict]) -> dict[str, float]:
    torch_s = figures['python -c "import torch"']["median"]
    return {
        "image-logreg --help": torch_s + MARGIN,
        "image-logreg --version": VERSION_LIMIT,
        "image-logreg predict RUN one.png": torch_s + MARGIN,
    }


def write_digit(data_dir, path: Path, index: int = 0) -> Path:
    """A test digit as a user would bring it: a 28x28 PNG file."""
    from PIL import Image

    from image_logreg.datasets import load_split

    test = load_split("mnist", data_dir, "test", download=False)
    Image.fromarray(test.images[index].numpy()).save(path)
    return path


def train_quick_run(data_dir, out: Path) -> Path:
    subprocess.run([*cli(), "train", "--data-dir", str(data_dir), "--out", str(out), "--epochs", "1", "--quiet", "--no-download"],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def render(figures: dict[str, dict], limits: dict[str, float], repeats: int) -> str:
    lines = [
        f"Measured {date.today().isoformat()} on {machine('torch')}; median of {repeats} runs, each a fresh process.",
        "Reproduce: `python benchmarks/startup.py --update-results`.",
        "",
        "| command | seconds | target | |",
        "|---|---:|---:|---|",
    ]
    for name, f in figures.items():
        if name in limits:
            met = "met" if f["median"] <= limits[name] else "**missed**"
            lines.append(f"| `{name}` | {f['median']:.2f} | <= {limits[name]:.2f} | {met} |")
        else:
            lines.append(f"| `{name}` | {f['median']:.2f} | (the floor) | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="where MNIST/raw/ is")
    parser.add_argument("--run", default=None, help="run directory to predict with (default: train a one-epoch run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per command (median taken)")
    parser.add_argument("--update-results", action="store_true", help="write the figures into benchmarks/results.md")
    parser.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        run = Path(args.run) if args.run else train_quick_run(args.data_dir, Path(tmp) / "run")
        image = write_digit(args.data_dir, Path(tmp) / "one.png")
        figures = measure(commands(run, image), args.repeats)
    limits = targets(figures)
    table = render(figures, limits, args.repeats)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "targets": limits}, indent=2) + "\n", encoding="utf-8")
    if args.update_results:
        replace_block(ROOT / "benchmarks" / "results.md", "startup", table, title="Starting up: `benchmarks/startup.py`")
    missed = [name for name, limit in limits.items() if figures[name]["median"] > limit]
    for name in missed:
        print(f"missed: {name} took {figures[name]['median']:.2f} s, target {limits[name]:.2f} s", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
