"""Correcting the page's answer in Chromium: "It's a ..." stores the drawing and, with --learn,
the page shows the new version's answer at once; a restart serves what was saved as a run.

Uses the browser, server and drawing helpers of ``test_serve_browser``; screenshots as there
(UPDATE_SCREENSHOT=1 replaces docs/serve-page-feedback.png).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from test_serve_browser import (  # noqa: F401 - browser, open_page, screenshots and digits are fixtures
    WAIT_MS,
    browser,
    by_testid,
    digits,
    draw,
    open_page,
    predicted,
    probabilities,
    save_screenshot,
    screenshots,
    serving,
)

pytestmark = pytest.mark.integration


def poly(corners: list[tuple[float, float]], steps: int = 12) -> list[tuple[float, float]]:
    points = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
        points += [(x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps) for i in range(steps)]
    return points + [corners[-1]]


def one_with_a_flag_and_a_foot() -> list[list[tuple[float, float]]]:
    """A 1 as many people write it. MNIST's ones are mostly bare strokes: the model is unsure of
    it (a 1, a 2 or a 3), which makes its runner-up the class a person may well say it is."""
    return [poly([(0.35, 0.3), (0.55, 0.15), (0.55, 0.82)]), poly([(0.35, 0.82), (0.72, 0.82)])]


def draw_one(page) -> tuple[str, str | None]:
    for stroke in one_with_a_flag_and_a_foot():
        draw(page, stroke)
    return predicted(page)


def runner_up(page) -> int:
    ranked = sorted(probabilities(page), key=lambda ip: -ip[1])
    return ranked[1][0]


def correct(page, index: int):
    """Click "It's a <index>"; the status line once the server's answer is shown."""
    by_testid(page, "feedback-classes").locator(f"button[data-index='{index}']").click()
    status = by_testid(page, "feedback-status")
    status.wait_for(state="visible", timeout=WAIT_MS)
    page.wait_for_function("() => document.querySelector('[data-testid=feedback]').getAttribute('aria-busy') === 'false'",
                           timeout=WAIT_MS)
    return status


def samples(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*.png") if not p.parent.name.startswith("."))


def test_a_drawn_digit_is_corrected_learnt_and_stored(open_page, mnist_run, digits, screenshots, tmp_path):
    folder = tmp_path / "feedback"
    with serving({"mnist": mnist_run}, tmp_path / "serve.log", flags=("--learn", "--feedback-dir", str(folder))) as base:
        page = open_page(base)
        assert by_testid(page, "feedback").is_hidden()  # nothing drawn, nothing to correct
        draw(page, [(0.5, 0.5)])  # a dot: "Not a digit?", which the buttons answer
        assert predicted(page)[0] == "Not a digit?"
        assert page.locator("#feedback-label").inner_text() == "It's a"
        by_testid(page, "clear").click()
        assert by_testid(page, "feedback").is_hidden()
        _, first = draw_one(page)
        meant = runner_up(page)
        buttons = by_testid(page, "feedback-classes").locator("button")
        assert by_testid(page, "feedback").is_visible()
        assert page.locator("#feedback-label").inner_text() == "Wrong? It's a"
        assert buttons.all_inner_texts() == [str(k) for k in range(10)]  # MNIST's classes as their digits
        assert buttons.nth(1).get_attribute("title") == digits[1]
        assert by_testid(page, "model-version").inner_text() == "version 1"

        status = correct(page, meant)
        assert predicted(page) == (digits[meant], str(meant))  # the new version's answer, without drawing again
        assert by_testid(page, "model-version").inner_text() == "version 2"
        assert f"Learnt: version 2 reads it as {meant}." in status.inner_text()
        stored = folder / status.get_attribute("data-stored")
        assert stored.parent.name == digits[meant] and stored in samples(folder)
        with Image.open(stored) as sample:
            assert sample.size == (28, 28) and sample.mode == "L"
        [original] = (folder / ".uploads" / digits[meant]).iterdir()
        with Image.open(original) as drawing:
            assert drawing.size == (280, 280)  # the pad as the page sent it
        assert by_testid(page, "error").is_hidden() and by_testid(page, "feedback-notice").is_hidden()
        save_screenshot(page, screenshots, "serve-page-feedback")

        # the server's model changed, not the page: a new page on it reads the drawing so too
        other = open_page(base)
        assert draw_one(other) == (digits[meant], str(meant))
        assert page.outside_requests == [] and other.outside_requests == []

    # The server writes no run: restarted on the same run it serves the original model, and
    # without --learn a correction is only stored.
    with serving({"mnist": mnist_run}, tmp_path / "again.log", flags=("--feedback-dir", str(folder))) as base:
        page = open_page(base)
        assert draw_one(page)[1] == first
        assert by_testid(page, "model-version").is_hidden()
        status = correct(page, meant)
        assert "does not learn them now" in status.inner_text()
        assert predicted(page)[1] == first
    assert len(samples(folder)) == 2

    # Saved as a run (image-logreg learn turns the stored corrections into one), it is served.
    learnt = tmp_path / "learnt"
    done = subprocess.run([sys.executable, "-m", "image_logreg", "learn", str(mnist_run), str(folder), "--out", str(learnt),
                           "--hold-out", "0", "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with serving({"mnist": learnt}, tmp_path / "learnt.log") as base:
        page = open_page(base)
        assert draw_one(page) == (digits[meant], str(meant))
        assert by_testid(page, "feedback").is_hidden()  # this server takes no corrections


def test_a_rollback_is_shown_as_a_notice(open_page, mnist_run, digits, real_data, tmp_path):
    from image_logreg.datasets import load_split
    from image_logreg.serve.learning import CHECK_EVERY

    test = load_split("mnist", real_data, "test")
    folder = tmp_path / "feedback"
    flags = ("--learn", "--feedback-dir", str(folder), "--feedback-rate", "1000")
    with serving({"mnist": mnist_run}, tmp_path / "serve.log", flags=flags) as base:
        # A burst of wrong labels from a program: all but the last correction before the check.
        # (A label the model already gives makes no new version, so it takes a few more.)
        version = "1"
        for i in range(2 * CHECK_EVERY):
            if version == str(CHECK_EVERY):
                break
            body = {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8",
                                "data": test.images[i].reshape(-1).tolist()}], "label": (int(test.labels[i]) + 1) % 10}
            request = urllib.request.Request(f"{base}/v2/models/mnist/feedback", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                version = json.load(response)["model_version"]
        assert version == str(CHECK_EVERY)
        sent = i
        page = open_page(base)
        assert by_testid(page, "model-version").inner_text() == f"version {CHECK_EVERY}"
        draw_one(page)
        correct(page, runner_up(page))
        notice = by_testid(page, "feedback-notice")
        assert notice.is_visible()
        words = notice.inner_text()
        assert f"from version {CHECK_EVERY + 1} to version 1" in words and "more than 1 point below" in words
        assert by_testid(page, "model-version").inner_text() == "version 1"
        assert by_testid(page, "error").is_hidden()
        # Clear takes the words about the correction away with the drawing
        by_testid(page, "clear").click()
        assert notice.is_hidden()
    assert len(samples(folder)) == sent + 1
