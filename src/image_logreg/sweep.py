"""A grid of training runs (the tutorial's "ideas to try") in one resumable command.

Every combination of the listed settings becomes one run directory under the sweep folder,
named from its settings (``lr=0.01_batch_size=100_val_fraction=0.2_train_subset=all_...``), so
re-running the same sweep finds the runs that are already complete and trains only the rest.
Configurations are compared by validation accuracy only; the test set is touched once, for the
single best configuration, at the very end.

The sweep folder ends up holding ``sweep.csv`` (one row per configuration, in grid order),
``sweep.md`` (the same, best first), ``sweep.png``, ``best.json`` and ``sweep.json`` (the
settings of the latest invocation, which also marks the folder as a sweep).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

from .errors import DataError, ImageLogregError, UsageError
from .files import read_json, write_csv, write_json, write_text
from .settings import CONSTRAINTS, Interval, Options, RunConfig, TrainConfig, check_settings, flag

# The settings a sweep can vary, in the order they appear in run-directory names.
SWEEP_SETTINGS = ("lr", "batch_size", "val_fraction", "train_subset", "optimizer", "weight_decay")
SHORT = {"lr": "lr", "batch_size": "batch", "val_fraction": "val", "train_subset": "subset", "optimizer": "", "weight_decay": "wd"}
# Settings besides the grid that decide what a run directory holds (with all of TrainConfig's):
# a resumed run must agree on them.
SAME_RUN = ("dataset", "val_fraction", "train_subset", "deskew", "image_size", "resize", "color", "test_fraction")
TRAINING = tuple(f.name for f in fields(TrainConfig))
ALL = "all"


# --- the grid ---------------------------------------------------------------------------------


def parse_values(name: str, text: str | None) -> list:
    """``"0.001,0.01"`` to ``[0.001, 0.01]`` for setting ``name``, each value read as its row of
    ``CONSTRAINTS`` says (a choice, a whole number, a number); ``None`` means its default only."""
    if text is None:
        return [getattr(RunConfig(), name)]
    values = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            raise UsageError(f"{flag(name)} {text!r} has an empty value; give comma-separated values like 0.001,0.01")
        value = _read_value(name, item)
        check_settings({name: value})
        if value not in values:
            values.append(value)
    return values


def _read_value(name: str, item: str):
    """One value of a sweep flag, in the type its constraint row takes."""
    row = CONSTRAINTS[name]
    if any(isinstance(rule, Options) for rule in row):
        return item.lower()
    if name == "train_subset" and item.lower() == ALL:  # no subset: all of the training split
        return None
    whole = any(isinstance(rule, Interval) and rule.kind is int for rule in row)
    try:
        return int(item) if whole else float(item)
    except ValueError:
        alternative = f" or {ALL!r}" if name == "train_subset" else ""
        raise UsageError(f"{flag(name)}: {item!r} is not {'a whole number' if whole else 'a number'}{alternative}") from None


def grid_from_flags(flags: dict) -> dict[str, list]:
    """``{setting: comma-separated text or None}`` to ``{setting: [values]}`` for every sweep setting."""
    unknown = set(flags) - set(SWEEP_SETTINGS)
    if unknown:
        raise UsageError(f"cannot sweep over {', '.join(sorted(unknown))}")
    return {name: parse_values(name, flags.get(name)) for name in SWEEP_SETTINGS}


def expand(grid: dict[str, list]) -> list[dict]:
    """The Cartesian product of ``grid``, one dict of sweep settings per configuration.

    A learning rate left to its default becomes the optimizer's default, so that names and
    results always show the rate that was used.
    """
    combos = [dict(zip(SWEEP_SETTINGS, combo)) for combo in itertools.product(*(grid[n] for n in SWEEP_SETTINGS))]
    return [dict(c, lr=TrainConfig(optimizer=c["optimizer"], lr=c["lr"]).resolved().lr) for c in combos]


def seconds_in_words(seconds: float) -> str:
    """0.04 s reads as 0.04 s, not 0.0 s; longer times to a tenth of a second."""
    return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"


def format_value(value) -> str:
    if value is None:
        return ALL
    if isinstance(value, float):
        return repr(value)  # shortest exact form: 0.001, 1e-05, 1e+38; equal values, equal names
    return str(value)


def run_name(settings: dict, varied=()) -> str:
    """A stable, filesystem-safe directory name from the settings the sweep varies: ``lr=0.01_batch_size=100``
    (from all of them when it varies none); the others are in each run's config.json."""
    return "_".join(f"{n}={format_value(settings[n])}" for n in SWEEP_SETTINGS if n in varied or not varied)


def label(settings: dict, names) -> str:
    parts = [f"{SHORT[n]}={format_value(settings[n])}" if SHORT[n] else format_value(settings[n]) for n in names]
    return ", ".join(parts) or "defaults"


def checked_run(settings: dict) -> RunConfig:
    """One configuration's run settings, refused before anything is trained if no run could use them,
    and resolved as a run records them (the image size as [H, W]), so resumed runs compare alike."""
    from .run import resolve

    config = RunConfig.from_settings(settings)
    if config.val_fraction == 0:  # the whole sweep is a comparison on the validation set
        raise UsageError("a sweep compares configurations by validation accuracy, so --val-fraction must be above 0; "
                         "train the chosen settings on all the data with `train --val-fraction 0`")
    return resolve(config)


# --- running it -------------------------------------------------------------------------------


def is_complete(run_dir: Path) -> bool:
    return (run_dir / "model.safetensors").is_file() and (run_dir / "history.json").is_file()


def read_result(run_dir: Path) -> dict:
    """The metrics of a complete run directory's weights, as a sweep row reports them."""
    from .runs import kept_record

    history = read_json(run_dir / "history.json")
    final = kept_record(history, read_json(run_dir / "config.json"))  # the weights the run holds, not its last epoch
    split_file = run_dir / "split.json"
    n_train = len(read_json(split_file)["train_indices"]) if split_file.is_file() else None
    return {
        "n_train": n_train,
        "val_accuracy": final["val_accuracy"],
        "val_loss": final["val_loss"],
        "train_accuracy": final["train_accuracy"],
        "seconds": round(sum(h["seconds"] for h in history), 3),
    }


def _check_resumable(sweep_dir: Path, overwrite: bool) -> None:
    if not sweep_dir.exists():
        return
    if not sweep_dir.is_dir():
        raise UsageError(f"{sweep_dir} exists and is not a directory; choose another --out")
    if not overwrite and any(sweep_dir.iterdir()) and not (sweep_dir / "sweep.json").is_file():
        raise UsageError(f"{sweep_dir} exists and does not hold a sweep; choose another --out")


def _check_same_run(run_dir: Path, config: RunConfig) -> None:
    """A run directory to be reused must have been trained with the settings asked for now."""
    try:
        recorded = read_json(run_dir / "config.json")
    except (OSError, ValueError):
        return  # read_result decides what an unreadable run means
    for key in SAME_RUN + TRAINING:
        asked = getattr(config, key)
        if key in recorded and asked is not None and recorded[key] != asked:
            raise UsageError(
                f"{run_dir} was trained with {key}={recorded[key]}, but this sweep asks for {asked}; "
                "pass --overwrite to retrain, or choose another --out"
            )


def run_sweep(
    grid: dict[str, list],
    fixed: dict,
    sweep_dir,
    *,
    overwrite: bool = False,
    progress: bool = False,
    log=None,
) -> dict:
    """Train every configuration of ``grid`` (missing ones only, unless ``overwrite``).

    ``fixed`` holds the settings shared by all runs (dataset, data_dir, epochs, seed, ...: any of
    ``RunConfig``'s but the grid's; those left out take their defaults).
    Returns ``{"sweep_dir", "configs": [rows], "best", "trained", "skipped", "failed"}``.
    """
    from .run import train_run

    log = log or (lambda msg: None)
    sweep_dir = Path(sweep_dir)
    configs = expand(grid)
    if set(fixed) & set(SWEEP_SETTINGS):
        raise UsageError(f"fixed settings overlap the grid: {', '.join(sorted(set(fixed) & set(SWEEP_SETTINGS)))}")
    full = [checked_run({**fixed, **settings}) for settings in configs]
    _check_resumable(sweep_dir, overwrite)
    varied = [n for n in SWEEP_SETTINGS if len(grid[n]) > 1]
    if not overwrite:
        for settings, config in zip(configs, full):
            run_dir = sweep_dir / run_name(settings, varied)
            if is_complete(run_dir):
                _check_same_run(run_dir, config)

    write_json(sweep_dir / "sweep.json", {
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fixed": {k: v for k, v in fixed.items()},
        "grid": {n: [("all" if n == "train_subset" else "default") if v is None else v for v in grid[n]] for n in SWEEP_SETTINGS},
        "varied": varied,
    })

    rows, counts = [], {"trained": 0, "skipped": 0, "failed": 0}
    for i, (settings, config) in enumerate(zip(configs, full), 1):
        run_dir = sweep_dir / run_name(settings, varied)
        prefix = f"[{i}/{len(configs)}] {label(settings, varied or SWEEP_SETTINGS)}"
        status, error = "trained", ""
        try:
            if is_complete(run_dir) and not overwrite:
                status = "skipped"
            else:
                train_run(config, run_dir, overwrite=overwrite, progress=progress, log=lambda m: log(f"    {m}"))
            result = read_result(run_dir)
        except DataError:
            raise  # the dataset itself is missing or broken: every configuration would fail alike
        except (ImageLogregError, OSError, ValueError, KeyError, IndexError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise  # disk full, permission denied: stop rather than fail every run in turn
            status, error = "failed", _one_line(exc)
            result = dict.fromkeys(("n_train", "val_accuracy", "val_loss", "train_accuracy", "seconds"))
        counts[status] += 1
        if status == "failed":
            log(f"{prefix}: FAILED: {error}")
        else:
            done = "already done" if status == "skipped" else f"trained in {seconds_in_words(result['seconds'])}"
            log(f"{prefix}: val accuracy {result['val_accuracy']:.4f} ({done})")
        rows.append({
            **{n: format_value(settings[n]) if settings[n] is None else settings[n] for n in (varied or SWEEP_SETTINGS)},
            "status": status,
            **result,
            "run_dir": str(run_dir),
            "error": error,
        })

    write_csv(sweep_dir / "sweep.csv", rows)
    plot_sweep(rows, configs, varied, sweep_dir / "sweep.png", title=_title(fixed))
    best = _best(rows, configs)
    if best is not None:
        best = evaluate_best(best, fixed, log)
        write_json(sweep_dir / "best.json", best)
    else:
        (sweep_dir / "best.json").unlink(missing_ok=True)
    write_text(sweep_dir / "sweep.md", markdown(rows, varied, best, _title(fixed)))
    for row, settings in zip(rows, configs):
        row["settings"] = {n: format_value(v) if v is None else v for n, v in settings.items()}
    return {"sweep_dir": str(sweep_dir), "configs": rows, "best": best, **counts}


def _best(rows: list[dict], configs: list[dict]):
    """The configuration with the highest validation accuracy (lower val loss breaks ties)."""
    done = [(row, s) for row, s in zip(rows, configs) if row["status"] != "failed"]
    if not done:
        return None
    row, settings = max(done, key=lambda rs: (rs[0]["val_accuracy"], -rs[0]["val_loss"]))
    return {
        "run_dir": row["run_dir"],
        "settings": {n: format_value(v) if v is None else v for n, v in settings.items()},
        "val_accuracy": row["val_accuracy"],
        "val_loss": row["val_loss"],
    }


def evaluate_best(best: dict, fixed: dict, log) -> dict:
    """The chosen run's test-set loss and accuracy: the one time the sweep looks at the test set."""
    from .checkpoint import load_model, resolve_checkpoint
    from .run import eval_data, evaluate_model
    from .train import resolve_device

    config = RunConfig.from_settings(fixed)
    device = resolve_device(config.device)
    checkpoint = resolve_checkpoint(best["run_dir"])
    model, meta = load_model(checkpoint, device=device)
    data = eval_data(meta, "test", config.data_dir, checkpoint, download=config.download)
    result = evaluate_model(model, meta, data, device)
    log(f"best by validation accuracy: {best['run_dir']}: val {best['val_accuracy']:.4f}, test {result['accuracy']:.4f}")
    return dict(best, test_accuracy=result["accuracy"], test_loss=result["loss"], n_test=result["n"], selected_by="val_accuracy")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _title(fixed: dict) -> str:
    c = RunConfig.from_settings(fixed)
    epochs = "default epochs" if c.epochs is None else f"{c.epochs} epoch{'s' if c.epochs != 1 else ''}"
    return f"{c.dataset} sweep, {epochs}, seed {c.seed}"


# --- reports ----------------------------------------------------------------------------------


def ranked(rows: list[dict]) -> list[dict]:
    """Best validation accuracy first; failed configurations last, in grid order."""
    ok = sorted((r for r in rows if r["status"] != "failed"), key=lambda r: (-r["val_accuracy"], r["val_loss"]))
    return ok + [r for r in rows if r["status"] == "failed"]


def markdown(rows: list[dict], varied: list[str], best: dict | None, title: str) -> str:
    names = varied or list(SWEEP_SETTINGS)
    any_failed = any(r["status"] == "failed" for r in rows)
    head = ["#", *names, "train images", "val accuracy", "val loss", "train accuracy", "seconds", "run"]
    if any_failed:
        head.append("error")
    fmt = lambda v, spec: "" if v is None else format(v, spec)
    lines = [f"# {title}", "", "Sorted by validation accuracy (best first). The test set was used once, for the best run only.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, r in enumerate(ranked(rows), 1):
        cells = [str(i) if r["status"] != "failed" else "-", *(str(r[n]) for n in names),
                 fmt(r["n_train"], "d"), fmt(r["val_accuracy"], ".4f"), fmt(r["val_loss"], ".4f"),
                 fmt(r["train_accuracy"], ".4f"), fmt(r["seconds"], ".1f"), f"`{Path(r['run_dir']).name}`"]
        if any_failed:
            cells.append(r["error"].replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"**Best by validation accuracy:** `{Path(best['run_dir']).name}`: validation accuracy "
                  f"{best['val_accuracy']:.4f}, test accuracy {best['test_accuracy']:.4f} ({best['n_test']} test images)."]
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], configs: list[dict], varied: list[str], path, title: str = "") -> Path:
    """Validation accuracy per configuration (sorted bars); and vs. training-set size when that varies."""
    from .plots import colormaps, save_figure, subplots

    names = varied or list(SWEEP_SETTINGS)
    order = ranked(rows)
    by_row = {id(r): s for r, s in zip(rows, configs)}
    with_sizes = "train_subset" in varied
    n = len(order)
    height = max(3.5, 0.32 * n + 1.6)
    if with_sizes:
        fig, (ax, ax2) = subplots(1, 2, figsize=(14, height), gridspec_kw={"width_ratios": [1.1, 1]}, layout="constrained")
    else:
        fig, ax = subplots(figsize=(8, height), layout="constrained")

    ok = [r for r in order if r["status"] != "failed"]
    accs = [r["val_accuracy"] for r in ok]
    lo = max(0.0, math.floor((min(accs) - 0.02) * 20) / 20) if accs else 0.0
    hi = max(accs) if accs else 1.0
    right = hi + 0.16 * max(hi - lo, 0.02)
    ys = list(range(n - 1, -1, -1))  # best at the top
    for y, r in zip(ys, order):
        if r["status"] == "failed":
            ax.text(lo + 0.005 * (right - lo), y, "failed", va="center", fontsize=8, color="tab:red")
            continue
        color = "tab:green" if r is ok[0] else "tab:blue"
        ax.barh(y, r["val_accuracy"] - lo, left=lo, color=color, height=0.7)
        ax.text(r["val_accuracy"] + 0.01 * (right - lo), y, f"{r['val_accuracy']:.4f}", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([label(by_row[id(r)], names) for r in order], fontsize=8)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(lo, right)
    ax.set_xlabel("validation accuracy" + (f" (axis starts at {lo:g})" if lo > 0 else ""))
    ax.set_title("Validation accuracy per configuration")
    ax.grid(axis="x", alpha=0.3)

    if with_sizes:
        others = [v for v in varied if v != "train_subset"]
        groups: dict[str, list] = {}
        for r, s in zip(rows, configs):
            if r["status"] != "failed" and r["n_train"]:
                groups.setdefault(label(s, others) if others else "all configurations", []).append((r["n_train"], r["val_accuracy"]))
        sizes = sorted({x for pts in groups.values() for x, _ in pts})
        for pts in groups.values():
            pts.sort()
        many = len(groups) > 10  # past the default colour cycle: 20 colours and varied markers
        # legend order = order of the lines' right ends, best on top
        for k, (name, pts) in enumerate(sorted(groups.items(), key=lambda g: -g[1][-1][1])):
            style = {"color": colormaps["tab20"](k % 20), "marker": "os^Dv<>PX"[k % 9]} if many else {"marker": "o"}
            ax2.plot([x for x, _ in pts], [y for _, y in pts], "-", label=name, alpha=0.85, **style)
        ax2.set_xscale("log")
        ax2.set_xticks(sizes)
        ax2.set_xticklabels([f"{s:,}" for s in sizes], fontsize=8)
        ax2.minorticks_off()
        ax2.set_xlabel("training-set size (images, log scale)")
        ax2.set_ylabel("validation accuracy")
        ax2.set_title("Validation accuracy vs. training-set size")
        ax2.grid(alpha=0.3)
        if n > 16:  # a tall figure for the bars: keep this panel a readable shape, at the top
            ax2.set_box_aspect(0.9)
            ax2.set_anchor("N")
        if groups:
            if len(groups) > 6:  # below the panel, where it hides no line
                ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=2, frameon=False)
            else:
                ax2.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def print_summary(result: dict) -> None:
    """The human-readable report for stdout."""
    rows = result["configs"]
    varied = [n for n in SWEEP_SETTINGS if n in rows[0]] if rows else []
    names = varied or list(SWEEP_SETTINGS)
    for i, r in enumerate(ranked(rows), 1):
        what = label(r["settings"] if "settings" in r else r, names)
        if r["status"] == "failed":
            print(f"   -  {what}: failed: {r['error']}")
        else:
            print(f"{i:>4}  {what}: val accuracy {r['val_accuracy']:.4f}, val loss {r['val_loss']:.4f}")
    best = result["best"]
    if best:
        print(f"best by validation accuracy: {best['run_dir']} (val {best['val_accuracy']:.4f}, test {best['test_accuracy']:.4f})")
    print(
        f"{result['trained']} trained, {result['skipped']} already done, {result['failed']} failed; "
        f"results in {Path(result['sweep_dir']) / 'sweep.csv'}, sweep.md, sweep.png"
    )
