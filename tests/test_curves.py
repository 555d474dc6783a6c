"""The training curves' helper process: the same figure as drawn in place, and in place whenever it fails."""

import subprocess
import sys
import time

import pytest

from image_logreg import curves

HISTORY = [{"epoch": k, "train_loss": 1 / k, "train_accuracy": 1 - 0.5 / k, "val_loss": 1.1 / k, "val_accuracy": 1 - 0.6 / k,
            "seconds": 0.1} for k in range(1, 6)]


@pytest.fixture
def helper(monkeypatch):
    """A helper of this test's own, ended with the test."""
    started = curves.Helper()
    monkeypatch.setattr(curves, "_helper", started)
    yield started
    started.stop()


def drawn_in_place(path, **options):
    from image_logreg.plots import plot_curves

    plot_curves(HISTORY, path, **options)
    return path.read_bytes()


def test_the_helper_draws_the_figure_drawn_in_place(helper, tmp_path, monkeypatch):
    monkeypatch.setattr(curves, "_draw_here", lambda request: pytest.fail(f"drawn in place: {request['path']}"))
    with curves.drawing() as draw:
        draw(HISTORY, tmp_path / "helper.png", title="mnist — logistic regression", kept_epoch=3)
    monkeypatch.undo()
    expected = drawn_in_place(tmp_path / "here.png", title="mnist — logistic regression", kept_epoch=3)
    assert (tmp_path / "helper.png").read_bytes() == expected
    assert helper.alive()  # kept for the next run


def test_a_command_starts_one_helper_for_all_its_runs(monkeypatch):
    monkeypatch.setattr(curves, "_helper", None)
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)  # as in a fresh process; put back after
    curves.start()
    first = curves._helper
    try:
        assert first is not None and first.alive()
        curves.start()  # sweep's second run, say
        assert curves._helper is first
    finally:
        first.stop()


def test_only_a_command_starts_a_helper(tmp_path, monkeypatch):
    monkeypatch.setattr(curves, "_helper", None)
    monkeypatch.setattr(curves, "_draw_here", lambda request: open(request["path"], "wb").close())
    with curves.drawing() as draw:  # as a notebook or the server would train
        draw(HISTORY, tmp_path / "c.png")
    assert curves._helper is None and (tmp_path / "c.png").is_file()


def test_a_fresh_train_process_never_imports_matplotlib_and_still_writes_its_curves(toy_data, tmp_path):
    probe = ("import sys\nfrom image_logreg.cli import main\n"
             f"code = main(['train', '--data-dir', {str(toy_data)!r}, '--out', {str(tmp_path / 'run')!r}, '--epochs', '2', "
             "'--quiet', '--no-download'])\nprint(code, 'matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "0 False"
    from PIL import Image

    with Image.open(tmp_path / "run" / "curves.png") as figure:
        assert figure.size[0] > 500


def test_a_helper_that_has_died_leaves_the_figure_to_be_drawn_in_place(helper, tmp_path):
    helper.process.kill()
    helper.process.wait()
    with curves.drawing() as draw:
        draw(HISTORY, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes() == drawn_in_place(tmp_path / "here.png")
    assert curves._running() is None  # no second helper: this process draws in place from now on


def test_a_helper_that_does_not_answer_is_stopped_and_the_figure_drawn_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(curves.Helper, "COMMAND", ["-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(curves, "ANSWER_SECONDS", 0.5)
    silent = curves.Helper()
    monkeypatch.setattr(curves, "_helper", silent)
    started = time.perf_counter()
    with curves.drawing() as draw:
        draw(HISTORY, tmp_path / "c.png")
    assert time.perf_counter() - started < 30
    assert silent.process.poll() is not None  # ended, not left sleeping
    assert (tmp_path / "c.png").is_file()


def test_a_figure_that_cannot_be_written_fails_as_it_would_in_place(helper, tmp_path):
    (tmp_path / "a file").write_text("not a folder")
    with pytest.raises(OSError):
        with curves.drawing() as draw:
            draw(HISTORY, tmp_path / "a file" / "c.png")
    assert helper.alive()  # the helper said why; it is still good for the next figure


def test_a_failing_block_waits_for_its_figure_before_it_goes_on_failing(helper, tmp_path):
    with pytest.raises(RuntimeError, match="calibration failed"):
        with curves.drawing() as draw:
            draw(HISTORY, tmp_path / "c.png")
            raise RuntimeError("calibration failed")
    assert (tmp_path / "c.png").is_file()  # written before the failure went on: nothing writes later
    assert helper.alive()
    with curves.drawing() as draw:  # and the helper's answers are still in step with its requests
        draw(HISTORY, tmp_path / "d.png", title="next")
    assert (tmp_path / "d.png").read_bytes() == drawn_in_place(tmp_path / "here.png", title="next")


def test_a_second_thread_draws_in_place_while_the_helper_is_busy(helper, tmp_path, monkeypatch):
    in_place = []
    monkeypatch.setattr(curves, "_draw_here", in_place.append)
    with curves.drawing() as draw:
        with curves.drawing() as second:  # as another thread's run would meet it
            second(HISTORY, tmp_path / "second.png")
        draw(HISTORY, tmp_path / "first.png")
    assert [r["path"] for r in in_place] == [str(tmp_path / "second.png")]
    assert (tmp_path / "first.png").is_file()


def test_the_helper_answers_a_line_for_every_request_even_when_a_library_prints(tmp_path, monkeypatch):
    import io
    import json

    from image_logreg import plots

    def chatty(history, path, title="", kept_epoch=None):
        print("a library's chatter")
        if "bad" in str(path):
            raise ValueError("no good")
        open(path, "wb").close()

    monkeypatch.setattr(plots, "plot_curves", chatty)
    answers = io.StringIO()
    monkeypatch.setattr(sys, "stdout", answers)  # the helper's stdout; serve() points sys.stdout elsewhere
    requests = "".join(json.dumps({"history": HISTORY, "path": str(tmp_path / name), "title": "", "kept_epoch": None}) + "\n"
                       for name in ("a.png", "bad.png", "c.png"))
    curves.serve(io.StringIO(requests))
    assert [json.loads(line) for line in answers.getvalue().splitlines()] == [{}, {"error": "ValueError: no good"}, {}]


def test_a_wait_cut_short_ends_the_helper_rather_than_let_its_answers_fall_out_of_step(helper, tmp_path, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(helper, "answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with curves.drawing() as draw:
            draw(HISTORY, tmp_path / "c.png")
    assert not helper.alive()
    assert curves._running() is None  # the next run draws in place
