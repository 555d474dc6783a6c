"""``image-logreg report``: the calibration maths by hand, and a whole report on a tiny run."""

import base64
import io
import json
import re
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from image_logreg.cli import main
from image_logreg.report import FIGURES, expected_calibration_error, write_report

FAST = ["--epochs", "2", "--quiet", "--no-download"]
MNIST_CLASSES = [f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows_with_confidence(conf: float, n: int, n_right: int, classes: int = 3):
    """``n`` probability rows whose top class (always 0) has probability ``conf``; ``n_right`` labelled 0."""
    rest = (1 - conf) / (classes - 1)
    probs = torch.full((n, classes), rest, dtype=torch.float64)
    probs[:, 0] = conf
    labels = torch.tensor([0] * n_right + [1] * (n - n_right))
    return probs, labels


# --- expected calibration error ---------------------------------------------------------------


def test_ece_of_a_calibrated_model_is_zero():
    # 70% sure and right 7 times in 10; 90% sure and right 9 times in 10
    p1, y1 = rows_with_confidence(0.7, 10, 7)
    p2, y2 = rows_with_confidence(0.9, 10, 9)
    cal = expected_calibration_error(torch.cat([p1, p2]), torch.cat([y1, y2]), bins=15)
    assert cal["ece"] == pytest.approx(0, abs=1e-9)
    assert sum(cal["count"]) == 20 and len(cal["count"]) == 15 and len(cal["edges"]) == 16
    filled = [i for i, c in enumerate(cal["count"]) if c]
    assert [cal["count"][i] for i in filled] == [10, 10]
    assert [cal["accuracy"][i] for i in filled] == pytest.approx([0.7, 0.9])
    assert [cal["confidence"][i] for i in filled] == pytest.approx([0.7, 0.9])
    assert all(cal["accuracy"][i] is None for i in range(15) if i not in filled)


def test_ece_of_an_overconfident_model_by_hand():
    # 4 answers at 95% confidence, 2 right: gap 0.45; 4 at 60%, 2 right: gap 0.10.
    # ECE = 0.45 * 4/8 + 0.10 * 4/8 = 0.275
    p1, y1 = rows_with_confidence(0.95, 4, 2)
    p2, y2 = rows_with_confidence(0.60, 4, 2)
    cal = expected_calibration_error(torch.cat([p1, p2]), torch.cat([y1, y2]))
    assert cal["ece"] == pytest.approx(0.275)
    assert cal["mean_confidence"] == pytest.approx(0.775) and cal["overall_accuracy"] == pytest.approx(0.5)


def test_ece_bins_are_closed_on_the_right():
    # a confidence of exactly 1 belongs to the last bin; one exactly on an edge to the bin below it
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    cal = expected_calibration_error(probs, torch.tensor([0, 0]), bins=2)
    assert cal["count"] == [1, 1]
    assert cal["ece"] == pytest.approx(0.25)  # (|1 - 1| + |1 - 0.5|) / 2
    with pytest.raises(ValueError):
        expected_calibration_error(probs, torch.tensor([0]))


# --- the report -------------------------------------------------------------------------------


def test_a_model_without_mistakes_still_gets_a_figure(tmp_path):
    from image_logreg.report import plot_mistakes

    probs = torch.eye(3) * 0.9 + 0.05
    path = plot_mistakes(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.arange(3), probs, list("abc"), tmp_path / "m.png")
    assert Image.open(path).format == "PNG"


class ImageCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def check_report(run, classes=MNIST_CLASSES) -> str:
    page = (run / "report.html").read_text(encoding="utf-8")
    parser = ImageCollector()
    parser.feed(page)
    parser.close()
    assert len(parser.sources) == len(FIGURES) + 1  # + the training curves
    for src in parser.sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)  # embedded: the page needs nothing beside it
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True))) as image:
            assert image.format == "PNG" and image.size[0] > 200
    for name in ("curves.png", *FIGURES.values()):
        assert Image.open(run / name).format == "PNG", name
    for name in classes:
        assert name in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary files left
    return page


def test_train_with_report_then_report_command(capsys, toy_data, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", run, *FAST, "--json", "--report")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["report"] == str(run / "report.html")
    check_report(run)

    # the command on its own, with the curves missing: it draws them again from history.json
    (run / "curves.png").unlink()
    (run / "report.html").unlink()
    code, out, err = run_cli(capsys, "report", run, "--json", "--no-download")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"report", "test_accuracy", "ece"} and result["report"] == str(run / "report.html")
    assert 0 <= result["ece"] <= 1 and result["test_accuracy"] > 0.5
    page = check_report(run)
    assert f"{result['ece']:.4f}" in page and f"{result['test_accuracy']:.4f}" in page


def test_report_of_a_fashion_run(capsys, toy_data, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", run, *FAST, "--dataset", "fashion-mnist")
    assert code == 0, err
    code, out, err = run_cli(capsys, "report", run)  # data dir: the run's own, from config.json
    assert code == 0, err
    assert out.strip() == str(run / "report.html")  # plain output: just the path
    page = check_report(run, classes=["T-shirt/top", "Ankle boot"])
    assert "T-shirt/top" in page and "Configuration" in page
    from image_logreg.errors import UsageError

    with pytest.raises(UsageError, match="already exists"):
        write_report(run, overwrite=False)


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("image-logreg: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_report_on_bad_input(capsys, tmp_path):
    code, out, err = run_cli(capsys, "report", tmp_path / "missing")
    assert_one_line_error(code, out, err, "missing", "no such run directory")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "report", tmp_path / "empty")
    assert_one_line_error(code, out, err, "not a complete run directory", "model.safetensors")
    (tmp_path / "file.txt").write_text("hello")
    code, out, err = run_cli(capsys, "report", tmp_path / "file.txt")
    assert_one_line_error(code, out, err, "not a run directory")
    assert not (tmp_path / "empty" / "report.html").exists()


def test_train_report_failure_says_the_run_is_safe(capsys, toy_data, tmp_path):
    (toy_data / "MNIST" / "raw" / "t10k-images-idx3-ubyte").unlink()  # training works, the report cannot
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", run, *FAST, "--report")
    assert_one_line_error(code, out, err, f"run saved to {run}", "t10k-images-idx3-ubyte")
    assert (run / "model.safetensors").is_file() and not (run / "report.html").exists()


def test_configuration_table_shows_only_what_applied_and_reads_plainly():
    from image_logreg.report import _applies, _heading, _setting

    adam = {"optimizer": "adam"}
    assert not _applies("lbfgs_iterations", adam) and not _applies("momentum", adam) and _applies("lr", adam)
    assert _applies("tolerance", {"optimizer": "lbfgs"}) and not _applies("batch_size", {"optimizer": "lbfgs"})
    assert _setting("max_memory", 12662634496) == "11.8 GiB" and _setting("seed", 0) == "0"
    assert _heading("mnist", "mnist") == "Logistic regression on mnist"
    assert _heading("mnist-2", "mnist") == "Logistic regression on mnist: mnist-2"


def test_the_start_line_says_how_inputs_are_prepared():
    from image_logreg.run import inputs_in_words
    from image_logreg.settings import RunConfig

    assert inputs_in_words(RunConfig(deskew=True)) == "deskewed"
    words = inputs_in_words(RunConfig(dataset="folder", image_size=[32, 32], class_weight="balanced"))
    assert words == "pixels / 255, decoded at 32x32, balanced class weights"
