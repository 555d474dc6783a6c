"""Preprocessing of users' image files into MNIST-style digits."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from image_logreg.errors import ImageError
from image_logreg.preprocess import (
    IMAGE_SUFFIXES,
    PREPROCESSING,
    find_image_files,
    normalize_digit,
    prepare_image,
    read_grayscale,
)
from user_digits import KINDS, write_user_digit_set



def draw_seven() -> np.ndarray:
    """A binary, off-centre '7' (uint8 H x W), so every image mode can hold exactly the same picture."""
    image = Image.new("L", (160, 220), 255)
    pen = ImageDraw.Draw(image)
    pen.line([(30, 40), (110, 40), (60, 190)], fill=0, width=12)
    pen.line([(55, 115), (100, 115)], fill=0, width=10)
    return np.asarray(image)


def save_in_mode(picture: np.ndarray, mode: str, path: Path) -> Path:
    """Save the binary dark-on-white `picture` in `mode`; transparent modes keep black under clear paper."""
    ink = picture < 128
    if mode == "RGB":
        rgb = np.where(ink[..., None], np.array([20, 20, 120], np.uint8), np.array([250, 245, 235], np.uint8))
        image = Image.fromarray(rgb.astype(np.uint8))
    elif mode in ("RGBA", "LA"):
        # The trap: transparent paper whose colour is black reads as all black if alpha is dropped.
        alpha = np.where(ink, 255, 0).astype(np.uint8)
        rgba = np.dstack([np.zeros_like(alpha)] * 3 + [alpha])
        image = Image.fromarray(rgba).convert(mode)
    elif mode == "P-transparent":
        image = Image.fromarray(picture).convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
    elif mode == "1":
        image = Image.fromarray(picture).convert("1", dither=Image.Dither.NONE)
    elif mode == "I;16":
        image = Image.fromarray(picture.astype(np.uint16) * 257)
    elif mode == "I":
        image = Image.fromarray(picture.astype(np.int32))
    elif mode == "F":
        image = Image.fromarray(picture.astype(np.float32) / 255)
    else:
        image = Image.fromarray(picture).convert(mode)
    image.save(path)
    return path


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    weights = digit.astype(np.float64)
    rows, cols = np.indices(digit.shape)
    return (weights * rows).sum() / weights.sum(), (weights * cols).sum() / weights.sum()


def ink_box(digit: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def assert_mnist_like(digit: np.ndarray) -> None:
    assert digit.dtype == np.uint8 and digit.shape == (28, 28)
    assert digit.max() == 255, "ink should reach full white"
    assert np.all(digit[0] == 0) and np.all(digit[-1] == 0), "background should be black"
    com_y, com_x = centre_of_mass(digit)
    assert abs(com_y - 14) <= 1 and abs(com_x - 14) <= 1
    height, width = ink_box(digit)
    assert height <= 20 and width <= 20 and max(height, width) >= 19


# --- reading every image mode -------------------------------------------------------------

MODES = ["1", "L", "P", "P-transparent", "RGB", "RGBA", "LA", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_same_digit(tmp_path, mode):
    picture = draw_seven()
    reference = normalize_digit(picture.astype(np.float32) / 255)
    suffix = ".tif" if mode in ("I;16", "I", "F") else ".png"
    path = save_in_mode(picture, mode, tmp_path / f"seven{suffix}")
    with Image.open(path) as saved:
        assert saved.mode == mode.split("-")[0]
    digit = prepare_image(path)
    assert_mnist_like(digit)
    assert np.abs(digit.astype(int) - reference).mean() < 2


def test_transparent_background_is_composited_onto_white(tmp_path):
    path = save_in_mode(draw_seven(), "RGBA", tmp_path / "seven.png")
    gray = read_grayscale(path)
    assert gray.dtype == np.float32 and gray.shape == (220, 160)
    assert gray[0, 0] == 1.0, "clear paper should read as white"
    assert gray[40, 70] == 0.0, "opaque black ink should stay black"


def test_rgb_jpeg_and_multi_frame_gif_are_read(tmp_path):
    picture = draw_seven()
    Image.fromarray(picture).convert("RGB").save(tmp_path / "seven.jpg", quality=80)
    frames = [Image.fromarray(picture), Image.fromarray(255 - picture)]
    frames[0].save(tmp_path / "seven.gif", save_all=True, append_images=frames[1:])
    reference = normalize_digit(picture.astype(np.float32) / 255)
    for name in ("seven.jpg", "seven.gif"):
        digit = prepare_image(tmp_path / name)
        assert_mnist_like(digit)
        assert np.abs(digit.astype(int) - reference).mean() < 4, name


@pytest.mark.parametrize("where", ["jpeg exif", "png exif", "png text exif", "png xmp"])
def test_phone_photo_orientation_is_applied(tmp_path, where):
    """Orientation 6 (shown turned 90 degrees, as phones save portrait photos), wherever a file keeps it."""
    from PIL import PngImagePlugin

    exif = Image.Exif()
    exif[0x0112] = 6
    picture = Image.fromarray(draw_seven())
    path = tmp_path / ("photo.jpg" if where.startswith("jpeg") else "photo.png")
    if where in ("jpeg exif", "png exif"):
        picture.save(path, exif=exif)
    else:
        info = PngImagePlugin.PngInfo()
        if where == "png xmp":
            info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
        else:  # ImageMagick's way: the EXIF block in hex in a text chunk
            data = exif.tobytes()
            info.add_text("Raw profile type exif", f"\nexif\n{len(data):8}\n{data.hex()}\n")
        picture.save(path, pnginfo=info)
    assert read_grayscale(path).shape == (160, 220)
    assert read_grayscale(path.read_bytes()).shape == (160, 220)
    picture.save(tmp_path / "plain.png")
    assert read_grayscale(tmp_path / "plain.png").shape == (220, 160)


# --- normalisation --------------------------------------------------------------------------


def test_light_background_is_inverted_and_dark_is_not():
    picture = draw_seven().astype(np.float32) / 255
    on_white = normalize_digit(picture)
    on_black = normalize_digit(1 - picture)
    assert_mnist_like(on_white)
    np.testing.assert_array_equal(on_white, on_black)


def test_uneven_lighting_and_noise_do_not_move_the_digit():
    rng = np.random.default_rng(0)
    picture = draw_seven().astype(np.float32) / 255
    shadow = np.linspace(0, 0.25, picture.shape[1], dtype=np.float32)[None, :]
    noisy = np.clip(0.9 * picture + 0.05 - shadow + rng.normal(0, 0.03, picture.shape), 0, 1)
    clean = normalize_digit(picture)
    digit = normalize_digit(noisy.astype(np.float32))
    assert_mnist_like(digit)
    assert np.abs(digit.astype(int) - clean).mean() < 8


@pytest.mark.parametrize("paper", ["flat white", "noisy grey"])
def test_tight_crop_with_strokes_touching_the_edges(paper):
    rng = np.random.default_rng(4)
    picture = draw_seven().astype(np.float32) / 255
    loose = normalize_digit(picture)
    tight = picture[35:193, 30:117]  # cropped to the ink: strokes run along and into every edge
    if paper == "noisy grey":
        tight = np.clip(0.8 * tight + 0.1 + rng.normal(0, 0.02, tight.shape), 0, 1).astype(np.float32)
    digit = normalize_digit(tight)
    assert_mnist_like(digit)
    assert np.abs(digit.astype(int) - loose).mean() < 6


@pytest.mark.parametrize("tone", [150, 90])
def test_photo_pasted_on_a_page_and_drawn_over_keeps_only_the_strokes_as_ink(tone):
    """The page pastes an uploaded photo onto its white pad (4:3 here, so white bars above and below)
    and the user draws over it: the photo's gray paper is paper, not a block of ink; the photo's 7
    and the drawn stroke are both ink, as if drawn on one white page."""
    rng = np.random.default_rng(1)
    seven = draw_seven()[10:210]  # 200 x 160: a dark 7 on white
    photo = np.full((210, 280), tone, np.float32)
    photo[5:205, 60:220] = np.where(seven < 128, 30, tone)
    photo = np.clip(photo + rng.normal(0, 4, photo.shape), 0, 255)
    pad = np.full((280, 280), 255, np.float32)
    pad[35:245] = photo
    on_white = np.full((280, 280), 255, np.float32)
    on_white[40:240, 60:220] = np.where(seven < 128, 30, 255)
    for page in (pad, on_white):
        page[20:150, 232:244] = 17  # the stroke drawn over the top bar and the photo
    digit = normalize_digit(pad / 255)
    expected = normalize_digit(on_white / 255)
    assert_mnist_like(digit)
    ink, want = digit > 64, expected > 64
    # the same strokes, not a gray block; the centre of mass may move a pixel, the 7 being fainter
    overlap = max(overlap_of(np.roll(ink, (dy, dx), axis=(0, 1)), want) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert overlap > 0.8
    assert ink[:, 18:].sum() > 0.15 * ink.sum()  # the stroke, right of the 7, is there


def test_a_bold_glyph_wider_than_a_third_of_the_page_is_ink_not_paper():
    page = np.ones((300, 300), np.float32)
    page[60:240, 90:210] = 0.05  # a solid block, 180 x 120: nothing on it stands out as ink would
    digit = normalize_digit(page)
    assert_mnist_like(digit)
    assert ink_box(digit) == (20, 13)  # the whole block, fitted to the box, not "blank"


def overlap_of(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_aspect_ratio_is_kept():
    page = np.ones((300, 200), np.float32)
    page[40:160, 120:132] = 0  # a stroke 120 tall, 12 wide
    digit = normalize_digit(page)
    assert_mnist_like(digit)
    height, width = ink_box(digit)
    assert height == 20 and width <= 4


def test_small_digit_is_scaled_up_to_the_box():
    page = np.zeros((60, 60), np.float32)
    page[20:36, 30:40] = 1  # 16 of the page's 60 pixels tall: over the quarter that fills the box
    height, width = ink_box(normalize_digit(page))
    assert height == 20 and 11 <= width <= 14


def test_a_speck_is_not_blown_up_to_fill_the_box():
    """A glyph under a quarter of the page is scaled as one a quarter of the page would be: a dot
    stays a dot (which the novelty score rejects), not a bold disc read as a confident 0."""
    page = np.zeros((60, 60), np.float32)
    page[20:28, 30:35] = 1  # 8 pixels of 60
    height, width = ink_box(normalize_digit(page))
    assert 10 <= height <= 11 and 6 <= width <= 8  # 8 x 20/15


def test_dataset_shaped_digit_passes_through_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    digit = np.zeros((28, 28), np.uint8)
    digit[3:15, 2:9] = rng.integers(0, 256, size=(12, 7))  # off-centre and small: left as it is
    Image.fromarray(digit).save(tmp_path / "digit.png")
    prepared = prepare_image(tmp_path / "digit.png")
    assert prepared.dtype == np.uint8
    assert prepared.tobytes() == digit.tobytes()


def test_light_28x28_digit_is_normalised_not_passed_through():
    digit = np.full((28, 28), 255, np.uint8)
    digit[5:20, 10:13] = 0
    prepared = normalize_digit(digit.astype(np.float32) / 255)
    assert_mnist_like(prepared)


def test_no_normalize_only_converts_and_resizes(tmp_path):
    path = save_in_mode(draw_seven(), "L", tmp_path / "seven.png")
    naive = prepare_image(path, normalize=False)
    assert naive.dtype == np.uint8 and naive.shape == (28, 28)
    assert naive[0, 0] == 255, "no inversion on the naive path"
    assert prepare_image(path, normalize=False, size=(10, 12)).shape == (10, 12)


def test_preprocessing_description_is_json_serialisable():
    import json

    assert json.loads(json.dumps(PREPROCESSING)) == PREPROCESSING
    assert PREPROCESSING["name"] == "mnist-normalize"
    assert PREPROCESSING["box"] == 20 and PREPROCESSING["size"] == [28, 28]


# --- finding files --------------------------------------------------------------------------


def test_folders_are_expanded_recursively_and_files_taken_as_given(tmp_path):
    for name in ["b/two.png", "b/deeper/three.JPG", "a/one.webp", "a/notes.txt", ".hidden/x.png", "c/d.tiff"]:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    explicit = tmp_path / "readme.txt"
    explicit.write_text("not an image")
    found = find_image_files([explicit, str(tmp_path / "in")])
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    assert names == ["readme.txt", "in/a/one.webp", "in/b/deeper/three.JPG", "in/b/two.png", "in/c/d.tiff"]
    assert all(isinstance(p, Path) for p in found)
    assert {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"} <= set(IMAGE_SUFFIXES)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="nope.png"):
        find_image_files([missing])


# --- bad files ------------------------------------------------------------------------------


def _text_named_png(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("hello, I am text\n")
    return path


def _truncated(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt}"
    Image.fromarray(draw_seven()).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path


def _blank_page(tmp_path):
    rng = np.random.default_rng(2)
    page = np.clip(240 + rng.normal(0, 3, (200, 150)), 0, 255).astype(np.uint8)
    path = tmp_path / "blank.jpg"
    Image.fromarray(page).save(path, quality=80)
    return path


def _eps(tmp_path):
    path = tmp_path / "drawing.eps"
    Image.fromarray(draw_seven()).convert("RGB").save(path)
    return path


BAD_FILES = {
    "not an image": (_text_named_png, "not an image"),
    "other format (EPS would run Ghostscript)": (_eps, "not an image"),
    "truncated png": (lambda tmp: _truncated(tmp, "png"), "truncated"),
    "truncated jpeg": (lambda tmp: _truncated(tmp, "jpg"), "truncated"),
    "zero bytes": (_empty, "empty file"),
    "blank page": (_blank_page, "blank image"),
    "a folder": (lambda tmp: tmp, "directory"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_raises_one_line_error_naming_it(tmp_path, case):
    make, reason = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ImageError) as caught:
        prepare_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and message.count(str(path)) == 1
    assert reason in message and "\n" not in message


@pytest.mark.parametrize("limit", [1000, 6000], ids=["bomb-error", "bomb-warning"])
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, limit):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100), 255).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    filters_before = list(warnings.filters)
    with pytest.raises(ImageError) as caught:
        read_grayscale(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "too large" in message and "\n" not in message
    assert warnings.filters == filters_before, "warning filters must be restored"


def test_truncated_images_are_not_silently_accepted():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.mark.parametrize("blank", [np.ones((50, 50)), np.zeros((28, 28))], ids=["white page", "black 28x28"])
def test_blank_array_raises_without_a_file_name(blank):
    with pytest.raises(ImageError, match=r"^blank image: no ink found$"):
        normalize_digit(blank.astype(np.float32))


# --- real MNIST digits brought as user files ------------------------------------------------


@pytest.fixture(scope="module")
def mnist(real_data):
    from image_logreg.datasets import load_split

    train = load_split("mnist", real_data, "train", download=False)
    test = load_split("mnist", real_data, "test", download=False)
    return {
        "train_images": train.images[:10_000].numpy(),
        "train_labels": train.labels[:10_000].numpy(),
        "test_images": test.images.numpy(),
        "test_labels": test.labels.numpy(),
    }


def nearest_centroid(train_images, train_labels):
    centroids = np.stack([train_images[train_labels == c].mean(axis=0) for c in range(10)]).reshape(10, -1)

    def classify(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1).astype(np.float64)
        distances = ((flat[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
        return distances.argmin(axis=1)

    return classify


def test_user_style_files_classify_like_the_original_digits(tmp_path, mnist):
    pick = np.random.default_rng(0).choice(10_000, size=300, replace=False)
    digits, labels = mnist["test_images"][pick], mnist["test_labels"][pick]
    classify = nearest_centroid(mnist["train_images"].astype(np.float64), mnist["train_labels"])

    paths = write_user_digit_set(digits, tmp_path, seed=0)
    assert {p.suffix for p in paths} == {".png", ".jpg"} and len(paths) == 300
    prepared = np.stack([prepare_image(p) for p in paths])

    for digit in prepared[:20]:
        assert_mnist_like(digit)
    original_accuracy = (classify(digits) == labels).mean()
    prepared_accuracy = (classify(prepared) == labels).mean()
    assert original_accuracy > 0.7
    assert prepared_accuracy >= original_accuracy - 0.05, (original_accuracy, prepared_accuracy)
    assert np.abs(prepared.astype(int) - digits).mean() < 12


def test_mnist_digits_saved_as_png_are_read_exactly(tmp_path, mnist):
    digits = mnist["test_images"][:100]
    for i, digit in enumerate(digits):
        Image.fromarray(digit).save(tmp_path / f"{i:03d}.png")
    prepared = np.stack([prepare_image(p) for p in find_image_files([tmp_path])])
    np.testing.assert_array_equal(prepared, digits)


def test_user_digit_helper_writes_every_kind(tmp_path):
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    paths = write_user_digit_set(np.stack([digit] * len(KINDS)), tmp_path, seed=3)
    modes = [Image.open(p).mode for p in paths]
    assert modes == ["L", "RGB", "RGBA", "RGB"]
    for path in paths:
        with Image.open(path) as image:
            assert min(image.size) > 28 * 3
        assert_mnist_like(prepare_image(path))
