"""Files whose headers promise huge images: refused unread, fast, by the server, the CLI and the
folder loader; large honest photos decoded at a reduced size; one request's bad files do not
spoil its good ones."""

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from conftest import class_pattern, run_cli
from hostile_images import hostile_files, lying_jpeg, zeros_png

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from image_logreg.errors import ImageTooLargeError  # noqa: E402
from image_logreg.predict import predict_images  # noqa: E402
from image_logreg.preprocess import normalize_digit, prepare_image, read_grayscale  # noqa: E402
from image_logreg.serve import create_app, load_models  # noqa: E402
from image_logreg.settings import MAX_PIXELS  # noqa: E402
from image_logreg.datasets.folder import load_splits  # noqa: E402
from test_serve import assert_error, runs, user_digit  # noqa: E402,F401  (the module fixture)

HOSTILE = hostile_files()


@pytest.fixture(scope="module")
def models(runs):  # noqa: F811
    return load_models([f"plain={runs / 'plain'}"])


@pytest.fixture
def client(models):
    with TestClient(create_app(models, log=lambda line: None)) as c:
        yield c


def files(*named: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


# --- the server ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_file_is_a_fast_413(client, name):
    for send in (dict(content=HOSTILE[name]), dict(files=files((name, HOSTILE[name])))):
        start = time.perf_counter()
        response = client.post(f"/predict?filename={name}", **send)
        assert time.perf_counter() - start < 1.0
        assert_error(response, 413, f"{name}: image too large", "limit is 25,000,000")


def test_a_request_over_its_pixel_budget_is_413_whole(models):
    with TestClient(create_app(models, max_pixels=30_000, log=lambda line: None)) as client:
        digits = [(f"{i}.png", user_digit(i)) for i in range(5)]  # 168x168 each
        assert_error(client.post("/predict", files=files(*digits)), 413, "141,120 pixels together", "limit is 120,000")
        answers = client.post("/predict", files=files(*digits[:4]))
        assert answers.status_code == 200 and len(answers.json()) == 4


def test_one_bad_file_among_good_ones_is_an_entry_of_its_own(client):
    sent = [("one.png", user_digit(1)), ("junk.png", b"not an image"), ("bomb.jpg", HOSTILE["lying-9000x9000.jpg"]),
            ("two.png", user_digit(2))]
    response = client.post("/predict", files=files(*sent))
    assert response.status_code == 200, response.text
    answers = response.json()
    assert [a["source"] for a in answers] == [name for name, _ in sent]
    assert "label" in answers[0] and "label" in answers[3]
    assert answers[1] == {"source": "junk.png", "error": answers[1]["error"]} and "junk.png: not an image" in answers[1]["error"]
    assert set(answers[2]) == {"source", "error"} and "bomb.jpg: image too large" in answers[2]["error"]


def test_no_usable_file_is_422_or_413_when_all_were_too_large(client):
    assert_error(client.post("/predict", files=files(("a.png", b"junk"), ("b.png", b""))), 422,
                 "none of the 2 images could be used", "a.png")
    both_huge = files(*HOSTILE.items())
    assert_error(client.post("/predict", files=both_huge), 413, "image too large")


def test_a_large_decode_gives_its_memory_back(models, monkeypatch):
    from image_logreg.serve import app as app_module

    released = []
    monkeypatch.setattr(app_module, "release_memory", lambda: released.append(True))
    photo = jpeg(digit_photo(3, (3000, 2000)))
    with TestClient(create_app(models, log=lambda line: None)) as client:
        assert client.post("/predict", content=user_digit(1)).status_code == 200
        assert not released  # a small image: nothing worth trimming
        assert client.post("/predict", content=photo).status_code == 200
        assert released == [True]


# --- large honest photos ------------------------------------------------------------------------


def test_a_large_jpeg_is_decoded_at_reduced_size_with_the_same_prediction(models, tmp_path, monkeypatch):
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg(digit_photo(6, (4000, 3000))))
    drafted = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = draft(self, mode, size)
        drafted.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    reduced = prepare_image(path)
    assert drafted == [(2000, 1500)]  # decoded at 1/2 scale: 1/4 would take the shorter side below 1024
    full = normalize_digit(read_grayscale(path))  # no working size: every pixel decoded
    assert_same_digit(reduced, full)
    served = models["plain"]
    images = np.stack([reduced, full])
    first, second = predict_images(served.model, torch.from_numpy(images), served.meta, ["r", "f"], 3)
    assert first["label"] == second["label"]
    # the toy model's runners-up are within a percent of each other: their order may swap
    assert {t["index"] for t in first["top_k"]} == {t["index"] for t in second["top_k"]}


def test_a_large_png_is_averaged_down_before_normalising(tmp_path):
    path = tmp_path / "scan.png"
    Image.fromarray(digit_photo(4, (2400, 2200))).save(path)
    reduced = prepare_image(path)
    full = normalize_digit(read_grayscale(path))
    assert_same_digit(reduced, full)


def test_images_at_or_under_the_limit_decode(tmp_path):
    path = tmp_path / "at-limit.png"
    path.write_bytes(zeros_png(100, 100))
    assert read_grayscale(path, max_pixels=100 * 100).shape == (100, 100)
    with pytest.raises(ImageTooLargeError, match="100x100, 10,000 pixels; the limit is 9,999"):
        read_grayscale(path, max_pixels=100 * 100 - 1)


# --- the command line ---------------------------------------------------------------------------


def test_predict_refuses_a_hostile_file_in_one_line_and_predicts_the_rest(capsys, runs, tmp_path):  # noqa: F811
    (tmp_path / "bomb.jpg").write_bytes(lying_jpeg())
    (tmp_path / "good.png").write_bytes(user_digit(3))
    start = time.perf_counter()
    code, out, err = run_cli(capsys, "predict", runs / "plain", tmp_path / "bomb.jpg", tmp_path / "good.png", "--json")
    assert time.perf_counter() - start < 5
    assert code == 2
    assert err.count("\n") == 1 and "bomb.jpg: image too large (9000x9000" in err and "Traceback" not in err
    answers = json.loads(out)
    assert answers[0] == {"source": str(tmp_path / "bomb.jpg"), "error": err.removeprefix("image-logreg: error: ").strip()}
    assert answers[1]["source"] == str(tmp_path / "good.png") and "label" in answers[1]


def test_predict_max_pixels_flag(capsys, runs, tmp_path):  # noqa: F811
    (tmp_path / "good.png").write_bytes(user_digit(3))  # 168x168
    code, out, err = run_cli(capsys, "predict", runs / "plain", tmp_path / "good.png", "--max-pixels", 168 * 168 - 1)
    assert code == 2 and "limit is 28,223" in err and out == ""
    code, _, err = run_cli(capsys, "predict", runs / "plain", tmp_path / "good.png", "--max-pixels", 0)
    assert code == 2 and "--max-pixels must be at least 1" in err


# --- folder datasets ----------------------------------------------------------------------------


def write_folder(root):
    for label, value in (("a", 40), ("b", 200)):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12), value + i, np.uint8)).save(root / label / f"{i}.png")
    (root / "a" / "huge.png").write_bytes(HOSTILE["zeros-9000x9000.png"])
    (root / "b" / "lying.jpg").write_bytes(HOSTILE["lying-9000x9000.jpg"])
    return root


def test_a_folder_skips_hostile_files_as_unusable(tmp_path):
    root = write_folder(tmp_path / "data")
    lines = []
    start = time.perf_counter()
    split = load_splits("folder", root, ("train",), test_fraction=0, no_cache=True, progress=False, workers=1,
                        log=lines.append)["train"]
    assert time.perf_counter() - start < 5
    assert len(split) == 6
    skipped = {s["path"]: s["reason"] for s in split.source["skipped"]}
    assert set(skipped) == {"a/huge.png", "b/lying.jpg"}
    assert all(reason.startswith("image too large (9000x9000") for reason in skipped.values())
    assert any(line.startswith("warning: skipped a/huge.png: image too large") for line in lines)


def test_a_folders_max_pixels_is_its_own(tmp_path):
    root = write_folder(tmp_path / "data")
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(root / "a" / "bigger.png")
    split = load_splits("folder", root, ("train",), image_size=12, test_fraction=0, max_pixels=12 * 12, no_cache=True,
                        progress=False, workers=1, log=lambda line: None)["train"]
    assert "a/bigger.png" in {s["path"] for s in split.source["skipped"]} and len(split) == 6
    split = load_splits("folder", root, ("train",), image_size=12, test_fraction=0, max_pixels=MAX_PIXELS,
                        no_cache=True, progress=False, workers=1, log=lambda line: None)["train"]
    assert len(split) == 7


def test_train_takes_max_pixels_for_folders_only(capsys, tmp_path, toy_data):
    root = write_folder(tmp_path / "folder")
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(root / "a" / "bigger.png")
    code, _, err = run_cli(capsys, "train", "--dataset", "folder", "--data-dir", root, "--out", tmp_path / "run",
                           "--max-pixels", 200, "--epochs", 1, "--quiet", "--no-cache")
    assert code == 0, err
    assert "warning: skipped a/bigger.png: image too large (20x20, 400 pixels; the limit is 200" in err
    code, _, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "mnist", "--max-pixels", 100)
    assert code == 2 and "--max-pixels applies to --dataset folder and csv only" in err


# --- helpers ------------------------------------------------------------------------------------


def assert_same_digit(a: np.ndarray, b: np.ndarray) -> None:
    """Alike but for a shift of at most a pixel: centring rounds the centre of mass, and a glyph
    whose centre lies near a half pixel may land either side of it."""
    a, b = a.astype(int), b.astype(int)
    difference = min(np.abs(np.roll(a, (dy, dx), axis=(0, 1)) - b).mean() for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert difference < 3, difference


def digit_photo(label: int, size: tuple[int, int]) -> np.ndarray:
    """A toy class pattern drawn dark on light paper across most of a ``size`` (W, H) frame, with noise."""
    width, height = size
    side = min(width, height) * 2 // 3
    pattern = class_pattern(label)
    rows, cols = np.flatnonzero(pattern.any(1)), np.flatnonzero(pattern.any(0))
    # the pattern's own block, with a pixel of margin, spans the glyph: as large on the page as a written digit
    block = pattern[max(rows[0] - 1, 0) : rows[-1] + 2, max(cols[0] - 1, 0) : cols[-1] + 2]
    glyph = Image.fromarray(((1 - block) * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    page = np.full((height, width), 235, np.uint8)
    top, left = (height - side) // 2, (width - side) // 3
    page[top : top + side, left : left + side] = np.minimum(page[top : top + side, left : left + side], np.asarray(glyph))
    noise = np.random.default_rng(label).integers(-6, 7, page.shape)
    return np.clip(page.astype(int) + noise, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()
