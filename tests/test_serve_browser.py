"""The page at / in a real browser: Debian's Chromium, driven by Playwright, against `image-logreg serve`.

The user's side of the server: draw with the mouse, upload a file, Clear, switch models, give a
token, and a colour model of the user's own pictures beside an MNIST one, whose words follow
the chosen model. Screenshots go to $IMAGE_LOGREG_SCREENSHOTS (else the test's tmp_path); with
UPDATE_SCREENSHOT=1 those named in DOCS_SCREENSHOTS also replace the pictures of the page in docs/.
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
START_LIMIT_S = 60
WAIT_MS = 15_000  # every wait in the browser ends by itself
TOKEN = "browser-test-token-0123456789"  # serve refuses tokens under 16 characters
DOCS_SCREENSHOTS = ("serve-page", "serve-page-colour", "serve-page-rejected", "serve-page-feedback")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _missing(reason: str):
    """Without a browser the test cannot run; in CI that is a failure, elsewhere a skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


# ---- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base: str, process: subprocess.Popen, log: Path, token: str | None) -> None:
    """Until /v2/health/ready answers 200; fails with the server's log if it dies or takes too long."""
    request = urllib.request.Request(f"{base}/v2/health/ready")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with status {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail(f"serve was not ready within {START_LIMIT_S} s:\n{log.read_text()}")


@contextmanager
def serving(models: dict[str, Path], log: Path, token: str | None = None, flags: tuple[str, ...] = ()):
    """A real `image-logreg serve` on 127.0.0.1 (with ``flags``); yields its base URL and always stops it."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "IMAGE_LOGREG_TOKEN"}
    if token:
        env["IMAGE_LOGREG_TOKEN"] = token
    specs = [f"{name}={path}" for name, path in models.items()]
    command = [sys.executable, "-m", "image_logreg", "serve", *specs, "--port", str(port), *flags]
    # The access log goes to a file: a pipe nobody reads would fill up and stall the server.
    with log.open("w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, process, log, token)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def fashion_run(real_data, tmp_path_factory) -> Path:
    from image_logreg.cli import main

    out = tmp_path_factory.mktemp("runs") / "fashion"
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(real_data), "--out", str(out), "--quiet"]) == 0
    return out


# Three kinds of colour picture a linear model tells apart by their colours, at the folder's size.
SCENES = ("fire", "forest", "sea")
SCENE_SIZE = 32


def scene(kind: str, height: int, width: int, seed: int) -> Image.Image:
    """A made-up photograph: fire glows from yellow to red, a forest is greens, the sea is blue under sky."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    if kind == "fire":
        top, bottom = np.array([200, 30, 10]), np.array([255, 210, 40])
    elif kind == "forest":
        top, bottom = np.array([90, 150, 60]), np.array([20, 70, 25])
    else:
        top, bottom = np.array([150, 200, 240]), np.array([10, 50, 120])
    pixels = top + (bottom - top) * y + rng.normal(0, 18, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory) -> Path:
    """A model of a folder of colour pictures, 32x32, trained in a second."""
    from image_logreg.cli import main

    data = tmp_path_factory.mktemp("scenes")
    for label, kind in enumerate(SCENES):
        (data / kind).mkdir()
        for k in range(12):
            scene(kind, SCENE_SIZE, SCENE_SIZE, seed=100 * label + k).save(data / kind / f"{k}.png")
    out = tmp_path_factory.mktemp("runs") / "scenes"
    argv = ["train", "--dataset", "folder", "--data-dir", str(data), "--out", str(out), "--epochs", "3",
            "--no-cache", "--quiet", "--no-download"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def server(mnist_run, fashion_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving({"mnist": mnist_run, "fashion": fashion_run}, log) as base:
        yield base


@pytest.fixture(scope="module")
def digits(mnist_run) -> list[str]:
    """MNIST's class names as the model records them (torchvision's: "0 - zero", ...)."""
    from image_logreg.checkpoint import load_model

    return load_model(mnist_run)[1]["classes"]


# ---- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(url): a fresh tab (own storage) showing the page; records any request off the server.

    Tests ask for it first, so a missing browser skips them before any training or server start.
    """
    contexts = []

    def open_(url: str):
        # Reduced motion: the bars stand still, so a screenshot shows their final length.
        context = browser.new_context(viewport={"width": 1100, "height": 900}, reduced_motion="reduce")
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        outside = []
        # The page must work offline: anything it fetches from elsewhere is a bug.
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
        page.outside_requests = outside
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("IMAGE_LOGREG_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def by_testid(page, name: str):
    return page.locator(f"[data-testid={name}]")


# ---- drawing and reading the page ---------------------------------------------------------------


def draw(page, points: list[tuple[float, float]]) -> None:
    """One stroke with the mouse through ``points``, given as fractions of the pad's width and height."""
    box = by_testid(page, "pad").bounding_box()
    to_px = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*to_px[0])
    page.mouse.down()
    for x, y in to_px[1:]:
        page.mouse.move(x, y, steps=2)
    page.mouse.up()


def vertical_stroke() -> list[tuple[float, float]]:
    return [(0.5, 0.15 + 0.7 * i / 20) for i in range(21)]


def loop() -> list[tuple[float, float]]:
    """An upright ellipse, closed, in small steps: a zero as people draw it."""
    steps = 48
    return [(0.5 + 0.22 * math.sin(2 * math.pi * i / steps), 0.5 - 0.33 * math.cos(2 * math.pi * i / steps))
            for i in range(steps + 2)]


def seven() -> list[tuple[float, float]]:
    """A bar across the top, then down and to the left, as people draw a seven."""
    corners = [(0.25, 0.18), (0.75, 0.18), (0.42, 0.85)]
    points = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
        points += [(x0 + (x1 - x0) * i / 16, y0 + (y1 - y0) * i / 16) for i in range(16)]
    return points + [corners[-1]]


def settled(page) -> None:
    """Wait until no prediction is scheduled or in flight (the answer card's aria-busy)."""
    page.wait_for_function(
        "() => document.querySelector('[data-testid=prediction]').closest('[aria-busy]')"
        ".getAttribute('aria-busy') === 'false'",
        timeout=WAIT_MS,
    )


def predicted(page) -> tuple[str, str | None]:
    """The shown prediction, once the page has its latest answer: (class name, data-index)."""
    settled(page)
    # One read of both, so an answer arriving in between cannot pair old text with a new index.
    return tuple(by_testid(page, "prediction").evaluate("e => [e.innerText, e.getAttribute('data-index')]"))


def probabilities(page) -> list[tuple[int, float | None]]:
    rows = by_testid(page, "probabilities").locator(":scope > *")
    result = []
    for i in range(rows.count()):
        value = rows.nth(i).get_attribute("data-probability")
        result.append((int(rows.nth(i).get_attribute("data-index")), None if value is None else float(value)))
    return result


def class_names(page) -> list[str]:
    """The class name each bar shows: the first line of its text (the percentage follows)."""
    return [text.strip().split("\n")[0] for text in by_testid(page, "probabilities").locator(":scope > *").all_inner_texts()]


def canvas_colours(page, name: str) -> int:
    """How many different RGBA colours a canvas holds: 1 means blank."""
    return page.evaluate(
        """(name) => {
            const canvas = document.querySelector(`[data-testid=${name}]`);
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            const colours = new Set();
            for (let i = 0; i < data.length; i += 4) colours.add(data.slice(i, i + 4).join(','));
            return colours.size;
        }""",
        name,
    )


def save_screenshot(page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT") == "1" and name in DOCS_SCREENSHOTS:
        (REPO / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(REPO / "docs" / f"{name}.png"), full_page=True)


def user_digit_file(real_data: Path, folder: Path) -> tuple[Path, int]:
    """A clear MNIST test digit as a user would have it: 8x larger, dark ink on white, a PNG."""
    from image_logreg.datasets import load_split

    test = load_split("mnist", real_data, "test")
    index = 0  # a plain, upright 7
    digit = test.images[index].numpy()
    label = int(test.labels[index])
    big = Image.fromarray(255 - digit).resize((28 * 8, 28 * 8), Image.Resampling.BICUBIC)
    path = folder / f"digit-{label}.png"
    big.save(path)
    return path, label


# ---- the tests ----------------------------------------------------------------------------------


def test_drawn_strokes_are_predicted_and_explained(open_page, server, digits, screenshots):
    page = open_page(server)
    assert predicted(page) == ("", None)  # nothing drawn, nothing sent

    draw(page, vertical_stroke())
    assert predicted(page) == (digits[1], "1")
    probs = probabilities(page)
    assert [i for i, _ in probs] == list(range(10))
    assert sum(p for _, p in probs) == pytest.approx(1.0, abs=1e-3)
    assert max(probs, key=lambda ip: ip[1])[0] == 1
    assert by_testid(page, "probabilities").locator(".top").get_attribute("data-index") == "1"
    assert canvas_colours(page, "seen") > 1 and canvas_colours(page, "evidence") > 1
    save_screenshot(page, screenshots, "stroke-1")

    by_testid(page, "clear").click()
    assert predicted(page) == ("", None)
    assert all(p is None for _, p in probabilities(page))
    assert canvas_colours(page, "seen") == 1 and canvas_colours(page, "evidence") == 1

    draw(page, loop())
    assert predicted(page) == (digits[0], "0")
    save_screenshot(page, screenshots, "serve-page")
    assert by_testid(page, "error").is_hidden()
    assert page.outside_requests == []


def bars_opacity(page) -> float:
    return float(by_testid(page, "probabilities").evaluate("e => getComputedStyle(e).opacity"))


def test_a_dot_is_not_a_digit_but_a_seven_is(open_page, server, digits, screenshots):
    page = open_page(server)
    draw(page, [(0.5, 0.5)])  # a tap: one dot, which the page scales up to a blob filling the digit box
    text, index = predicted(page)
    assert text == "Not a digit?"
    assert by_testid(page, "prediction").get_attribute("data-rejected") == "true"
    # The guess is still shown, faded, with the reason in words.
    assert index is not None and sum(p for _, p in probabilities(page)) == pytest.approx(1.0, abs=1e-3)
    assert bars_opacity(page) < 0.5
    words = by_testid(page, "confidence").inner_text()
    assert digits[int(index)] in words and "unlike the MNIST digits" in words
    save_screenshot(page, screenshots, "serve-page-rejected")

    by_testid(page, "clear").click()
    assert predicted(page) == ("", None)
    assert by_testid(page, "prediction").get_attribute("data-rejected") is None
    draw(page, seven())
    assert predicted(page) == (digits[7], "7")
    assert by_testid(page, "prediction").get_attribute("data-rejected") is None
    assert bars_opacity(page) == 1.0
    assert "sure" in by_testid(page, "confidence").inner_text()


def test_uploaded_file_is_predicted(open_page, server, digits, screenshots, real_data, tmp_path):
    path, label = user_digit_file(real_data, tmp_path)
    assert label == 7
    page = open_page(server)
    by_testid(page, "file").set_input_files(str(path))
    assert predicted(page) == (digits[label], str(label))
    assert sum(p for _, p in probabilities(page)) == pytest.approx(1.0, abs=1e-3)
    assert canvas_colours(page, "seen") > 1 and canvas_colours(page, "evidence") > 1
    save_screenshot(page, screenshots, f"upload-{label}")


def give_file(page, path: Path, event: str) -> None:
    """Hand the page an image file as a "drop" on the pad or a "paste", the way the browser does."""
    page.evaluate(
        """([event, name, base64]) => {
            const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: 'image/png' }));
            const pad = document.querySelector('[data-testid=pad]');
            if (event === 'drop') {
                pad.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
            } else {
                document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: transfer, bubbles: true, cancelable: true }));
            }
        }""",
        [event, path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def test_dropped_and_pasted_files_are_predicted(open_page, server, digits, real_data, tmp_path):
    path, label = user_digit_file(real_data, tmp_path)
    page = open_page(server)
    for event in ("drop", "paste"):
        give_file(page, path, event)
        assert predicted(page) == (digits[label], str(label)), event
        by_testid(page, "clear").click()
        assert predicted(page) == ("", None)


def test_server_errors_are_shown_on_the_page(open_page, server, screenshots, tmp_path):
    page = open_page(server)
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not a picture")
    by_testid(page, "file").set_input_files(str(not_an_image))
    assert predicted(page) == ("", None)
    error = by_testid(page, "error")
    error.wait_for(state="visible", timeout=WAIT_MS)
    assert "notes.txt" in error.inner_text()
    save_screenshot(page, screenshots, "error")

    by_testid(page, "clear").click()
    assert error.is_hidden()


def test_model_picker_switches_to_fashion(open_page, server, digits, screenshots):
    page = open_page(server)
    picker = by_testid(page, "model")
    assert picker.is_visible()
    assert picker.locator("option").evaluate_all("options => options.map(o => o.value)") == ["mnist", "fashion"]
    assert class_names(page) == digits

    draw(page, vertical_stroke())
    assert predicted(page) == (digits[1], "1")
    picker.select_option("fashion")
    # The same drawing is asked again of the other model; what it sees there is its own business.
    name, index = predicted(page)
    assert class_names(page) == FASHION_CLASSES
    assert index is not None
    # A pen stroke is unlike any garment: the model may well reject it, in words about its classes.
    if by_testid(page, "prediction").get_attribute("data-rejected") == "true":
        assert name == "Not one of the 10 classes?"
        assert FASHION_CLASSES[int(index)] in by_testid(page, "confidence").inner_text()
    else:
        assert name == FASHION_CLASSES[int(index)]
    assert sum(p for _, p in probabilities(page)) == pytest.approx(1.0, abs=1e-3)
    save_screenshot(page, screenshots, "fashion")


def test_token_is_asked_once_then_used(open_page, mnist_run, digits, screenshots, tmp_path):
    with serving({"mnist": mnist_run}, tmp_path / "serve.log", token=TOKEN) as base:
        # Without the token the API refuses, even on 127.0.0.1.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/v2/models", timeout=5)
        assert refused.value.code == 401

        page = open_page(base)
        token = by_testid(page, "token")
        token.wait_for(state="visible", timeout=WAIT_MS)
        save_screenshot(page, screenshots, "token")
        token.fill(TOKEN)
        by_testid(page, "token-submit").click()
        assert token.is_hidden()

        # One model: the picker is hidden, but still there for scripts.
        page.wait_for_function("() => document.querySelector('[data-testid=model]').options.length === 1",
                               timeout=WAIT_MS)
        assert by_testid(page, "model").is_hidden()

        draw(page, vertical_stroke())
        assert predicted(page) == (digits[1], "1")
        by_testid(page, "clear").click()
        draw(page, loop())
        assert predicted(page) == (digits[0], "0")
        assert token.is_hidden() and by_testid(page, "error").is_hidden()


def canvas_size(page, name: str) -> tuple[int, int]:
    return tuple(by_testid(page, name).evaluate("c => [c.width, c.height]"))


def test_words_follow_a_colour_model(open_page, mnist_run, colour_run, screenshots, tmp_path):
    photo = tmp_path / "sea.png"
    scene("sea", 72, 96, seed=7).save(photo)  # another size and shape than the model's: resized
    with serving({"mnist": mnist_run, "scenes": colour_run}, tmp_path / "serve.log") as base:
        # What the page's words are made from: how each model's image files are prepared.
        with urllib.request.urlopen(f"{base}/v2/models", timeout=5) as response:
            files = {m["name"]: m["parameters"]["image_files"] for m in json.load(response)["models"]}
        assert files == {
            "mnist": {"name": "mnist-normalize", "image_size": [28, 28], "box": 20, "resize": None, "color": "gray"},
            "scenes": {"name": "dataset-decode", "image_size": [SCENE_SIZE] * 2, "resize": "fit", "color": "rgb"},
        }
        page = open_page(base)
        lead, seen = by_testid(page, "lead"), by_testid(page, "seen-caption")
        # The first model is the MNIST one, and the page talks about digits.
        page.wait_for_function("() => document.querySelector('[data-testid=model]').options.length === 2",
                               timeout=WAIT_MS)
        assert "784 of them for a 28\u00d728 digit" in lead.inner_text()
        assert "20\u00d720" in seen.inner_text() and "MNIST digits" in seen.inner_text()
        assert canvas_size(page, "seen") == (28, 28)

        by_testid(page, "model").select_option("scenes")
        by_testid(page, "file").set_input_files(str(photo))
        text, index = predicted(page)
        assert index == str(SCENES.index("sea"))
        # 36 training pictures make a loose novelty score, which may reject a photo of another
        # shape; either way the words are about this model's classes, not digits.
        if by_testid(page, "prediction").get_attribute("data-rejected") == "true":
            assert text == "Not one of the 3 classes?" and "sea" in by_testid(page, "confidence").inner_text()
        else:
            assert text == "sea"
        assert sum(p for _, p in probabilities(page)) == pytest.approx(1.0, abs=1e-3)
        assert "3,072 of them for a 32\u00d732 colour image" in lead.inner_text()
        words = seen.inner_text()
        assert "32\u00d732" in words and "colour" in words
        assert "20\u00d720" not in words and "MNIST" not in words and "white ink" not in words
        assert "red, green and blue" in by_testid(page, "evidence-caption").inner_text()
        assert canvas_size(page, "seen") == canvas_size(page, "evidence") == (SCENE_SIZE, SCENE_SIZE)
        assert canvas_colours(page, "seen") > 1 and canvas_colours(page, "evidence") > 1
        # The picture the model saw is in colour: its pixels are not all gray.
        assert page.evaluate("""() => {
            const c = document.querySelector('[data-testid=seen]');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2]) return true;
            return false;
        }""")
        assert by_testid(page, "error").is_hidden()
        save_screenshot(page, screenshots, "serve-page-colour")

        # Back to MNIST: its words again. (What it makes of the photograph is its own business.)
        by_testid(page, "model").select_option("mnist")
        settled(page)
        assert "MNIST digits" in seen.inner_text() and "784" in lead.inner_text()
        assert canvas_size(page, "seen") == (28, 28)
        assert page.outside_requests == []
