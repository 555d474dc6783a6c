"""Loaders that cannot be broken: random and mutated bytes must load or raise the project's one-line error.

Covers the IDX parser, image files and checkpoints (.safetensors and .pth). Never another
exception, never a hang, and never an allocation sized by what a header claims: while these
tests run, the address space is capped a few GiB above what the process already uses, so a
loader that believed a header claiming 2^40 bytes would hit MemoryError here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import resource
import struct
import tempfile
import warnings
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from image_logreg.checkpoint import load_model, save_model
from image_logreg.datasets import load_split
from image_logreg.errors import CheckpointError, DataError, ImageError
from image_logreg.model import LogisticRegression
from image_logreg.preprocess import _plain_gray_png, prepare_image, read_grayscale

from conftest import write_idx

# Modest counts keep the file in seconds; the deadline only catches a hang, not slowness.
FUZZ = settings(
    max_examples=150, deadline=timedelta(seconds=20), derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HEADROOM = 3 << 30  # bytes of address space a loader may use above what the process has


@contextlib.contextmanager
def capped_memory():
    """Make any allocation a header could ask for fail at once instead of swapping the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = _address_space()
    cap = in_use + HEADROOM if hard == resource.RLIM_INFINITY else min(hard, in_use + HEADROOM)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def _cap():
    if not Path("/proc/self/statm").exists():  # not Linux: run uncapped
        yield
        return
    with capped_memory():
        yield


def assert_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    assert "MemoryError" not in text, text  # a loader tried to allocate what a header claimed


@contextlib.contextmanager
def no_warnings():
    """A bad file is one error line: no library warning may reach the user beside it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]


def mutate(data: bytes, draw) -> bytes:
    """Flip, overwrite, cut or extend a valid file: the damage real files suffer, and an attacker's."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "word", "cut", "extend", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "word" and len(data) >= 4:
            at = min(at, len(data) - 4)
            value = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1))
            data[at : at + 4] = struct.pack(draw(st.sampled_from([">I", "<I"])), value)
        elif kind == "cut":
            del data[at:]
        elif kind == "extend":
            data += draw(st.binary(max_size=64))
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@st.composite
def mutated(draw, valid: bytes):
    return mutate(valid, draw)


# --- IDX files --------------------------------------------------------------------------------

N_IDX = 6


def idx_bytes(array: np.ndarray) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return write_idx(Path(tmp) / "f", array).read_bytes()


VALID_IMAGES = idx_bytes(np.random.default_rng(0).integers(0, 256, (N_IDX, 5, 4), dtype=np.uint8))
VALID_LABELS = idx_bytes(np.arange(N_IDX, dtype=np.uint8) % 10)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("idx")


def load_idx(root: Path, images: bytes, labels: bytes):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(images)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels)
    try:
        with no_warnings():
            data = load_split("mnist", root, "test", download=False)
    except DataError as exc:
        assert_one_line(exc)
        return None
    assert data.images.dtype == torch.uint8 and data.images.ndim == 3 and len(data.images) == len(data.labels)
    assert int(data.labels.min()) >= 0 and int(data.labels.max()) <= 9
    return data


def test_valid_idx_files_load(idx_dir):
    data = load_idx(idx_dir, VALID_IMAGES, VALID_LABELS)
    assert data is not None and data.images.shape == (N_IDX, 5, 4)


@FUZZ
@given(images=st.binary(max_size=300), labels=st.binary(max_size=40))
def test_idx_random_bytes(idx_dir, images, labels):
    load_idx(idx_dir, images, VALID_LABELS)
    load_idx(idx_dir, VALID_IMAGES, labels)


@FUZZ
@given(images=mutated(VALID_IMAGES), labels=mutated(VALID_LABELS))
def test_idx_mutated_files(idx_dir, images, labels):
    load_idx(idx_dir, images, VALID_LABELS)
    load_idx(idx_dir, VALID_IMAGES, labels)
    load_idx(idx_dir, images, labels)


@FUZZ
@given(
    dims=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4),
    type_code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]),
    zeros=st.sampled_from([b"\x00\x00", b"\x00\x01", b"\xff\xff"]),
    body=st.binary(max_size=200),
)
@example(dims=[2**14, 2**13, 2**13], type_code=0x08, zeros=b"\x00\x00", body=b"\x00" * 64)  # 2^40 bytes claimed
@example(dims=[2**32 - 1] * 3, type_code=0x0E, zeros=b"\x00\x00", body=b"")
def test_idx_headers_claiming_anything(idx_dir, dims, type_code, zeros, body):
    header = zeros + bytes([type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    load_idx(idx_dir, header + body, VALID_LABELS)
    load_idx(idx_dir, VALID_IMAGES, header + body)


def test_idx_huge_claim_is_refused_before_reading(idx_dir, monkeypatch):
    """A header claiming 2^40 bytes is refused from the header and the file's length alone."""
    import numpy

    handed = []
    monkeypatch.setattr(numpy, "memmap", lambda path, **kw: handed.append(path))
    monkeypatch.setattr(numpy, "fromfile", lambda f, **kw: handed.append(f))
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 2**14, 2**13, 2**13)
    with pytest.raises(DataError, match="truncated.*16384 x 8192 x 8192, 1099511627792 bytes.*has 116") as caught:
        load_idx_strict(idx_dir, header + b"\x00" * 100, VALID_LABELS)
    assert_one_line(caught.value)
    assert handed == [], "the file went to the reader despite its impossible header"


def load_idx_strict(root: Path, images: bytes, labels: bytes):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(images)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels)
    return load_split("mnist", root, "test", download=False)


# --- image files ------------------------------------------------------------------------------


def _digit_picture() -> Image.Image:
    picture = Image.new("L", (40, 48), 235)
    ImageDraw.Draw(picture).line([(10, 8), (30, 8), (18, 40)], fill=20, width=4)
    return picture


def _encoded(fmt: str, mode: str = "L") -> bytes:
    picture = _digit_picture()
    if mode == "I;16":  # the full 16-bit range, as scanners write it
        picture = Image.fromarray(np.asarray(picture, dtype=np.uint16) * 257)
    buf = io.BytesIO()
    picture.convert(mode).save(buf, format=fmt)
    return buf.getvalue()


VALID_IMAGES_FILES = [
    _encoded("PNG"), _encoded("PNG", "RGBA"), _encoded("JPEG"), _encoded("GIF"), _encoded("BMP"),
    _encoded("TIFF"), _encoded("WEBP"), _encoded("PNG", "I;16"), _encoded("TIFF", "F"),
]


def read_image(data: bytes) -> None:
    for call in (lambda: read_grayscale(data, name="upload.png"), lambda: prepare_image(data, name="upload.png")):
        try:
            with no_warnings():
                result = call()
        except ImageError as exc:
            assert_one_line(exc)
            assert "upload.png" in str(exc) or "upload" in str(exc)
            continue
        assert isinstance(result, np.ndarray) and result.ndim == 2


def test_valid_image_files_read():
    for data in VALID_IMAGES_FILES:
        assert prepare_image(data, name="upload.png").shape == (28, 28)


@FUZZ
@given(data=st.binary(max_size=400))
def test_image_random_bytes(data):
    read_image(data)


@FUZZ
@given(data=st.sampled_from(VALID_IMAGES_FILES).flatmap(mutated))
def test_image_mutated_files(data):
    read_image(data)


@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1))
@example(width=2**20, height=2**20)
def test_png_header_claiming_huge_images(width, height):
    png = bytearray(_encoded("PNG"))
    png[16:24] = struct.pack(">II", width, height)  # IHDR width and height (its CRC no longer matches)
    read_image(bytes(png))


def test_image_from_a_path_is_refused_the_same_way(tmp_path):
    path = tmp_path / "digit.png"
    path.write_bytes(VALID_IMAGES_FILES[0][:40])
    with pytest.raises(ImageError) as caught:
        prepare_image(path)
    assert_one_line(caught.value)


# --- plain gray PNGs: the quick path ----------------------------------------------------------
# A 28x28 8-bit gray PNG with no chunk but IHDR, IDAT and IEND skips Pillow's file parser
# (preprocess._plain_gray_png). Whatever the bytes, the answer must be what Pillow's full path
# gives for the same file: the same digit, or the same error.


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _filtered(pixels: np.ndarray, filters: list[int]) -> bytes:
    """PNG's row filtering by hand (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth), one type per row."""
    out, prior = bytearray(), [0] * pixels.shape[1]
    for row, kind in zip(pixels.tolist(), filters):
        out.append(kind)
        for x, value in enumerate(row):
            a, b, c = (row[x - 1] if x else 0), prior[x], (prior[x - 1] if x else 0)
            predicted = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
            out.append((value - predicted) % 256)
        prior = row
    return bytes(out)


def gray_png(pixels: np.ndarray, filters: list[int], level: int = 6, pieces: int = 1, extra: list | None = None) -> bytes:
    """A gray PNG written by hand: any row filters, IDAT cut into ``pieces``, ``extra`` chunks after IHDR."""
    h, w = pixels.shape
    data = zlib.compress(_filtered(pixels, filters), level)
    cuts = np.linspace(0, len(data), pieces + 1).astype(int)
    return b"".join([
        b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)),
        *(_chunk(kind, payload) for kind, payload in extra or []),
        *(_chunk(b"IDAT", data[a:b]) for a, b in zip(cuts[:-1], cuts[1:])), _chunk(b"IEND", b""),
    ])


@st.composite
def gray_digits(draw) -> np.ndarray:
    """28x28 pixels: dataset-style (ink on black), ink on paper, or noise."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["dataset", "paper", "noise"]))
    if kind == "noise":
        return rng.integers(0, 256, (28, 28), dtype=np.uint8)
    pixels = np.zeros((28, 28), np.uint8)
    top, left = rng.integers(4, 12, 2)
    pixels[top : top + 12, left : left + 3] = rng.integers(120, 256, (12, 3))
    pixels[top : top + 3, left : left + 10] = 255
    return 255 - pixels if kind == "paper" else pixels


EXTRA_CHUNKS = [(b"tEXt", b"Comment\x00hello"), (b"tRNS", b"\x00\x00"), (b"gAMA", struct.pack(">I", 45455)),
                (b"eXIf", Image.Exif().tobytes())]


@st.composite
def plain_gray_pngs(draw) -> bytes:
    pixels = draw(gray_digits())
    if draw(st.booleans()):  # as Pillow writes them (the files a dataset sample saved to disk becomes)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=draw(st.integers(0, 9)), optimize=draw(st.booleans()))
        return buf.getvalue()
    filters = draw(st.lists(st.integers(0, 4), min_size=28, max_size=28))
    extra = draw(st.lists(st.sampled_from(EXTRA_CHUNKS), max_size=2))
    return gray_png(pixels, filters, draw(st.integers(0, 9)), draw(st.integers(1, 4)), extra)


def _same_as_pillow(data: bytes, tmp_path: Path) -> np.ndarray | None:
    """prepare_image of the bytes (the quick path's way in) against the same file from a path
    (Pillow's full path): equal digits or equal errors. The quick path's pixels, when it took the file."""
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    answers = []
    for source in (data, path):
        try:
            answers.append(prepare_image(source, name=str(path)))
        except ImageError as exc:
            answers.append(str(exc))
    if isinstance(answers[0], str) or isinstance(answers[1], str):
        assert answers[0] == answers[1]
    else:
        np.testing.assert_array_equal(answers[0], answers[1])
    quick = _plain_gray_png(data, (28, 28))
    if quick is not None:
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(quick, np.asarray(image))
    return quick


def test_pillow_written_dataset_pngs_take_the_quick_path(tmp_path):
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:15] = 255
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, format="PNG")
    np.testing.assert_array_equal(_same_as_pillow(buf.getvalue(), tmp_path), digit)
    for kind in range(5):  # every row filter, undone by Pillow's decoder
        np.testing.assert_array_equal(_same_as_pillow(gray_png(digit, [kind] * 28), tmp_path), digit)
    # anything more than the bare image is left to Pillow's parser: transparency, orientation, text
    for extra in EXTRA_CHUNKS:
        assert _same_as_pillow(gray_png(digit, [0] * 28, extra=[extra]), tmp_path) is None
    assert _plain_gray_png(buf.getvalue(), (28, 27)) is None  # another size than the model's
    header_checksum_broken = bytearray(buf.getvalue())
    header_checksum_broken[30] ^= 1
    assert _same_as_pillow(bytes(header_checksum_broken), tmp_path) is None
    with pytest.raises(ImageError, match="not an image file"):
        prepare_image(bytes(header_checksum_broken))


@FUZZ
@given(data=plain_gray_pngs())
def test_plain_gray_pngs_read_as_pillow_reads_them(data):
    with tempfile.TemporaryDirectory() as tmp:
        _same_as_pillow(data, Path(tmp))


@FUZZ
@given(data=plain_gray_pngs().flatmap(mutated), fix_checksums=st.booleans())
def test_damaged_plain_gray_pngs_fail_as_pillow_fails(data, fix_checksums):
    if fix_checksums:  # damage inside the chunks, past the checksum test: the decoder must catch it
        data = _with_valid_checksums(data)
    with tempfile.TemporaryDirectory() as tmp:
        _same_as_pillow(data, Path(tmp))


def _with_valid_checksums(data: bytes) -> bytes:
    data, position = bytearray(data), 8
    while position + 12 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        stop = position + 8 + length
        if stop + 4 > len(data):
            break
        data[stop : stop + 4] = struct.pack(">I", zlib.crc32(data[position + 4 : stop]))
        position = stop + 4
    return bytes(data)


# --- checkpoints ------------------------------------------------------------------------------

META = {"dataset": "mnist", "classes": [str(i) for i in range(10)], "preprocessing": {"scale": "x / 255", "deskew": False}}


def _model_bytes(model=None, meta=META) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(Path(tmp) / "m.safetensors", model or LogisticRegression(), meta)
        return path.read_bytes()


def _safetensors(tensors: dict, metadata: dict | None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _header(meta: dict) -> dict:
    return {"format": "image-logreg", "version": "1", "image_logreg": json.dumps(meta)}


FULL_META = dict(META, input_shape=[28, 28], num_classes=10)
GOOD_TENSORS = {"linear.weight": torch.zeros(10, 784), "linear.bias": torch.zeros(10)}
VALID_SAFETENSORS = _model_bytes()


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


VALID_PTH = _torch_save(LogisticRegression().state_dict())


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


def load_bytes(root: Path, data: bytes, suffix: str = ".safetensors"):
    path = root / f"model{suffix}"
    path.write_bytes(data)
    try:
        with no_warnings():
            model, meta = load_model(path)
    except CheckpointError as exc:
        assert_one_line(exc)
        return exc
    assert isinstance(model, LogisticRegression)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    json.dumps(meta)
    _serves(model, meta, path)
    return model


def _serves(model: LogisticRegression, meta: dict, path: Path) -> None:
    """A checkpoint that loads must then work: the server's metadata, a file's prediction, its explanation."""
    import orjson

    from image_logreg.predict import explain, predict_file
    from image_logreg.serve.registry import ServedModel

    served = ServedModel("m", model, meta, path)
    described = orjson.loads(orjson.dumps(served.metadata()))
    assert described["parameters"]["input_shape"] == list(model.input_shape)
    with no_warnings():
        result, image = predict_file(model, meta, VALID_IMAGES_FILES[0], k=3, name="upload.png")
    assert list(image.shape) == list(model.input_shape) and result["label"] in meta["classes"]
    assert len(explain(model, torch.from_numpy(image)[None], meta)) == 1
    assert served.probabilities(torch.from_numpy(image)[None]).shape == (1, len(meta["classes"]))


def test_valid_checkpoints_load(ckpt_dir):
    assert isinstance(load_bytes(ckpt_dir, VALID_SAFETENSORS), LogisticRegression)
    assert isinstance(load_bytes(ckpt_dir, VALID_PTH, ".pth"), LogisticRegression)


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".safetensors", ".pth"]))
@example(data=b"", suffix=".pth")
@example(data=struct.pack("<Q", 2**40) + b"{", suffix=".safetensors")  # header length 2^40
def test_checkpoint_random_bytes(ckpt_dir, data, suffix):
    load_bytes(ckpt_dir, data, suffix)


@FUZZ
@given(data=mutated(VALID_SAFETENSORS))
def test_safetensors_mutated(ckpt_dir, data):
    load_bytes(ckpt_dir, data)


@FUZZ
@given(data=mutated(VALID_PTH))
def test_pth_mutated(ckpt_dir, data):
    load_bytes(ckpt_dir, data, ".pth")


@FUZZ
@given(length=st.integers(0, 2**64 - 1), rest=st.sampled_from([VALID_SAFETENSORS[8:], VALID_SAFETENSORS[8:100], b"{}"]))
@example(length=2**40, rest=VALID_SAFETENSORS[8:])
def test_safetensors_header_length_claims(ckpt_dir, length, rest):
    load_bytes(ckpt_dir, struct.pack("<Q", length) + rest)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_safetensors_non_finite_weights_are_refused(ckpt_dir, value):
    tensors = dict(GOOD_TENSORS, **{"linear.weight": torch.full((10, 784), value)})
    exc = load_bytes(ckpt_dir, _safetensors(tensors, _header(FULL_META)))
    assert isinstance(exc, CheckpointError) and "NaN or infinite" in str(exc)


tensor_shapes = st.lists(st.integers(0, 800), max_size=2) | st.lists(st.integers(0, 12), min_size=3, max_size=4)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool, torch.uint8])


@FUZZ
@given(
    weight_shape=tensor_shapes, bias_shape=tensor_shapes, dtype=dtypes,
    extra=st.dictionaries(st.sampled_from(["linear.weight", "linear.bias", "fc.weight", ""]), st.just(None), max_size=2),
)
@example(weight_shape=[10, 784], bias_shape=[10], dtype=torch.float32, extra={})
def test_safetensors_wrong_shapes_and_dtypes(ckpt_dir, weight_shape, bias_shape, dtype, extra):
    tensors = {"linear.weight": torch.zeros(weight_shape).to(dtype), "linear.bias": torch.ones(bias_shape).to(dtype)}
    for key in extra:
        tensors.pop(key, None) if key.startswith("linear") else tensors.setdefault(key or "x", torch.zeros(1))
    result = load_bytes(ckpt_dir, _safetensors(tensors, _header(FULL_META)))
    if isinstance(result, LogisticRegression):
        assert list(result.linear.weight.shape) == [10, 784] and result.linear.weight.dtype == torch.float32


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
metadata_fields = st.fixed_dictionaries(
    {},
    optional={
        "dataset": st.sampled_from(["mnist", "fashion-mnist", "cifar"]) | json_values,
        "classes": st.just([str(i) for i in range(10)]) | json_values,
        "input_shape": st.sampled_from([[28, 28], [784], [2**20, 2**20], [2**40], [0, 28], [-28, -28], [28.5, 28], "28x28"])
        | json_values,
        "num_classes": st.sampled_from([10, 0, -1, 2**40, 10.0, "10"]) | json_values,
        "preprocessing": st.sampled_from([{"deskew": False}, {"deskew": {"name": "moment-deskew"}}, None]) | json_values,
    },
)


@FUZZ
@given(meta=metadata_fields)
@example(meta=dict(FULL_META, input_shape=[2**20, 2**20]))  # would be a 4 TiB model, from 7,850 weights
@example(meta=dict(FULL_META, num_classes=2**40))
def test_safetensors_metadata_claims(ckpt_dir, meta):
    load_bytes(ckpt_dir, _safetensors(GOOD_TENSORS, _header(meta)))


# Field by field: each valid record below, with one or more of its fields deleted or replaced by
# a value of another type, out of range, a list or nested garbage.
DECODE_GRAY = {"name": "dataset-decode", "image_size": [28, 28], "resize": "fit", "color": "gray", "steps": ["resized"]}
VALID_METAS = [
    dict(FULL_META, preprocessing={"scale": "x / 255", "deskew": {"name": "moment-deskew"}, "image_files": {"name": "mnist-normalize"}},
         config={"seed": 3}, metrics={"val_accuracy": 0.9, "train_loss": 0.3}, epochs=2),
    dict(FULL_META, dataset="folder", preprocessing={"deskew": False, "image_files": DECODE_GRAY}),
    dict(FULL_META, dataset="csv", input_shape=[3, 8, 8], num_classes=2, classes=["cat", "dog"],
         preprocessing={"deskew": False, "image_files": dict(DECODE_GRAY, image_size=[8, 8], color="rgb", resize="crop")}),
]
FIELD_PATHS = [
    ("dataset",), ("classes",), ("classes", 0), ("classes", 1), ("num_classes",), ("input_shape",), ("input_shape", 0),
    ("input_shape", -1), ("preprocessing",), ("preprocessing", "deskew"), ("preprocessing", "scale"),
    ("preprocessing", "image_files"), ("preprocessing", "image_files", "name"), ("preprocessing", "image_files", "image_size"),
    ("preprocessing", "image_files", "image_size", 0), ("preprocessing", "image_files", "resize"),
    ("preprocessing", "image_files", "color"), ("preprocessing", "image_files", "steps"), ("config",), ("config", "seed"),
    ("metrics",), ("metrics", "val_accuracy"), ("epochs",),
]
odd_values = (
    st.sampled_from([
        None, True, False, 0, -1, 1, 3, 784, 2**31, 2**63, 2**64 + 1, -(2**70), 0.5, 28.0, float("nan"), float("inf"), "",
        "28", "rgb", "gray", "crop", "dataset-decode", "mnist-normalize", "line\nbreak", "\ud800", [], [28], [784], [1, 784],
        [784, 1], [28, 28], [3, 28, 28], [28, 28, 3], [1, 28, 28], [0, 0], [-28, -28], [2**20, 2**20], ["a", "a"], [None], [[28]],
        {}, {"name": "dataset-decode"}, {"image_size": "28x28"}, {"deskew": True}, {"a": {"b": {"c": [1, {"d": None}]}}},
    ])
    | json_values
)


def _mutate_field(meta, where: tuple, action: str, value):
    """``meta`` with the field at ``where`` deleted or replaced; a path that is not there changes nothing."""
    parent = meta
    for key in where[:-1]:
        if not _holds(parent, key):
            return
        parent = parent[key]
    key = where[-1]
    if isinstance(parent, dict) and isinstance(key, str):
        if action == "delete":
            parent.pop(key, None)
        else:
            parent[key] = value
    elif _holds(parent, key):
        parent[key] = value


def _holds(parent, key) -> bool:
    if isinstance(parent, dict):
        return key in parent
    return isinstance(parent, list) and isinstance(key, int) and -len(parent) <= key < len(parent)


@st.composite
def mutated_metadata(draw) -> tuple[dict, dict]:
    meta = json.loads(json.dumps(draw(st.sampled_from(VALID_METAS))))
    tensors = {"linear.weight": torch.randn(meta["num_classes"], int(np.prod(meta["input_shape"]))),
               "linear.bias": torch.zeros(meta["num_classes"])}
    for _ in range(draw(st.integers(1, 3))):
        _mutate_field(meta, draw(st.sampled_from(FIELD_PATHS)), draw(st.sampled_from(["delete", "replace"])), draw(odd_values))
    return meta, tensors


def test_valid_metadata_records_load_and_serve(ckpt_dir):
    for meta in VALID_METAS:
        tensors = {"linear.weight": torch.zeros(meta["num_classes"], int(np.prod(meta["input_shape"]))),
                   "linear.bias": torch.zeros(meta["num_classes"])}
        assert isinstance(load_bytes(ckpt_dir, _safetensors(tensors, _header(meta))), LogisticRegression)


@pytest.mark.parametrize(("where", "value", "field"), [
    (("preprocessing", "image_files"), ["dataset-decode"], "preprocessing.image_files"),
    (("input_shape",), [784], "input_shape"),
    (("input_shape",), [3, 28, 28], "preprocessing.image_files"),  # digits are gray
    (("classes", 0), ["nested"], "classes"),
    (("classes",), [str(i) for i in range(9)], "classes"),
    (("preprocessing", "deskew"), "yes", "preprocessing.deskew"),
    (("preprocessing", "image_files", "name"), 7, "preprocessing.image_files.name"),
    (("config", "seed"), "3", "config.seed"),
    (("metrics",), {"val_accuracy": 2**64}, "metrics"),
    (("dataset",), "\ud800", "dataset"),
])
def test_lying_metadata_field_is_named(ckpt_dir, where, value, field):
    meta = json.loads(json.dumps(VALID_METAS[0]))
    _mutate_field(meta, where, "replace", value)
    exc = load_bytes(ckpt_dir, _safetensors(GOOD_TENSORS, _header(meta)))
    assert isinstance(exc, CheckpointError) and f"field {field} " in str(exc), exc


@pytest.mark.parametrize(("index", "field"), [(0, "dataset"), (0, "classes"), (1, "preprocessing.image_files.color")])
def test_missing_metadata_field_is_named(ckpt_dir, index, field):
    meta = json.loads(json.dumps(VALID_METAS[index]))
    _mutate_field(meta, tuple(field.split(".")), "delete", None)
    tensors = {"linear.weight": torch.zeros(meta["num_classes"], int(np.prod(meta["input_shape"]))),
               "linear.bias": torch.zeros(meta["num_classes"])}
    exc = load_bytes(ckpt_dir, _safetensors(tensors, _header(meta)))
    assert isinstance(exc, CheckpointError) and f"field {field} is missing" in str(exc), exc


@FUZZ
@given(case=mutated_metadata())
@example(case=(dict(VALID_METAS[1], input_shape=[784]), GOOD_TENSORS))
@example(case=(dict(VALID_METAS[0], preprocessing={"image_files": [1, 2]}), GOOD_TENSORS))
def test_safetensors_metadata_fields_mutated(ckpt_dir, case):
    meta, tensors = case
    load_bytes(ckpt_dir, _safetensors(tensors, _header(meta)))


@FUZZ
@given(meta_text=st.text(max_size=40) | json_values.map(json.dumps), version=st.text(max_size=3))
def test_safetensors_metadata_not_a_dict(ckpt_dir, meta_text, version):
    header = {"format": "image-logreg", "version": version, "image_logreg": meta_text}
    load_bytes(ckpt_dir, _safetensors(GOOD_TENSORS, header))


# Pickles: anything but tensors is refused, saying why, and nothing in them ever runs.

MARKER = Path(tempfile.gettempdir()) / "image-logreg-fuzz-pickle-ran"


class RunsCode:
    """Unpickling this runs a shell command that creates MARKER."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class Plain:
    """A harmless object of a class that is not a tensor."""

    def __init__(self):
        self.weights = [1.0, 2.0]


def _zip_pickle(obj) -> bytes:
    return _torch_save(obj)


PAYLOADS = {
    "zip, runs code": _zip_pickle(RunsCode()),
    "zip, dict holding code": _zip_pickle({"linear.weight": RunsCode(), "linear.bias": torch.zeros(10)}),
    "zip, plain object": _zip_pickle(Plain()),
    "zip, dict holding an object": _zip_pickle(dict(LogisticRegression().state_dict(), extra=Plain())),
    "zip, whole module": _zip_pickle(LogisticRegression()),
    **{f"raw pickle protocol {p}, runs code": pickle.dumps(RunsCode(), protocol=p) for p in range(6)},
    "raw pickle, eval": b"cbuiltins\neval\n(Vopen(" + repr(str(MARKER)).encode() + b", 'w')\ntR.",
}


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_pickles_holding_objects_are_refused_without_running(ckpt_dir, name):
    MARKER.unlink(missing_ok=True)
    exc = load_bytes(ckpt_dir, PAYLOADS[name], ".pth")
    assert not MARKER.exists(), "unpickling ran code"
    assert isinstance(exc, CheckpointError), name
    assert "refused" in str(exc) and "could run code" in str(exc), str(exc)
    assert "weights_only" not in str(exc) and "\x1b" not in str(exc)


@FUZZ
@given(name=st.sampled_from(sorted(PAYLOADS)), data=st.data())
def test_mutated_pickles_never_run(ckpt_dir, name, data):
    MARKER.unlink(missing_ok=True)
    load_bytes(ckpt_dir, mutate(PAYLOADS[name], data.draw), ".pth")
    assert not MARKER.exists(), "unpickling ran code"


def test_pth_of_plain_values_says_what_it_found(ckpt_dir):
    exc = load_bytes(ckpt_dir, _torch_save({"linear.weight": 3, "linear.bias": [1.0]}), ".pth")
    assert isinstance(exc, CheckpointError) and "dict of tensors" in str(exc)


ODD_TENSORS = {
    "int64": torch.zeros(10, 784, dtype=torch.int64),
    "bool": torch.zeros(10, 784, dtype=torch.bool),
    "complex": torch.zeros(10, 784, dtype=torch.complex64),
    "sparse": torch.zeros(10, 784).to_sparse(),
    "meta": torch.empty(10, 784, device="meta"),
    "nan": torch.full((10, 784), float("nan")),
    "float16": torch.zeros(10, 784, dtype=torch.float16),  # loads: weights in another float precision
}


@pytest.mark.parametrize("kind", list(ODD_TENSORS))
def test_pth_with_odd_tensors(ckpt_dir, kind):
    state = {"linear.weight": ODD_TENSORS[kind], "linear.bias": torch.zeros(10)}
    result = load_bytes(ckpt_dir, _torch_save(state), ".pth")
    assert isinstance(result, LogisticRegression) == (kind == "float16"), str(result)
