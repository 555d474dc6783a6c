"""The command line, end to end on tiny datasets: outputs, run directories and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image


from conftest import FAST, run_cli, train
from image_logreg.settings import CONSTRAINTS, RunConfig


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("image-logreg: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_json_and_run_directory(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    summary = train(capsys, toy_data, out)
    assert summary["run_dir"] == str(out) and summary["epochs"] == 3 and summary["seconds"] > 0
    assert summary["val_accuracy"] > 0.85 and summary["val_loss"] == summary["history"][-1]["val_loss"]
    assert set(summary["history"][0]) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"}
    for name in ("config.json", "split.json", "history.json", "history.csv", "model.safetensors", "curves.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "adam" and config["epochs"] == 3 and config["dataset"] == "mnist"
    assert RunConfig.from_dict(config).to_dict() == {k: config[k] for k in CONSTRAINTS}  # every setting, readable back
    split = json.loads((out / "split.json").read_text())
    assert len(split["val_indices"]) == 120 and len(split["train_indices"]) == 480
    assert not set(split["val_indices"]) & set(split["train_indices"])
    assert (out / "history.csv").read_text().count("\n") == 4
    assert Image.open(out / "curves.png").size[0] > 500
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_train_refuses_existing_run_dir_unless_overwrite(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, stdout, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", out, *FAST)
    assert_one_line_error(code, stdout, err, "already exists", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    train(capsys, toy_data, out, "--overwrite")
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_overwriting_a_run_keeps_the_corrections_its_users_stored(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    train(capsys, toy_data, out)
    stored = out / "feedback" / "7 - seven" / "20261201T000000Z-abc.png"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"a correction")
    train(capsys, toy_data, out, "--overwrite", "--seed", "1")
    assert stored.read_bytes() == b"a correction" and json.loads((out / "config.json").read_text())["seed"] == 1


def test_train_subset_and_tutorial_settings(capsys, toy_data, tmp_path):
    summary = train(
        capsys, toy_data, tmp_path / "run", "--optimizer", "sgd", "--lr", "0.001", "--batch-size", "100",
        "--schedule", "constant", "--train-subset", "100", "--val-fraction", "0.5", "--seed", "3",
    )
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train_indices"]) == 100 and len(split["val_indices"]) == 300
    assert summary["history"][0]["lr"] == 0.001


def test_evaluate_test_and_val(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    summary = train(capsys, toy_data, out)
    code, stdout, _ = run_cli(capsys, "evaluate", out, "--json")
    result = json.loads(stdout)
    assert code == 0 and result["n"] == 200 and result["accuracy"] > 0.85
    assert len(result["confusion"]) == 10 and sum(map(sum, result["confusion"])) == 200
    assert set(result["per_class"]) == {f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())}
    code, stdout, _ = run_cli(capsys, "evaluate", out, "--split", "val", "--json")
    val = json.loads(stdout)
    assert val["n"] == 120 and val["accuracy"] == pytest.approx(summary["val_accuracy"])
    # the temperature was fitted to the validation split's loss: it can only have lowered it
    assert val["loss"] <= summary["val_loss"] * (1 + 1e-6) and val["temperature"] != 1.0
    code, stdout, _ = run_cli(capsys, "evaluate", out / "model.safetensors")
    assert code == 0 and "accuracy" in stdout and "confusion matrix" in stdout


def test_predict_index_and_files(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    train(capsys, toy_data, out)
    code, stdout, _ = run_cli(capsys, "predict", out, "--index", "0", "5", "--json", "--top-k", "2")
    preds = json.loads(stdout)
    assert code == 0 and [p["source"] for p in preds] == ["test[0]", "test[5]"]
    assert all(len(p["top_k"]) == 2 and p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] for p in preds)
    assert preds[0]["label"] == preds[0]["true_label"]

    from image_logreg.datasets import load_split

    test = load_split("mnist", toy_data, "test", download=False)
    Image.fromarray(test.images[0].numpy()).save(tmp_path / "digit.png")
    # the toy images have a noisy background, so only --no-normalize feeds them exactly as stored
    code, stdout, _ = run_cli(capsys, "predict", out, tmp_path / "digit.png", "--json", "--no-normalize")
    (pred,) = json.loads(stdout)
    assert code == 0 and pred["source"] == str(tmp_path / "digit.png")
    assert pred["top_k"][0]["probability"] == pytest.approx(preds[0]["top_k"][0]["probability"], abs=1e-6)
    assert len(pred["top_k"]) == 3


def test_predict_bad_file_reports_it_and_goes_on(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    train(capsys, toy_data, out)
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255  # a clean "1": white ink on black, as MNIST stores it
    Image.fromarray(digit).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("this is not an image")
    code, stdout, err = run_cli(capsys, "predict", out, tmp_path / "bad.png", tmp_path / "good.png", "--json")
    assert code == 2
    bad, good = json.loads(stdout)  # one entry per file, in order, as /predict answers
    assert bad == {"source": str(tmp_path / "bad.png"), "error": err.removeprefix("image-logreg: error: ").strip()}
    assert good["source"] == str(tmp_path / "good.png") and "label" in good
    assert len(err.strip().splitlines()) == 1 and "bad.png" in err and "Traceback" not in err


def test_show_writes_a_grid_and_keeps_existing_files(capsys, toy_data, tmp_path):
    grid = tmp_path / "grid.png"
    code, stdout, _ = run_cli(capsys, "show", "--data-dir", toy_data, "--out", grid, "--count", "10")
    assert code == 0 and Image.open(grid).size[0] > 300
    code, stdout, err = run_cli(capsys, "show", "--data-dir", toy_data, "--out", grid)
    assert_one_line_error(code, stdout, err, "already exists")


def test_tutorial_state_dict_evaluates(capsys, toy_data, tmp_path):
    from image_logreg import LogisticRegression

    torch.manual_seed(0)
    torch.save(LogisticRegression().state_dict(), tmp_path / "tutorial.pth")
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path / "tutorial.pth", "--data-dir", toy_data, "--json")
    assert code == 0 and json.loads(stdout)["n"] == 200
    code, stdout, _ = run_cli(
        capsys, "evaluate", tmp_path / "tutorial.pth", "--dataset", "fashion-mnist", "--data-dir", toy_data, "--json"
    )
    assert code == 0 and "T-shirt/top" in json.loads(stdout)["per_class"]


# --- bad input: one line on stderr, exit 2 -------------------------------------------------------


def test_missing_dataset(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--data-dir", tmp_path / "empty", "--out", tmp_path / "r", *FAST)
    assert_one_line_error(code, out, err, "train-images-idx3-ubyte", "--data-dir")
    assert not (tmp_path / "r").exists()


def test_truncated_dataset(capsys, toy_data, tmp_path):
    path = toy_data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1000])
    code, out, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "r", *FAST)
    assert_one_line_error(code, out, err, "corrupt or truncated")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lr", "-1"], "--lr must be positive"),
        (["--lr", "nan"], "--lr must be positive"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--tolerance", "0"], "--tolerance must be positive"),
        (["--batch-size", "x"], "invalid int value"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--train-subset", "100000"], "--train-subset"),
        (["--train-subset", "0"], "--train-subset must be at least 1, got 0"),
        (["--train-subset", "-5"], "--train-subset must be at least 1, got -5"),
        (["--val-fraction", "-0.1"], "--val-fraction must be at least 0 and below 1"),
        (["--lbfgs-iterations", "0"], "--lbfgs-iterations must be positive, got 0"),
        (["--keep", "1.5"], "--keep must be above 0 and at most 1, got 1.5"),
        (["--max-memory", "lots"], "--max-memory must be a size such as 4G"),
        (["--image-size", "8x8"], "--image-size applies to --dataset folder and csv only, not mnist"),
        (["--preset", "fast"], "invalid choice"),
        (["--optimizer", "rmsprop"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
    ],
)
def test_bad_flag_values(capsys, toy_data, tmp_path, flags, fragment):
    code, out, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "r", *FAST, *flags)
    assert_one_line_error(code, out, err, fragment)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")
def test_cuda_asked_for_without_a_device(capsys, toy_data, tmp_path):
    code, out, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "r", *FAST, "--device", "cuda")
    assert_one_line_error(code, out, err, "no CUDA device")


@pytest.mark.parametrize("lr, said", [
    ("1e38", "1e+38"),  # the loss overflows
    ("1e6", "knows nothing"),  # SGD at lr 1e6 keeps its loss finite (tens of thousands) but is no fit at all
])
def test_diverging_run(capsys, toy_data, tmp_path, lr, said):
    code, out, err = run_cli(
        capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "r", *FAST,
        "--optimizer", "sgd", "--lr", lr, "--schedule", "constant",
    )
    assert_one_line_error(code, out, err, "diverged", said)
    assert not (tmp_path / "r").exists()


def test_checkpoint_of_the_wrong_shape(capsys, toy_data, tmp_path):
    from image_logreg import LogisticRegression

    torch.save(LogisticRegression((28, 28), 3).state_dict(), tmp_path / "three.pth")
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "three.pth", "--data-dir", toy_data)
    assert_one_line_error(code, out, err, "three.pth", "shape")


def test_predict_needs_something_to_predict(capsys, toy_data, tmp_path):
    train(capsys, toy_data, tmp_path / "run")
    code, out, err = run_cli(capsys, "predict", tmp_path / "run")
    assert_one_line_error(code, out, err, "--index")
    code, out, err = run_cli(capsys, "predict", tmp_path / "run", "--index", "100000", "--data-dir", toy_data)
    assert_one_line_error(code, out, err, "out of range")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "predict", tmp_path / "run", tmp_path / "empty")
    assert_one_line_error(code, out, err, "no image files")


def test_module_entry_point_has_no_traceback(tmp_path):
    """``python -m image_logreg`` works, and bad input never shows a traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "image_logreg", "--version"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("image-logreg ")
    bad = subprocess.run(
        [sys.executable, "-m", "image_logreg", "evaluate", str(tmp_path / "missing")],
        capture_output=True, text=True, env=env,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_the_program_returns_main_s_status_and_skips_the_last_collections(monkeypatch):
    import gc

    from image_logreg import cli

    monkeypatch.setattr(cli, "main", lambda: 3)
    try:
        assert cli.command() == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process goes on


def test_predict_csv_and_preprocessed_images(capsys, toy_data, tmp_path):
    import csv

    out = tmp_path / "run"
    train(capsys, toy_data, out)
    images = tmp_path / "user" / "nested"
    images.mkdir(parents=True)
    page = np.full((90, 70), 245, dtype=np.uint8)
    page[20:70, 30:38] = 20  # a dark stroke on light paper
    Image.fromarray(page).save(images / "one.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    before = sorted(p.name for p in images.iterdir())
    code, stdout, err = run_cli(
        capsys, "predict", out, tmp_path / "user", "--csv", tmp_path / "preds.csv",
        "--save-preprocessed", tmp_path / "seen", "--json",
    )
    assert code == 2 and "broken.jpg" in err and len(err.strip().splitlines()) == 1
    broken, pred = json.loads(stdout)  # broken.jpg sorts first
    assert set(broken) == {"source", "error"} and "broken.jpg" in broken["error"]
    seen = Image.open(pred["preprocessed"])
    assert seen.size == (28, 28) and np.asarray(seen)[0, 0] == 0 and np.asarray(seen).max() > 200  # inverted, centred
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert [r["source"].endswith(n) for r, n in zip(rows, ["one.png", "broken.jpg"])] == [True, True]
    assert rows[0]["label"] == pred["label"] and rows[1]["error"] and not rows[1]["label"]
    assert sorted(p.name for p in images.iterdir()) == before  # nothing written beside the user's images
    code, stdout, err = run_cli(capsys, "predict", out, images / "one.png", "--csv", tmp_path / "preds.csv")
    assert_one_line_error(code, stdout, err, "preds.csv already exists")


def test_lbfgs_reports_convergence(capsys, toy_data, tmp_path):
    summary = train(capsys, toy_data, tmp_path / "run", "--optimizer", "lbfgs", "--weight-decay", "0.01", "--epochs", "20", "--tolerance", "1e-4")
    assert summary["lbfgs"]["converged"] and summary["lbfgs"]["grad_norm"] <= 1e-4 and summary["lbfgs"]["iterations"] > 0
    assert summary["epochs"] < 20  # stopped once converged


# --- the sharp edges a new user meets ------------------------------------------------------------


def test_run_records_the_data_dir_absolute(capsys, toy_data, tmp_path, monkeypatch):
    """A run trained with a relative --data-dir evaluates from any folder; --data-dir and
    $IMAGE_LOGREG_DATA still override what it recorded."""
    monkeypatch.delenv("IMAGE_LOGREG_DATA", raising=False)
    monkeypatch.chdir(toy_data.parent)
    code, _, err = run_cli(capsys, "train", "--data-dir", toy_data.name, "--out", "run", *FAST)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert os.path.isabs(config["data_dir"]) and os.path.samefile(config["data_dir"], toy_data)

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "run", "--json", "--no-download")
    assert code == 0 and json.loads(out)["n"] == 200, err
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "run", "--data-dir", tmp_path / "given", "--no-download")
    assert_one_line_error(code, out, err, str(tmp_path / "given"))
    monkeypatch.setenv("IMAGE_LOGREG_DATA", str(tmp_path / "from-env"))
    code, out, err = run_cli(capsys, "predict", tmp_path / "run", "--index", "0", "--no-download")
    assert_one_line_error(code, out, err, str(tmp_path / "from-env"))


def _no_downloads(monkeypatch) -> list[str]:
    """Record each folder a download is asked for, and fail it as a machine offline would."""
    from image_logreg.datasets import idx

    asked = []

    def offline(dataset):
        def fetch(root, **kwargs):
            asked.append(root)
            raise OSError("network unreachable")
        return fetch

    monkeypatch.setattr(idx, "dataset_class", offline)
    return asked


def test_the_recorded_data_folder_is_named_and_never_downloaded_into(capsys, toy_data, tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGE_LOGREG_DATA", raising=False)
    run = tmp_path / "run"
    train(capsys, toy_data, run)
    code, out, err = run_cli(capsys, "evaluate", run, "--json")
    assert code == 0 and json.loads(out)["n"] == 200
    assert err.strip() == f"reading test data from {toy_data.resolve()} (recorded in the run; --data-dir to change)"
    code, out, err = run_cli(capsys, "evaluate", run, "--data-dir", toy_data, "--json")
    assert code == 0 and err == ""  # a folder the user named needs no word

    asked = _no_downloads(monkeypatch)
    gone = toy_data.rename(tmp_path / "moved")
    for command in (["evaluate", run], ["evaluate", run, "--split", "val"], ["predict", run, "--index", "0"], ["report", run]):
        code, out, err = run_cli(capsys, *command)
        assert_one_line_error(code, out, err, str(toy_data), "recorded in the run", "--data-dir")
    assert asked == [] and not toy_data.exists(), "a download was tried in, or a folder made at, the recorded path"

    code, out, err = run_cli(capsys, "predict", run, "--index", "0", "--data-dir", gone, "--json")
    assert code == 0 and json.loads(out)[0]["true_label"] and err == ""


def test_a_named_data_folder_may_still_be_downloaded_into(capsys, toy_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(capsys, toy_data, run)
    asked = _no_downloads(monkeypatch)
    code, out, err = run_cli(capsys, "evaluate", run, "--data-dir", tmp_path / "named")
    assert_one_line_error(code, out, err, "download failed")
    monkeypatch.setenv("IMAGE_LOGREG_DATA", str(tmp_path / "from-env"))
    code, out, err = run_cli(capsys, "evaluate", run)
    assert_one_line_error(code, out, err, "download failed")
    assert asked == [str(tmp_path / "named"), str(tmp_path / "from-env")]


def test_val_fraction_zero_trains_on_everything(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    summary = train(capsys, toy_data, out, "--val-fraction", "0")
    split = json.loads((out / "split.json").read_text())
    assert len(split["train_indices"]) == 600 and split["val_indices"] == []
    assert summary["train_accuracy"] > 0.9 and "val_accuracy" not in summary
    assert all(not any(k.startswith("val_") for k in h) for h in summary["history"])
    assert (out / "history.csv").read_text().splitlines()[0] == "epoch,train_loss,train_accuracy,lr,seconds"
    assert (out / "curves.png").is_file()

    code, stdout, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", out, *FAST, "--val-fraction", "0", "--overwrite")
    assert code == 0 and stdout.startswith("train accuracy ") and "no validation set" in stdout, err
    code, stdout, err = run_cli(capsys, "evaluate", out, "--split", "val")
    assert_one_line_error(code, stdout, err, "no validation split", "--val-fraction 0", "--split test")
    code, stdout, err = run_cli(capsys, "evaluate", out, "--json")
    assert code == 0 and json.loads(stdout)["n"] == 200
    code, stdout, err = run_cli(capsys, "runs", tmp_path, "--sort", "val_accuracy")
    assert code == 0 and stdout.splitlines()[1].split()[:2] == ["run", "mnist"], err
    code, stdout, err = run_cli(capsys, "report", out, "--json", "--no-download")
    assert code == 0, err


def test_preset_tutorial_and_the_flags_that_override_it(capsys, toy_data, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "run", "--no-download", "--preset", "tutorial")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    tutorial = {"optimizer": "sgd", "lr": 0.001, "batch_size": 100, "schedule": "constant", "val_fraction": 0.2, "epochs": 5}
    assert {k: config[k] for k in tutorial} == tutorial and config["momentum"] == 0
    assert "(sgd, constant lr 0.001, batch 100, 5 epochs, " in err.splitlines()[0]  # the schedule is named

    summary = train(capsys, toy_data, tmp_path / "run2", "--preset", "tutorial", "--lr", "0.01", "--val-fraction", "0.5")
    config = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert config["lr"] == 0.01 and config["val_fraction"] == 0.5 and config["epochs"] == 3  # FAST's --epochs 3
    assert config["optimizer"] == "sgd" and config["schedule"] == "constant" and summary["history"][-1]["lr"] == 0.01


def test_training_line_names_the_default_schedule(capsys, toy_data, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "run", "--no-download", "--epochs", "1")
    assert code == 0 and "(adam, lr 0.02 with cosine decay, batch 128, 1 epochs, " in err.splitlines()[0], err


def test_evaluate_calls_the_per_class_column_recall(capsys, toy_data, tmp_path):
    train(capsys, toy_data, tmp_path / "run")
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path / "run")
    head = next(line for line in stdout.splitlines() if line.startswith("class"))
    assert code == 0 and head.split() == ["class", "recall", "precision", "f1"]
    code, stdout, _ = run_cli(capsys, "evaluate", tmp_path / "run", "--json")
    result = json.loads(stdout)
    assert result["recall"] == result["per_class"]  # per_class kept for readers of older output


def test_a_reader_that_stops_early_gets_no_error(toy_data, tmp_path):
    """`image-logreg evaluate RUN | head -1`: the closed pipe is the reader's choice, not an error."""
    run_dir = tmp_path / "run"
    assert subprocess.run([sys.executable, "-m", "image_logreg", "train", "--data-dir", str(toy_data), "--out", str(run_dir),
                           *FAST], capture_output=True).returncode == 0
    # `true` reads nothing and is gone long before the results are written: the write always fails.
    done = subprocess.run(
        f"set -o pipefail; {sys.executable} -m image_logreg evaluate {run_dir} --data-dir {toy_data} --no-download | true", shell=True,
        executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )
    assert done.stderr == "" and done.returncode == 141
