"""Learning new images without forgetting: `image-logreg learn` on a style the default MNIST model misreads.

    python benchmarks/learn.py --data-dir ../shared/data [--seeds 3] [--update-results]

Trains MNIST with the defaults, then draws digits in styles MNIST's mostly American writers
rarely use: ones with a long flag (misread by the default model, mostly as 9s) and sevens with a
crossbar (read right; they check that learning the ones does not take their sevens). The drawings
are user-style files (``tests/user_digits.py``'s pages: dark ink on uneven paper, PNG/RGBA/JPEG).
For each seed (a new set of drawings, held-out split and replay sample):
- (a) ``learn`` on 50 long-flag ones (40 learnt, 10 held out by the default ``--hold-out 0.2``),
  for each ``--replay`` share: accuracy on 200 other long-flag ones and on 200 crossbar sevens,
  before and after, the change in MNIST test accuracy, and what the novelty score rejects;
- how the learning was chosen: on the same images and replay, ``learn``'s L-BFGS against the
  parent's probabilities at temperature 1, plain replay (the replayed images taught their labels)
  and ``partial_fit``'s gradient steps;
- which images the novelty score is fitted on after learning, on a shape the parent rejects
  ('#' marks, taught as 8s): the parent's score kept, or fitted on the replay alone, on the
  replay and the learnt marks at their count, or at their share of the objective (``learn``).
Then (b) times ``learn`` on 1,000 new images stored as the server stores corrections (28x28 PNG,
``RUN/feedback/<class>/``): the learning itself (its ``learning_seconds``) and the whole command,
each a fresh process, against ``python -c "import torch"``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from sections import machine, replace_block  # noqa: E402

from image_logreg import to_float  # noqa: E402
from image_logreg.checkpoint import load_model  # noqa: E402
from image_logreg.learn import REPLAY_ROWS, REPLAY_TEMPERATURE, hold_out, learn_run, replay_fit  # noqa: E402
from image_logreg.lineage import class_folder  # noqa: E402
from image_logreg.predict import prepare_file  # noqa: E402
from image_logreg.run import read_eval_data, train_run  # noqa: E402
from image_logreg.settings import LEARN_HOLD_OUT, LEARN_REPLAY  # noqa: E402

SHARES = (0.5, 0.8, 0.9, 0.95, 0.98)
TARGETS = {"gain": 30.0, "drop": 0.3, "seconds": 2.0}
LEARN, OTHERS = 50, 200  # drawings learnt from, and others of the same style measured on


# --- the drawings ------------------------------------------------------------------------------


def strokes(style: str, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """The pen strokes of a drawing of ``style`` in a unit square (y down), jittered."""
    jitter = lambda: rng.normal(0, 0.025, 2)  # noqa: E731
    if style == "long-flag one":  # a flag from low on the left up to the top, then straight down
        top = np.array([rng.uniform(0.55, 0.65), rng.uniform(0.06, 0.12)]) + jitter()
        flag = top + np.array([-rng.uniform(0.25, 0.4), rng.uniform(0.3, 0.45)]) + jitter()
        foot = np.array([top[0] + rng.uniform(-0.06, 0.03), rng.uniform(0.88, 0.95)]) + jitter()
        return [[flag, top, foot]]
    if style == "crossbar seven":  # the bar, the stem, and a crossbar through the stem's middle
        left = np.array([rng.uniform(0.15, 0.3), rng.uniform(0.08, 0.18)]) + jitter()
        right = np.array([rng.uniform(0.72, 0.88), rng.uniform(0.06, 0.14)]) + jitter()
        foot = np.array([rng.uniform(0.3, 0.5), rng.uniform(0.88, 0.95)]) + jitter()
        middle = right + rng.uniform(0.4, 0.55) * (foot - right)
        half = rng.uniform(0.14, 0.22)
        return [[left, right, foot], [middle - [half, rng.uniform(-0.03, 0.03)], middle + [half, rng.uniform(-0.03, 0.03)]]]
    if style == "hash":  # two uprights and two bars: no digit, a shape the default model rejects
        return [[np.array([x, 0.1]) + jitter(), np.array([x - 0.05, 0.9]) + jitter()] for x in (0.35, 0.7)] + \
               [[np.array([0.1, y]) + jitter(), np.array([0.9, y]) + jitter()] for y in (0.35, 0.65)]
    raise ValueError(f"no style {style!r}")


def draw(style: str, rng: np.random.Generator, side: int | None = None) -> np.ndarray:
    """Ink coverage (float side x side, 1 = ink) of one drawing: stroke width, size and slant vary."""
    from PIL import Image, ImageDraw

    side = side or int(rng.integers(120, 320))
    width = max(2, int(side * rng.uniform(0.05, 0.1)))
    slant = rng.uniform(-0.25, 0.15)
    canvas = Image.new("L", (side, side), 0)
    pen = ImageDraw.Draw(canvas)
    for stroke in strokes(style, rng):
        points = [(side * (0.1 + 0.8 * (x + slant * (0.5 - y))), side * (0.1 + 0.8 * y)) for x, y in stroke]
        pen.line(points, fill=255, width=width, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            pen.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def write_drawings(style: str, n: int, folder: Path, seed: int) -> list[Path]:
    """``n`` drawings of ``style`` as user-style files in ``folder`` (the kinds of ``user_digits``, in turn)."""
    from user_digits import KINDS, write_ink

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_ink(draw(style, rng), folder / f"{i:04d}", rng, KINDS[i % len(KINDS)]) for i in range(n)]


def as_inputs(model, meta, paths: list[Path]) -> torch.Tensor:
    """Files through predict's own preprocessing, as the model's inputs."""
    return to_float(torch.from_numpy(np.stack([prepare_file(model, meta, p) for p in paths])))


def write_feedback(model, meta, folder: Path, n: int, seed: int) -> None:
    """``n`` drawings (ones and sevens in turn) as the server stores corrections: the 28x28 image the
    model saw, a PNG in ``folder/<class folder>/``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        label, style = ((1, "long-flag one"), (7, "crossbar seven"))[i % 2]
        page = io.BytesIO()
        Image.fromarray((draw(style, rng, side=84) * 255).astype(np.uint8)).save(page, format="PNG")
        image = prepare_file(model, meta, page.getvalue(), name=f"drawing{i}.png")
        target = folder / class_folder(meta["classes"], label)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:05d}.png")


# --- (a) learning a style ----------------------------------------------------------------------


def accuracy_and_rejected(model, x: torch.Tensor, label: int) -> tuple[float, float]:
    proba, scores = model.proba_and_novelty(x)
    return (proba.argmax(1) == label).double().mean().item(), model.rejects(scores).double().mean().item()


def learn_style(parent: Path, scratch: Path, seed: int, shares) -> tuple[dict, tuple]:
    """One seed: ``learn`` on 50 long-flag ones at each share; figures on 200 others and 200 sevens.
    Also returns what ``compare_methods`` needs: the folder learnt and the 200 other ones."""
    model, meta = load_model(parent)
    new = scratch / f"new-{seed}"
    write_drawings("long-flag one", LEARN, new / "1", seed=1000 + seed)
    ones = as_inputs(model, meta, write_drawings("long-flag one", OTHERS, scratch / f"ones-{seed}", seed=2000 + seed))
    sevens = as_inputs(model, meta, write_drawings("crossbar seven", OTHERS, scratch / f"sevens-{seed}", seed=3000 + seed))
    before = {"ones": accuracy_and_rejected(model, ones, 1), "sevens": accuracy_and_rejected(model, sevens, 7),
              "ones_read_as": torch.bincount(model.predict(ones), minlength=model.num_classes).tolist()}
    rows = {}
    for share in shares:
        out = scratch / f"learnt-{seed}-{share}"
        summary = learn_run(parent, new, out, replay=share, seed=seed)
        learnt, _ = load_model(out)
        test_before, test_after = summary["before"]["parent_test"], summary["after"]["parent_test"]
        rows[share] = {
            "mnist_change": 100 * (test_after["accuracy"] - test_before["accuracy"]),
            "mnist_rejected": test_after["rejected"],
            "ones": accuracy_and_rejected(learnt, ones, 1),
            "sevens": accuracy_and_rejected(learnt, sevens, 7),
            "learning_seconds": summary["learning_seconds"],
            "learnt": summary["images"]["learnt"],
            "held_out": summary["images"]["held_out"],
        }
    return {"before": before, "shares": rows}, (new, ones)


def learning_inputs(parent: Path, data_dir, folder: Path, seed: int = 0) -> dict:
    """What ``learn`` works on for ``folder``, as tensors: the new images learnt and held out, the
    replay sample with its labels, the parent's validation and test splits."""
    from image_logreg.learn import read_class_folders

    model, meta = load_model(parent)
    found = read_class_folders(folder, meta["classes"], lambda data, name: prepare_file(model, meta, data, name=name))
    held = hold_out(found.labels, LEARN_HOLD_OUT, seed)
    checkpoint = parent / "model.safetensors"
    quiet = lambda line: None  # noqa: E731
    train, val, test = (read_eval_data(meta, split, checkpoint, data_dir, log=quiet) for split in ("train", "val", "test"))
    sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:REPLAY_ROWS]
    return {"model": model, "x_new": to_float(found.images[~held]), "y_new": found.labels[~held],
            "x_held": to_float(found.images[held]), "y_held": found.labels[held],
            "x_replay": to_float(train.images[sample]), "y_replay": train.labels[sample],
            "x_val": to_float(val.images), "y_val": val.labels, "x_test": to_float(test.images), "y_test": test.labels}


def compare_methods(parent: Path, data_dir, learnt: list[tuple[Path, torch.Tensor]]) -> dict:
    """``learn``'s learning against other ways, on each seed's images and replay (``learnt``: each
    seed's folder and other ones); per way, each seed's figures."""
    rows = {}
    for seed, (new, ones) in enumerate(learnt):
        for name, figures in _compare_on(parent, data_dir, new, ones, seed).items():
            for key, value in figures.items():
                rows.setdefault(name, {}).setdefault(key, []).append(value)
    return rows


def _compare_on(parent: Path, data_dir, new: Path, ones: torch.Tensor, seed: int) -> dict:
    d = learning_inputs(parent, data_dir, new, seed)
    x_new, y_new, x_replay, y_replay = d["x_new"], d["y_new"], d["x_replay"], d["y_replay"]
    base = d["model"].score(d["x_test"], d["y_test"])
    weights = torch.cat([torch.full((len(x_replay),), LEARN_REPLAY / len(x_replay)), torch.full((len(x_new),), (1 - LEARN_REPLAY) / len(x_new))])
    methods = {
        "probabilities": lambda m: replay_fit(m, x_new, y_new, x_replay),
        "temperature 1": lambda m: replay_fit(m, x_new, y_new, x_replay, temperature=1.0),
        "labels": lambda m: replay_fit(m, x_new, y_new, x_replay, y_replay=y_replay),
        "partial_fit": lambda m: m.partial_fit(torch.cat([x_replay, x_new]), torch.cat([y_replay, y_new]), steps=30, sample_weight=weights),
    }
    rows = {}
    for name, method in methods.items():
        m = copy.deepcopy(d["model"])
        start = time.perf_counter()
        method(m)
        rows[name] = {"seconds": time.perf_counter() - start, "mnist_change": 100 * (m.score(d["x_test"], d["y_test"]) - base),
                      "ones": m.score(ones, torch.ones(len(ones), dtype=torch.long))}
    return rows


def compare_calibration(parent: Path, data_dir, scratch: Path) -> dict:
    """A shape the parent rejects ('#' marks, taught as 8s): the share of 200 others the novelty score
    rejects after ``learn`` when it is fitted on each choice of images, and of MNIST's test split."""
    from image_logreg.confidence import calibrate

    folder = scratch / "hash"
    write_drawings("hash", LEARN, folder / "8", seed=5000)
    parent_model, meta = load_model(parent)
    others = as_inputs(parent_model, meta, write_drawings("hash", OTHERS, scratch / "hash-others", seed=5001))
    learn_run(parent, folder, scratch / "hash-learnt")
    learnt, _ = load_model(scratch / "hash-learnt")
    d = learning_inputs(parent, data_dir, folder)
    x_val, y_val = torch.cat([d["x_val"], d["x_held"]]), torch.cat([d["y_val"], d["y_held"]])

    def refitted(rows):
        m = copy.deepcopy(learnt)
        calibrate(m, rows, x_val, y_val)
        return m

    def kept(m):
        m = copy.deepcopy(learnt)
        m.novelty, m.temperature = parent_model.novelty, parent_model.temperature
        return m

    mixed_bare = torch.cat([d["x_replay"], d["x_new"]])
    models = {"parent": parent_model, "kept": kept(learnt), "replay": refitted(d["x_replay"]),
              "bare": refitted(mixed_bare[torch.randperm(len(mixed_bare), generator=torch.Generator().manual_seed(0))]),
              "learn": learnt}
    rejected = lambda m, x: m.rejects(m.novelty_scores(x)).double().mean().item()  # noqa: E731
    return {name: {"hash": rejected(m, others), "mnist": rejected(m, d["x_test"]),
                   "right": (m.predict(others) == 8).double().mean().item()} for name, m in models.items()}


# --- (b) timing ----------------------------------------------------------------------------------


def command() -> list[str]:
    script = Path(sys.executable).with_name("image-logreg")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "image_logreg"]


def time_learning(parent: Path, scratch: Path, n: int, repeats: int) -> dict:
    """``learn`` on ``n`` new images as a fresh process, ``repeats`` times, in turns with importing torch."""
    model, meta = load_model(parent)
    feedback = scratch / "feedback"
    write_feedback(model, meta, feedback, n, seed=4000)
    runs = {"import_torch": [], "command": [], "learning": []}
    for k in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        runs["import_torch"].append(time.perf_counter() - start)
        start = time.perf_counter()
        done = subprocess.run([*command(), "learn", str(parent), str(feedback), "--out", str(scratch / f"timed-{k}"), "--json", "--quiet"],
                              capture_output=True, text=True)
        runs["command"].append(time.perf_counter() - start)
        if done.returncode:
            raise RuntimeError(f"learn failed: {done.stderr.strip()}")
        summary = json.loads(done.stdout)
        runs["learning"].append(summary["learning_seconds"])
    return {"images": n, "learnt": summary["images"]["learnt"], "replayed": summary["replay"]["images"],
            **{name: statistics.median(t) for name, t in runs.items()}, "runs": runs}


# --- the report ----------------------------------------------------------------------------------


def measure(data_dir, seeds: int, shares, timing_images: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="learn-") as scratch:
        scratch = Path(scratch)
        parent = scratch / "mnist"
        train_run({"dataset": "mnist", "data_dir": str(data_dir), "download": False}, parent)
        per_seed, learnt = [], []
        for seed in range(seeds):
            result, used = learn_style(parent, scratch, seed, shares)
            per_seed.append(result)
            learnt.append(used)
        methods = compare_methods(parent, data_dir, learnt)
        calibration = compare_calibration(parent, data_dir, scratch)
        timing = time_learning(parent, scratch, timing_images, repeats)
    return {"seeds": per_seed, "methods": methods, "calibration": calibration, "timing": timing, "shares": list(shares)}


def summarise(r: dict, share: float) -> dict:
    rows = [s["shares"][share] for s in r["seeds"]]
    gains = [100 * (row["ones"][0] - s["before"]["ones"][0]) for row, s in zip(rows, r["seeds"])]
    changes = [row["mnist_change"] for row in rows]
    return {
        "ones_before": statistics.mean(s["before"]["ones"][0] for s in r["seeds"]),
        "ones_after": statistics.mean(row["ones"][0] for row in rows),
        "gain": statistics.mean(gains), "least_gain": min(gains),
        "mnist_change": statistics.mean(changes), "worst_change": min(changes),
        "sevens_after": statistics.mean(row["sevens"][0] for row in rows),
        "ones_rejected": statistics.mean(row["ones"][1] for row in rows),
        "mnist_rejected": statistics.mean(row["mnist_rejected"] for row in rows),
        "learning_seconds": statistics.median(row["learning_seconds"] for row in rows),
    }


def render(r: dict) -> str:
    met = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    seeds = r["seeds"]
    first = seeds[0]["shares"][r["shares"][0]]
    before = {k: statistics.mean(s["before"][k][i] for s in seeds) for k, i in (("ones", 0), ("sevens", 0))}
    rejected_before = statistics.mean(s["before"]["ones"][1] for s in seeds)
    read_as = np.sum([s["before"]["ones_read_as"] for s in seeds], axis=0)
    mostly = " and ".join(f"{k}s" for k in np.argsort(-read_as)[:2] if k != 1)
    lines = [
        f"Measured on {machine('torch')}; the default MNIST run, {len(seeds)} seeds (each a new set of drawings, "
        "held-out split and replay sample).",
        "Reproduce: `python benchmarks/learn.py --data-dir ../shared/data --update-results`.",
        "",
        f"`learn` on {LEARN} ones with a long flag ({first['learnt']} learnt, {first['held_out']} held out by `--hold-out "
        f"{LEARN_HOLD_OUT}`), measured on {OTHERS} other such ones and {OTHERS} sevens with a crossbar. Before: the ones "
        f"{100 * before['ones']:.1f}% right (read mostly as {mostly}), the sevens {100 * before['sevens']:.1f}%, "
        f"{100 * rejected_before:.1f}% of the ones rejected as unlike the training images.",
        "",
        "| `--replay` | MNIST test accuracy, change (mean; worst) | long-flag ones right after (mean; least gain) "
        "| crossbar sevens right after | ones rejected after | MNIST test rejected after | learning (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for share in r["shares"]:
        s = summarise(r, share)
        label = f"**{share}** (default)" if share == LEARN_REPLAY else str(share)
        lines.append(
            f"| {label} | {s['mnist_change']:+.2f} points ({s['worst_change']:+.2f}) | {100 * s['ones_after']:.1f}% "
            f"({s['least_gain']:+.1f} points) | {100 * s['sevens_after']:.1f}% | {100 * s['ones_rejected']:.1f}% | "
            f"{100 * s['mnist_rejected']:.2f}% | {s['learning_seconds']:.2f} s |"
        )
    timing = r["timing"]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    if LEARN_REPLAY in r["shares"]:
        s = summarise(r, LEARN_REPLAY)
        lines += [
            f"| (a) {OTHERS} other long-flag ones: +{TARGETS['gain']:.0f} points or more after `learn` on {LEARN} | "
            f"{s['gain']:+.1f} points (least {s['least_gain']:+.1f}) | {met(s['least_gain'] >= TARGETS['gain'])} |",
            f"| (a) MNIST test accuracy: at most {TARGETS['drop']} points lost | {s['mnist_change']:+.2f} points "
            f"(worst {s['worst_change']:+.2f}) | {met(s['worst_change'] >= -TARGETS['drop'])} |",
        ]
    lines += [
        f"| (b) learning {timing['images']:,} new images with replay: <= {TARGETS['seconds']:.0f} s | {timing['learning']:.2f} s "
        f"| {met(timing['learning'] <= TARGETS['seconds'])} |",
        f"| (b) the whole `image-logreg learn` command, a fresh process | {timing['command']:.2f} s "
        f"(`import torch` alone: {timing['import_torch']:.2f} s) | |",
        "",
        f"(b): {timing['learnt']:,} learnt and {timing['images'] - timing['learnt']:,} held out, with {timing['replayed']:,} "
        "replayed images; the images are 28x28 PNG files in class folders, as `serve` stores corrections; medians of "
        f"{len(timing['runs']['command'])} runs. The command also reads the files, the parent's data, measures before "
        "and after, fits the calibration again and writes the run.",
        "",
        f"How the learning was chosen (`--replay {LEARN_REPLAY}`; on each seed the same {first['learnt']} ones and "
        f"{REPLAY_ROWS:,} replayed images as `learn`):",
        "",
        "| learning | MNIST test accuracy, change (mean; worst) | long-flag ones right after (mean) | seconds (median) |",
        "|---|---:|---:|---:|",
    ]
    names = {"probabilities": f"**L-BFGS, the replayed images taught the parent's probabilities at temperature "
                               f"{REPLAY_TEMPERATURE:g} (`learn`)**",
             "temperature 1": "L-BFGS, the replayed images taught the parent's probabilities at temperature 1",
             "labels": "L-BFGS, the replayed images taught their labels (plain replay)",
             "partial_fit": "`partial_fit`: 30 full-batch gradient steps, replay taught its labels"}
    for key, name in names.items():
        m = r["methods"][key]
        lines.append(f"| {name} | {statistics.mean(m['mnist_change']):+.2f} points ({min(m['mnist_change']):+.2f}) | "
                     f"{100 * statistics.mean(m['ones']):.1f}% | {statistics.median(m['seconds']):.2f} |")
    c = r["calibration"]
    lines += [
        "",
        f"Which images the novelty score is fitted on after learning, on a shape the parent rejects: '#' marks, "
        f"`learn` on {LEARN} of them as 8s ({100 * c['learn']['right']:.1f}% of {OTHERS} others read as 8 after); "
        "the temperature and threshold from the parent's validation split and the held-out marks in each case:",
        "",
        f"| novelty score | '#' marks rejected ({OTHERS} others) | MNIST test rejected |",
        "|---|---:|---:|",
    ]
    names = {"parent": "the parent, before learning", "kept": "the parent's, not fitted again",
             "replay": "fitted on the replayed training images alone",
             "bare": f"fitted on them and the learnt marks at their count ({first['learnt']} among {REPLAY_ROWS:,})",
             "learn": f"**fitted on them and the learnt marks at their share of the objective, {1 - LEARN_REPLAY:.0%} (`learn`)**"}
    for key, name in names.items():
        lines.append(f"| {name} | {100 * c[key]['hash']:.1f}% | {100 * c[key]['mnist']:.2f}% |")
    return "\n".join(lines) + "\n"


def targets_met(r: dict) -> bool:
    ok = r["timing"]["learning"] <= TARGETS["seconds"]
    if LEARN_REPLAY in r["shares"]:
        s = summarise(r, LEARN_REPLAY)
        ok = ok and s["least_gain"] >= TARGETS["gain"] and s["worst_change"] >= -TARGETS["drop"]
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, default=3, help="sets of drawings, each learnt at every share (default: %(default)s)")
    parser.add_argument("--shares", default=",".join(map(str, SHARES)), help="--replay shares compared (default: %(default)s)")
    parser.add_argument("--timing-images", type=int, default=1000, help="new images in the timed learn (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, the median taken (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    parser.add_argument("--update-results", action="store_true",
                        help="replace this benchmark's blocks in benchmarks/results.md and the documentation (docs/)")
    args = parser.parse_args(argv)
    shares = [float(v) for v in args.shares.split(",")]
    results = measure(args.data_dir, args.seeds, shares, args.timing_images, args.repeats)
    table = render(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    if args.update_results:
        replace_block(ROOT / "benchmarks" / "results.md", "learn", table, title="Learning new images: `benchmarks/learn.py`")
        replace_block(ROOT / "docs" / "learning.md", "learn-results", table)
    print(table)
    return 0 if targets_met(results) else 1


if __name__ == "__main__":
    sys.exit(main())
