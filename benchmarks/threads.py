"""The CPU thread choices of training, measured side by side on this machine.

    python benchmarks/threads.py --data-dir ../shared/data [--repeats 5] [--update-results]

1. Minibatch steps: an epoch of the defaults (Adam, batch 128) and of larger batches, on one
   thread, on one thread with a second gathering the batches ahead (``train._step_rows``), and
   on all threads. ``train.SMALL_STEP`` (input elements per step) is the size below which
   training keeps its steps to one thread, with the gatherer beside it; the table shows whether
   that holds here.
2. The same epochs again while another process keeps one core busy, as on a shared machine
   (the tests, a second training, a browser): a thread that waits for a busy core stalls each step.
3. Full-batch sums (L-BFGS's objective over the training set): the fixed pieces spread over a
   pool of one-thread workers (``train._each_piece``) against the same pieces on one thread.

Each pair runs in turns in this one process, ``--repeats`` times; the ratio of the medians is
the figure to quote (absolute times drift with the machine's load).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import machine, replace_block, vendor  # noqa: E402

from image_logreg import LogisticRegression, TrainConfig, load_split, to_float  # noqa: E402
from image_logreg import train as training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (128, 1024, 8192)


MODES = ("one", "gather", "all")  # steps on 1 thread; the same with a gathering thread; on all threads


def epoch_seconds(x, y, batch_size: int, mode: str) -> float:
    """Seconds of one training epoch (no validation) in one of the ``MODES``."""
    small_step, threads = training.SMALL_STEP, torch.get_num_threads()
    training.SMALL_STEP = 0 if mode == "all" else float("inf")  # the rule's threshold, forced either way
    if mode == "one":
        torch.set_num_threads(1)  # training gathers ahead only with a thread to spare
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        training.fit(LogisticRegression(), x, y, None, None, TrainConfig(batch_size=batch_size, epochs=1))
        return time.perf_counter() - start
    finally:
        training.SMALL_STEP = small_step
        torch.set_num_threads(threads)


def objective_seconds(x, onehot, y, pool: bool) -> float:
    """Seconds of one evaluation of the full-batch objective and its gradient."""
    model = LogisticRegression()
    threads = torch.get_num_threads()
    if not pool:
        torch.set_num_threads(1)  # _each_piece then runs the pieces one after another
    try:
        start = time.perf_counter()
        training.full_objective(model, x, y, onehot, 0.0)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def one_core_busy(seconds: float = 120.0):
    """Another process spinning on one core for at most ``seconds``, stopped on the way out."""
    spinner = subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)  # running before the first timing
        yield
    finally:
        spinner.kill()
        spinner.wait()


def in_turns(repeats: int, *timed) -> tuple[float, ...]:
    """The median seconds of each of ``timed``, run in turns ``repeats`` times."""
    seconds = [[] for _ in timed]
    for _ in range(repeats):
        for f, got in zip(timed, seconds):
            got.append(f())
    return tuple(statistics.median(got) for got in seconds)


def epochs_in_turns(x, y, batch: int, repeats: int) -> dict:
    times = in_turns(repeats, *(lambda mode=mode: epoch_seconds(x, y, batch, mode) for mode in MODES))
    return {"batch": batch, **dict(zip(MODES, times))}


def run(data_dir: str, repeats: int) -> dict:
    data = load_split("mnist", data_dir, "train", download=False)
    x, y = to_float(data.images).reshape(len(data), -1), data.labels
    results = {"threads": torch.get_num_threads(), "minibatch": [], "repeats": repeats}
    for batch in BATCHES:
        results["minibatch"].append({**epochs_in_turns(x, y, batch, repeats), "elements": batch * x.shape[1],
                                     "rule_says_one": batch * x.shape[1] < training.SMALL_STEP})
    with one_core_busy(seconds=240.0):
        results["busy"] = [epochs_in_turns(x, y, batch, repeats) for batch in BATCHES]
    onehot = torch.nn.functional.one_hot(y, 10).float()
    serial, pooled = in_turns(repeats, lambda: objective_seconds(x, onehot, y, False), lambda: objective_seconds(x, onehot, y, True))
    results["objective"] = {"serial": serial, "pool": pooled}
    return results


def render(results: dict) -> str:
    threads = results["threads"]
    lines = [
        f"Measured on {machine('torch')}; median of {results['repeats']}, in turns.",
        "Reproduce: `python benchmarks/threads.py --data-dir ../shared/data --update-results`.",
        "",
        "Steps on one thread, the gatherer beside them, are what training uses below `train.SMALL_STEP` input elements a step.",
        "",
        f"| MNIST epoch (60,000 images, Adam) | 1 thread | 1 thread, 1 gathering | {threads} threads | 1 + 1 faster by | training uses | right choice |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for row in results["minibatch"]:
        faster = row["all"] / row["gather"]
        lines.append(
            f"| batch {row['batch']} ({row['elements']:,} input elements a step) | {row['one']:.3f} s | {row['gather']:.3f} s | "
            f"{row['all']:.3f} s | {faster:.2f}x | {'1 + 1' if row['rule_says_one'] else f'{threads} threads'} | "
            f"{'yes' if (faster >= 1) == row['rule_says_one'] else '**no**'} |"
        )
    lines += [
        "",
        f"| the same epochs while another process keeps one core busy | 1 thread | 1 thread, 1 gathering | {threads} threads | 1 + 1 faster by |",
        "|---|---:|---:|---:|---:|",
        *(f"| batch {row['batch']} | {row['one']:.3f} s | {row['gather']:.3f} s | {row['all']:.3f} s | **{row['all'] / row['gather']:.2f}x** |"
          for row in results["busy"]),
    ]
    obj = results["objective"]
    lines += [
        "",
        f"| full-batch objective and gradient (60,000 images, 64 pieces) | pieces on 1 thread | pieces over {threads} one-thread workers | speed-up |",
        "|---|---:|---:|---:|",
        f"| one evaluation | {obj['serial'] * 1000:.1f} ms | {obj['pool'] * 1000:.1f} ms | {obj['serial'] / obj['pool']:.2f}x |",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--update-results", action="store_true", help="replace this benchmark's block in benchmarks/results.md")
    args = parser.parse_args(argv)
    table = render(run(args.data_dir, args.repeats))
    if args.update_results:
        replace_block(ROOT / "benchmarks" / "results.md", f"threads-{vendor()}", table, title=f"Training threads ({vendor()}): `benchmarks/threads.py`")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
