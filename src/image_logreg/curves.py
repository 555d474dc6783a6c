"""A run's ``curves.png``, drawn by a helper process while this one trains.

matplotlib takes about a second to import and draw its first figure, as long as a default fit.
A fresh ``train`` needs it only at the very end, and its fit, on one thread, leaves the other
cores idle all along: so the command starts a helper process that imports matplotlib there,
and each run hands it the finished history to draw while the run calibrates and writes the rest
of its files. A process no command started one for (a notebook, the server) draws in place, and
so does one whose helper cannot start, fails or stops answering: the figure is the same either way.

The helper reads one JSON request per line on its stdin and answers one JSON line on its stdout,
``{}`` or ``{"error": ...}``; it ends when its stdin closes, that is, with the process that started it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

ANSWER_SECONDS = 120  # a figure not drawn by then never will be: the helper is stopped, the figure drawn here


class Helper:
    """The helper process, its requests and answers."""

    COMMAND = ["-m", __name__]  # after the interpreter's path

    def __init__(self):
        package_parent = str(Path(__file__).resolve().parent.parent)  # the helper imports this very package
        path = os.pathsep.join(filter(None, (package_parent, os.environ.get("PYTHONPATH"))))
        # a session of its own: Ctrl-C at the terminal is for the command, which decides what stops
        self.process = subprocess.Popen(
            [sys.executable, *self.COMMAND], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env={**os.environ, "PYTHONPATH": path}, start_new_session=True,
        )
        self.lock = threading.Lock()  # one run's requests and answers at a time
        self.owner = os.getpid()

    def ask(self, request: dict) -> bool:
        """Send one figure to draw; False if the helper has gone."""
        try:
            self.process.stdin.write(json.dumps(request, default=float) + "\n")
            self.process.stdin.flush()
            return True
        except (OSError, ValueError):  # a broken pipe, or stdin already closed
            return False

    def answer(self) -> str | None:
        """None once the figure asked for is on disk; else why it is not."""
        ready, _, _ = select.select([self.process.stdout], [], [], ANSWER_SECONDS)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.stop()
            return "the helper stopped answering" if not ready else "the helper stopped"
        try:
            return json.loads(line).get("error")
        except ValueError:
            self.stop()
            return "the helper answered nonsense"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Close its stdin (its cue to end) and wait a moment; then end it."""
        with contextlib.suppress(OSError, ValueError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_helper: Helper | None = None  # started by a command: a library caller (a notebook, the server) draws in place
_starting = threading.Lock()


def start() -> None:
    """Start the helper now, for the runs this process is about to train: the sooner, the longer it
    has to get ready. Nothing to do where matplotlib is here already or a helper is running."""
    global _helper
    with _starting:
        if _running() is not None or "matplotlib" in sys.modules or os.name != "posix" or not sys.executable:
            return
        with contextlib.suppress(OSError):
            _helper = Helper()
            atexit.register(_helper.stop)


def _running() -> Helper | None:
    """This process's helper, unless it has stopped (failed: the process draws in place from then on)."""
    if _helper is None or _helper.owner != os.getpid():  # a forked child does not share its parent's
        return None
    return _helper if _helper.alive() else None


@contextlib.contextmanager
def drawing():
    """Yields ``draw(history, path, title, kept_epoch)``, which asks for a figure of the training
    curves and returns at once; every figure asked for is on disk when the block ends (raising as
    ``plots.plot_curves`` would, if it cannot be written). A block that fails waits for its figures
    before it goes on failing, so that nothing still writes into a directory being removed."""
    helper = _running()
    if helper is not None and not helper.lock.acquire(blocking=False):
        helper = None  # another thread's run is using it: this one draws in place
    asked: list[dict] = []
    unanswered = 0

    def draw(history, path, title: str = "", kept_epoch: int | None = None) -> None:
        nonlocal unanswered
        request = {"history": list(history), "path": str(Path(path).resolve()), "title": title, "kept_epoch": kept_epoch}
        sent = helper is not None and helper.ask(request)
        unanswered += sent
        asked.append(dict(request, sent=sent))

    def answer() -> str | None:
        nonlocal unanswered
        error = helper.answer()
        unanswered -= 1
        return error

    try:
        try:
            yield draw
        except BaseException:
            while unanswered:
                answer()
            raise
        for request in asked:
            if not request["sent"] or answer() is not None:
                _draw_here(request)  # the same figure, or the error that stopped the helper drawing it
    finally:
        if helper is not None:
            if unanswered:  # interrupted while waiting: its next answers would be taken for later figures'
                helper.stop()
            helper.lock.release()


def _draw_here(request: dict) -> None:
    from .plots import plot_curves

    plot_curves(request["history"], request["path"], title=request["title"], kept_epoch=request["kept_epoch"])


def serve(requests=None, answers=None) -> None:
    """The helper's loop: draw each request, answer each with one line."""
    requests = requests or sys.stdin
    answers = answers or sys.stdout
    sys.stdout = sys.stderr  # anything a library prints must not be taken for an answer
    from . import plots  # noqa: F401  (the import the helper exists for, made before the first request)

    for line in requests:
        try:
            _draw_here(json.loads(line))
            answer = {}
        except Exception as exc:  # noqa: BLE001 (any failure is the asker's to report: it draws in place)
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
    # every answer is flushed and every figure renamed into place: tearing down matplotlib's
    # modules would only keep the command waiting (0.2-0.3 s) for a process with nothing left to do
    os._exit(0)
