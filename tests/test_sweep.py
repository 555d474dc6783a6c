"""``image-logreg sweep`` on tiny datasets: the grid, its reports, resuming, failures and bad input."""

import csv
import json

import pytest
from PIL import Image

from image_logreg.cli import main
from image_logreg.errors import UsageError
from image_logreg.sweep import expand, grid_from_flags, parse_values, run_name
from image_logreg.train import TrainConfig

BATCH, OPT = TrainConfig().batch_size, TrainConfig().optimizer

FAST = ["--epochs", "1", "--quiet", "--no-download"]


def sweep(capsys, toy_data, out, *flags):
    code = main(["sweep", "--data-dir", str(toy_data), "--out", str(out), *FAST, "--json", *map(str, flags)])
    stdout, err = capsys.readouterr()
    return code, (json.loads(stdout) if stdout else None), err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_accuracies(path):
    """The val accuracy column of sweep.md's ranked rows."""
    lines = [l for l in path.read_text().splitlines() if l.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    col = head.index("val accuracy")
    return [float(c) for l in lines[1:] if (c := l.strip("|").split("|")[col].strip())]


def test_grid_runs_reports_and_resumes(capsys, toy_data, tmp_path):
    out = tmp_path / "sweep"
    code, result, err = sweep(capsys, toy_data, out, "--lr", "0.01,0.1", "--batch-size", "50,100", "--optimizer", "sgd")
    assert code == 0, err
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 4 and all((p / "model.safetensors").is_file() for p in runs)
    assert runs[0].name == "lr=0.01_batch_size=100"  # named after what the sweep varies
    assert result["trained"] == 4 and result["skipped"] == 0 and result["failed"] == 0

    rows = read_csv(out / "sweep.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"trained"}
    assert set(rows[0]) >= {"lr", "batch_size", "val_accuracy", "val_loss", "train_accuracy", "seconds", "run_dir"}
    assert "optimizer" not in rows[0]  # only the varied settings get columns
    accs = md_accuracies(out / "sweep.md")
    assert len(accs) == 4 and accs == sorted(accs, reverse=True)
    assert Image.open(out / "sweep.png").size[0] > 500

    best = json.loads((out / "best.json").read_text())
    assert best == result["best"] and 0 <= best["test_accuracy"] <= 1 and best["n_test"] == 200
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in result["configs"])
    assert best["settings"]["optimizer"] == "sgd" and best["settings"]["train_subset"] == "all"

    mtimes = {p: (p / "model.safetensors").stat().st_mtime_ns for p in runs}
    code, again, err = sweep(capsys, toy_data, out, "--lr", "0.1,0.01", "--batch-size", "100,50", "--optimizer", "sgd")
    assert code == 0, err
    assert again["trained"] == 0 and again["skipped"] == 4
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in runs} == mtimes
    assert sorted(r["val_accuracy"] for r in again["configs"]) == sorted(r["val_accuracy"] for r in result["configs"])
    assert again["best"]["run_dir"] == best["run_dir"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging or temp leftovers


def test_train_subset_panel_and_sizes(capsys, toy_data, tmp_path):
    out = tmp_path / "sweep"
    code, result, err = sweep(capsys, toy_data, out, "--train-subset", "50,all", "--lr", "0.01,0.05")
    assert code == 0, err
    assert sorted({r["n_train"] for r in result["configs"]}) == [50, 480]
    assert {r["train_subset"] for r in result["configs"]} == {50, "all"}
    assert Image.open(out / "sweep.png").size[0] > 1200  # two panels side by side


def test_failed_configs_are_recorded_and_the_rest_go_on(capsys, toy_data, tmp_path):
    out = tmp_path / "sweep"
    code, result, err = sweep(
        capsys, toy_data, out, "--optimizer", "sgd", "--lr", "0.01,1e38", "--train-subset", "100,100000"
    )
    assert code == 2
    by = {(r["lr"], r["train_subset"]): r for r in result["configs"]}
    assert by[(0.01, 100)]["status"] == "trained"
    assert by[(1e38, 100)]["status"] == "failed" and "diverged" in by[(1e38, 100)]["error"]
    assert "--train-subset" in by[(0.01, 100000)]["error"]
    assert result["failed"] == 3 and result["best"]["run_dir"] == by[(0.01, 100)]["run_dir"]
    rows = read_csv(out / "sweep.csv")
    assert [r["status"] for r in rows].count("failed") == 3
    assert all("\n" not in r["error"] for r in rows)
    name = "lr=0.01_train_subset=100"
    assert [p.name for p in out.iterdir() if p.is_dir()] == [name]  # failed runs leave no directory
    assert "diverged" in (out / "sweep.md").read_text() and (out / "sweep.png").is_file()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lr", "0.01,abc"], "--lr: 'abc' is not a number"),
        (["--batch-size", "100,1.5"], "--batch-size: '1.5' is not a whole number"),
        (["--train-subset", "some"], "'all'"),
        (["--train-subset", "0,all"], "--train-subset"),
        (["--optimizer", "sgd,rmsprop"], "rmsprop"),
        (["--lr", "0.01,,0.1"], "empty value"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--val-fraction", "0.2,1"], "--val-fraction"),
        (["--val-fraction", "0,0.2"], "compares configurations by validation accuracy"),
        (["--preset", "fast"], "invalid choice"),
    ],
)
def test_bad_values_are_one_line_errors(capsys, toy_data, tmp_path, flags, fragment):
    code, result, err = sweep(capsys, toy_data, tmp_path / "sweep", *flags)
    assert code == 2 and result is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("image-logreg: error: ") and fragment in lines[0], err
    assert not (tmp_path / "sweep").exists()


def test_preset_tutorial_is_the_base_the_grid_varies(capsys, toy_data, tmp_path):
    out = tmp_path / "sweep"
    code, result, err = sweep(capsys, toy_data, out, "--preset", "tutorial", "--lr", "0.001,0.01")
    assert code == 0 and result["trained"] == 2, err
    configs = [json.loads((out / r["run_dir"] / "config.json").read_text()) for r in result["configs"]]
    assert [c["lr"] for c in configs] == [0.001, 0.01]
    for c in configs:
        assert (c["optimizer"], c["batch_size"], c["schedule"], c["val_fraction"]) == ("sgd", 100, "constant", 0.2)
        assert c["epochs"] == 1  # FAST's --epochs 1 overrides the preset's 5


def test_resume_refuses_runs_trained_differently_and_foreign_folders(capsys, toy_data, tmp_path):
    out = tmp_path / "sweep"
    assert sweep(capsys, toy_data, out, "--lr", "0.01")[0] == 0
    code = main(["sweep", "--data-dir", str(toy_data), "--out", str(out), "--epochs", "2", "--quiet", "--lr", "0.01"])
    _, err = capsys.readouterr()
    assert code == 2 and "epochs" in err and "--overwrite" in err
    code = main(["sweep", "--data-dir", str(toy_data), "--out", str(out), "--epochs", "2", "--quiet", "--lr", "0.01", "--overwrite"])
    capsys.readouterr()
    assert code == 0 and len(json.loads(next(out.glob("lr=*/history.json")).read_text())) == 2

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = sweep(capsys, toy_data, tmp_path / "mine")
    assert code == 2 and "does not hold a sweep" in err


def test_parsing_and_names():
    assert parse_values("lr", "1e-3, 0.01,0.001") == [0.001, 0.01]
    assert parse_values("train_subset", "ALL,1000") == [None, 1000]
    assert parse_values("optimizer", "SGD,adam") == ["sgd", "adam"]
    with pytest.raises(UsageError):
        parse_values("weight_decay", "0,x")
    with pytest.raises(UsageError, match="'all' is not a number"):  # "all" means the whole set, for a subset only
        parse_values("lr", "all")


def test_every_grid_setting_reads_its_values_as_its_constraint_row_says():
    """A whole-number setting takes "2", a number "2" as 2.0, a choice any case: from the table, not a list here."""
    from image_logreg.settings import CONSTRAINTS, Interval, Options
    from image_logreg.sweep import SWEEP_SETTINGS

    for name in SWEEP_SETTINGS:
        row = CONSTRAINTS[name]
        if any(isinstance(rule, Options) for rule in row):
            choice = next(rule for rule in row if isinstance(rule, Options)).choices[0]
            assert parse_values(name, choice.upper()) == [choice]
        elif any(isinstance(rule, Interval) and rule.kind is int for rule in row):
            assert parse_values(name, "2") == [2] and isinstance(parse_values(name, "2")[0], int)
        else:
            assert parse_values(name, "0.5") == [0.5] and isinstance(parse_values(name, "0.5")[0], float)


def test_run_names():
    grid = grid_from_flags({"lr": "0.1,1e-05", "train_subset": "all"})
    names = [run_name(s) for s in expand(grid)]
    assert names == [
        f"lr=0.1_batch_size={BATCH}_val_fraction=0.2_train_subset=all_optimizer={OPT}_weight_decay=0.0",
        f"lr=1e-05_batch_size={BATCH}_val_fraction=0.2_train_subset=all_optimizer={OPT}_weight_decay=0.0",
    ]
    assert [run_name(s, ["lr"]) for s in expand(grid)] == ["lr=0.1", "lr=1e-05"]  # as a sweep names them
    assert run_name(expand(grid)[0], []) == names[0]  # one run: named in full
    default_lr = expand(grid_from_flags({"optimizer": "sgd,adam"}))
    assert all(isinstance(s["lr"], float) for s in default_lr)  # the optimizer's default, spelled out
