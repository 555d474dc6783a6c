"""Run directories after the fact: ``image-logreg runs`` lists them, ``--tensorboard`` logs into them."""

import json
import sys

import pytest


from conftest import FAST, run_cli, train


def test_runs_lists_run_directories(capsys, toy_data, tmp_path):
    root = tmp_path / "runs"
    good = train(capsys, toy_data, root / "good")
    poor = train(capsys, toy_data, root / "nested" / "poor", "--optimizer", "sgd", "--lr", "0.0001", "--epochs", "1")
    (root / ".staging.partial").mkdir()  # an unfinished run: hidden, never listed
    (root / "notes").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{")
    (root / "broken" / "history.json").write_text("[]")

    code, stdout, err = run_cli(capsys, "runs", root, "--json")
    runs = json.loads(stdout)
    assert code == 0 and "broken" in err and len(err.strip().splitlines()) == 1
    assert [r["name"] for r in runs] == ["good", "nested/poor"]  # by creation time
    first = runs[0]
    assert first["dataset"] == "mnist" and first["epochs"] == 3 and first["val_accuracy"] == good["val_accuracy"]
    assert first["batch_size"] > 0 and first["lr"] > 0 and first["seconds"] > 0 and first["created"]
    assert runs[1]["optimizer"] == "sgd" and runs[1]["lr"] == 0.0001 and runs[1]["val_loss"] == poor["val_loss"]

    code, stdout, _ = run_cli(capsys, "runs", root, "--json", "--sort", "val_accuracy")
    accs = [r["val_accuracy"] for r in json.loads(stdout)]
    assert accs == sorted(accs, reverse=True)

    code, stdout, _ = run_cli(capsys, "runs", root)
    lines = stdout.strip().splitlines()
    assert code == 0 and lines[0].split()[:3] == ["name", "dataset", "optimizer"] and len(lines) == 3
    assert "nested/poor" in stdout and f"{good['val_accuracy']:.4f}" in stdout
    assert "images" in lines[0] and first["train_subset"] == "all"
    assert f" {runs[1]['seconds']:.3g} " in stdout  # a short run's seconds are not rounded to 0.0

    code, stdout, err = run_cli(capsys, "runs", tmp_path / "nowhere")
    assert code == 2 and stdout == "" and "no such directory" in err


def test_an_lbfgs_run_has_no_batch_size(tmp_path):
    """L-BFGS steps over the whole training set: the batch size it records (a learnt run's parent's,
    or the default) is no batch it trained in."""
    from image_logreg.runs import find_runs

    for name, optimizer in (("full", "lbfgs"), ("batches", "adam")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"optimizer": optimizer, "batch_size": 128}))
        (tmp_path / name / "history.json").write_text(json.dumps([{"epoch": 1, "seconds": 0.5}]))
    assert {r["name"]: r["batch_size"] for r in find_runs(tmp_path)} == {"full": None, "batches": 128}


def test_a_run_shows_the_figures_of_the_weights_it_kept(tmp_path):
    """With --keep-best a run ends with an earlier epoch's weights: its row shows that epoch's figures."""
    from image_logreg.runs import find_runs

    epochs = [{"epoch": 1, "val_accuracy": 0.80, "val_loss": 0.9, "seconds": 0.1},
              {"epoch": 2, "val_accuracy": 0.85, "val_loss": 0.7, "seconds": 0.1},
              {"epoch": 3, "val_accuracy": 0.86, "val_loss": 0.8, "seconds": 0.1}]
    for name, kept in (("kept", 2), ("last", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"optimizer": "adam", "kept_epoch": kept}))
        (tmp_path / name / "history.json").write_text(json.dumps(epochs))
    rows = {r["name"]: (r["val_accuracy"], r["val_loss"]) for r in find_runs(tmp_path)}
    assert rows == {"kept": (0.85, 0.7), "last": (0.86, 0.8)}


def test_tensorboard_scalars_and_weight_images(capsys, toy_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    summary = train(capsys, toy_data, out, "--tensorboard")
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no event file inside the run directory"
    acc = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = acc.Tags()
    assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "seconds"} <= set(tags["scalars"])
    val = acc.Scalars("loss/val")
    assert [e.step for e in val] == [1, 2, 3]
    assert [e.value for e in val] == pytest.approx([h["val_loss"] for h in summary["history"]], rel=1e-5)
    assert len(tags["images"]) == 10 and "weights/0_0_zero" in tags["images"]
    image = acc.Images("weights/0_0_zero")[0]
    assert image.width == image.height == 112
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    board = tmp_path / "board"
    train(capsys, toy_data, tmp_path / "other", "--tensorboard", board, "--epochs", "1")
    assert list((board / "other").glob("events.out.tfevents.*")) and not (tmp_path / "other" / "tensorboard").exists()


def test_tensorboard_missing_is_a_one_line_error(capsys, toy_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    code, stdout, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "r", *FAST, "--tensorboard")
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert "pip install 'image-logreg[tensorboard]'" in err
    assert not (tmp_path / "r").exists()


def _dead_process() -> tuple[int, int]:
    """The pid and start time of a process that has ended (and been reaped)."""
    import subprocess

    from image_logreg.files import _start_time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = _start_time(child.pid)
    child.kill()
    child.wait()
    return child.pid, start


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process start times from /proc")
def test_a_later_run_removes_the_partials_of_killed_runs_to_its_out(capsys, toy_data, tmp_path):
    import os

    from image_logreg.files import _host, _maker

    root = tmp_path / "runs"
    pid, start = _dead_process()
    partials = {
        "killed": f".r.{_host()}-{pid}-{start}.k1ll3d_0.partial",
        "pid reused": f".r.{_host()}-{os.getpid()}-{start + 1}.r3us3d_0.partial",
        "running": f".r.{_maker()}.runn1ng0.partial",
        "another machine's": f".r.{'0' * 8 if _host() != '0' * 8 else '1' * 8}-{pid}-{start}.0th3rh0s.partial",
        "older naming": ".r.k3j4l5mz.partial",
        "another --out's": f".rr.{_host()}-{pid}-{start}.0th3r0ut.partial",
    }
    for name in partials.values():
        (root / name / "tensorboard").mkdir(parents=True)
        (root / name / "history.json").write_text("[]")

    train(capsys, toy_data, root / "r", "--epochs", "1")
    left = {p.name for p in root.iterdir()}
    assert partials["killed"] not in left and partials["pid reused"] not in left
    for kept in ("running", "another machine's", "older naming", "another --out's"):
        assert partials[kept] in left, kept
    assert left - set(partials.values()) == {"r"}, "the run left its own partial behind"


def test_a_partial_of_another_user_is_left_alone(tmp_path, monkeypatch):
    import os

    from image_logreg import files

    pid, start = _dead_process()
    stale = tmp_path / f".r.{files._host()}-{pid}-{start}.0th3rus3.partial"
    stale.mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(stale).st_uid + 1)
    assert files.remove_stale_partials(tmp_path / "r") == [] and stale.is_dir()
    monkeypatch.undo()
    assert files.remove_stale_partials(tmp_path / "r") == [stale] and not stale.exists()
