"""Listing run directories: what was trained, how, and how well, one line per run."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError
from .files import read_json

COLUMNS = (
    ("name", "name", "s"),
    ("dataset", "dataset", "s"),
    ("optimizer", "optimizer", "s"),
    ("lr", "lr", "g"),
    ("batch_size", "batch", "d"),
    ("train_subset", "images", "s"),
    ("epochs", "epochs", "d"),
    ("val_accuracy", "val acc", ".4f"),
    ("val_loss", "val loss", ".4f"),
    ("seconds", "seconds", ".3g"),
    ("created", "created", "s"),
)
SORTS = {"created": False, "name": False, "val_accuracy": True, "val_loss": False, "seconds": False}  # True: descending


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "history.json").is_file()


def run_dirs(root: Path):
    """Run directories under ``root`` (or ``root`` itself), skipping hidden and staging folders."""
    if is_run_dir(root):
        yield root
        return
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for d in list(dirnames):
            if is_run_dir(here / d):
                dirnames.remove(d)  # runs do not nest: no need to look inside one
                yield here / d


def kept_record(history: list[dict], config: dict) -> dict:
    """The epoch record of the weights a run holds: its ``kept_epoch`` (--keep-best), else the last one."""
    kept = config.get("kept_epoch")
    if isinstance(kept, int) and 0 < kept <= len(history):
        return history[kept - 1]
    return history[-1] if history else {}


def describe(run_dir: Path, root: Path) -> dict:
    """One run's row: its settings, the validation metrics of the weights it holds and total training time."""
    config = read_json(run_dir / "config.json")
    history = read_json(run_dir / "history.json")
    final = kept_record(history, config)
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    return {
        "name": name,
        "dataset": config.get("dataset"),
        "optimizer": config.get("optimizer"),
        "lr": config.get("lr"),
        "batch_size": None if config.get("optimizer") == "lbfgs" else config.get("batch_size"),  # L-BFGS: full batch
        "train_subset": "all" if config.get("train_subset") is None else str(config["train_subset"]),
        "epochs": len(history),
        "val_accuracy": final.get("val_accuracy"),
        "val_loss": final.get("val_loss"),
        "seconds": round(sum(h.get("seconds", 0) for h in history), 3),
        "created": config.get("created"),
        "path": str(run_dir),
    }


def find_runs(root="runs", sort: str = "created", warn=None) -> list[dict]:
    """Every readable run directory under ``root``, as dicts, ordered by ``sort``."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory")
    if sort not in SORTS:
        raise UsageError(f"cannot sort by {sort!r}; choose from {', '.join(SORTS)}")
    runs = []
    for run_dir in run_dirs(root):
        try:
            runs.append(describe(run_dir, root))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            if warn:
                warn(f"image-logreg: skipping {run_dir}: unreadable config.json or history.json ({type(exc).__name__})")
    missing = [r for r in runs if r[sort] is None]  # unknown values sort last either way
    known = sorted((r for r in runs if r[sort] is not None), key=lambda r: r[sort], reverse=SORTS[sort])
    return known + missing


def format_table(runs: list[dict]) -> str:
    head = [title for _, title, _ in COLUMNS]
    body = [[("-" if r[key] is None else format(r[key], spec)) for key, _, spec in COLUMNS] for r in runs]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    numeric = [spec != "s" for _, _, spec in COLUMNS]
    line = lambda row: "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()
    return "\n".join([line(head), *map(line, body)])


def print_runs(runs: list[dict], root) -> None:
    if not runs:
        print(f"no runs under {root}")
        return
    print(format_table(runs))
