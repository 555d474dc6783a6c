"""The datasets wing: folders and CSVs of image files, the cache, and the classic torchvision sets."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import write_idx
from image_logreg.data import prepare_inputs
from image_logreg.datasets import load_split
from image_logreg.errors import DataError, UsageError
from image_logreg.datasets import cache, cifar, folder, registry
from image_logreg.datasets import decode as images


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    yield tmp_path / "xdg-cache" / "image-logreg"


def save(path: Path, image: Image.Image, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **params)
    return path


def gray(value: int, size=(16, 12)) -> Image.Image:
    """An L image of ``size`` (W, H) with a brighter square, so resizing has something to move."""
    pixels = np.full((size[1], size[0]), value, dtype=np.uint8)
    pixels[2:6, 3:8] = 255 - value
    return Image.fromarray(pixels)


def load(path, split="train", log=None, **options):
    lines = [] if log is None else log
    data = load_split("folder" if Path(path).is_dir() else "csv", path, split, progress=False, log=lines.append, **options)
    return data


# --- folders: layout, modes, formats ------------------------------------------------------


def make_mixed_folder(root: Path) -> Path:
    """Two classes, 12x16 (H x W) images in every mode and format, nested folders, hidden and bad files."""
    red = Image.new("RGB", (16, 12), (220, 30, 30))
    cat, dog = root / "cat", root / "dog"
    save(cat / "gray.png", gray(20))
    save(cat / "photo.jpg", red, quality=95)
    save(cat / "nested" / "deeper" / "alpha.png", Image.new("RGBA", (16, 12), (0, 0, 0, 0)))
    save(cat / "palette.gif", red.convert("P", palette=Image.Palette.ADAPTIVE))
    save(cat / "sixteen.tif", Image.fromarray(np.full((12, 16), 40000, dtype=np.uint16)))
    save(cat / "cmyk.tif", Image.new("CMYK", (16, 12), (0, 255, 255, 0)))
    save(dog / "bitmap.bmp", gray(200).convert("RGB"))
    save(dog / "lossless.webp", Image.new("RGBA", (16, 12), (10, 200, 10, 255)), lossless=True)
    save(dog / "cmyk.jpg", Image.new("CMYK", (16, 12), (255, 0, 255, 0)))
    save(dog / "sixteen.png", Image.fromarray(np.full((12, 16), 1000, dtype=np.uint16)))
    save(dog / "palette.bmp", gray(90).convert("P"))
    # hidden files and folders are not part of the dataset, not even as skipped files
    (dog / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (dog / "._bitmap.bmp").write_bytes(b"AppleDouble")
    save(dog / ".ipynb_checkpoints" / "copy.png", gray(20))
    (root / ".hidden-class").mkdir()
    # files that are not usable images are skipped
    (dog / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (cat / "notes.txt").write_text("not an image")
    (dog / "empty.jpg").write_bytes(b"")
    return root


def test_folder_reads_every_mode_and_format_and_skips_what_is_not_an_image(tmp_path):
    root = make_mixed_folder(tmp_path / "pets")
    log = []
    train = load(root, "train", log, test_fraction=0.0)
    assert train.classes == ["cat", "dog"]
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.shape == (11, 3, 12, 16) and train.input_shape == (3, 12, 16)  # colour: some images have it
    assert train.labels.tolist() == [0] * 6 + [1] * 5
    record = train.source
    assert record["color"] == "rgb" and record["image_size"] == [12, 16] and record["layout"] == "held-out"
    assert record["files"][:3] == ["cat/cmyk.tif", "cat/gray.png", "cat/nested/deeper/alpha.png"]
    skipped = {s["path"]: s["reason"] for s in record["skipped"]}
    assert set(skipped) == {"cat/notes.txt", "dog/broken.png", "dog/empty.jpg"}
    assert "not an image file" in skipped["cat/notes.txt"]
    assert all("\n" not in reason for reason in skipped.values())
    assert [line for line in log if "skipped" in line] == [f"warning: skipped {p}: {r}" for p, r in sorted(skipped.items())]

    pixels = {name: train.images[i] for i, name in enumerate(record["files"])}
    assert pixels["cat/nested/deeper/alpha.png"].eq(255).all()  # transparent: white, not black
    assert pixels["cat/sixteen.tif"].eq(round(40000 / 65535 * 255)).all()  # 16-bit scaled to 8
    assert pixels["dog/sixteen.png"].eq(round(1000 / 65535 * 255)).all()
    assert pixels["cat/cmyk.tif"][:, 0, 0].tolist() == [255, 0, 0]  # CMYK cyan 0, magenta+yellow: red
    assert pixels["dog/lossless.webp"][:, 0, 0].tolist() == [10, 200, 10]
    assert pixels["cat/photo.jpg"][0].float().mean() > 200  # JPEG: red, roughly
    # gray images sit in all three channels alike
    assert torch.equal(pixels["cat/gray.png"][0], pixels["cat/gray.png"][2])
    assert torch.equal(pixels["cat/gray.png"][0], torch.from_numpy(np.array(gray(20))))


def test_gray_images_give_a_gray_dataset_and_colour_can_be_forced_either_way(tmp_path):
    root = tmp_path / "digits"
    save(root / "a" / "l.png", gray(10))
    save(root / "a" / "rgb-but-gray.png", gray(60).convert("RGB"))  # colour mode, no colour in it
    save(root / "b" / "palette.gif", gray(120).convert("P"))
    save(root / "b" / "sixteen.tif", Image.fromarray(np.full((12, 16), 65535, dtype=np.uint16)))
    auto = load(root, test_fraction=0.0)
    assert auto.images.shape == (4, 12, 16) and auto.source["color"] == "gray"
    assert torch.equal(auto.images[1], torch.from_numpy(np.array(gray(60))))
    rgb = load(root, test_fraction=0.0, color="rgb", no_cache=True)
    assert rgb.images.shape == (4, 3, 12, 16) and torch.equal(rgb.images[:, 1], auto.images)

    save(root / "b" / "red.png", Image.new("RGB", (16, 12), (255, 0, 0)))
    forced = load(root, test_fraction=0.0, color="gray")
    assert forced.images.shape == (5, 12, 16)
    assert forced.images[forced.source["files"].index("b/red.png")].eq(76).all()  # ITU-R 601 luma of pure red, as convert("L")


def test_exif_orientation_is_applied_before_sizes_are_compared(tmp_path):
    root = tmp_path / "photos"
    stored = np.zeros((10, 20), dtype=np.uint8)  # stored 20 wide, 10 high, a mark in its top-left corner
    stored[0, :3] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    turned = save(root / "a" / "turned.png", Image.fromarray(stored), exif=exif)
    save(root / "b" / "upright.png", Image.new("L", (10, 20), 128))  # 10 wide, 20 high
    data = load(root, test_fraction=0.0)
    assert data.images.shape == (2, 20, 10)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(turned)))
    assert np.array_equal(data.images[0].numpy(), expected) and expected[0, -1] == 255


def test_differing_sizes_without_image_size_is_one_line_naming_the_sizes(tmp_path):
    root = tmp_path / "mixed"
    for i in range(3):
        save(root / "a" / f"{i}.png", gray(0, (16, 12)))
    save(root / "b" / "big.png", gray(0, (40, 30)))
    save(root / "b" / "tall.png", gray(0, (8, 50)))
    with pytest.raises(UsageError) as err:
        load(root)
    message = str(err.value)
    assert "\n" not in message and "--image-size" in message
    assert "12x16 (3)" in message and "30x40 (1)" in message and "50x8 (1)" in message
    data = load(root, image_size="24x24", test_fraction=0.0)
    assert data.images.shape == (5, 24, 24) and data.source["requested"]["image_size"] == [24, 24]


def test_resize_modes_fit_pads_with_the_background_stretch_and_crop_fill(tmp_path):
    root = tmp_path / "shapes"
    dark = np.zeros((20, 10), dtype=np.uint8)  # 10 wide, 20 high: a dark background, a bright stroke
    dark[5:15, 4:6] = 255
    save(root / "dark" / "x.png", Image.fromarray(dark))
    save(root / "light" / "x.png", Image.fromarray(255 - dark))
    fit = load(root, image_size=20, test_fraction=0.0)
    assert fit.images.shape == (2, 20, 20)
    assert fit.images[0, :, :5].eq(0).all() and fit.images[1, :, :5].eq(255).all()  # padding looks like the background
    assert torch.equal(fit.images[0, :, 5:15], torch.from_numpy(dark))  # the image itself untouched at scale 1
    stretch = load(root, image_size=20, resize="stretch", test_fraction=0.0)
    assert stretch.images[0, :, 0].eq(0).all() and stretch.images[0, 10, 8:12].gt(128).all()
    crop = load(root, image_size=(10, 10), resize="crop", test_fraction=0.0)
    assert torch.equal(crop.images[0], torch.from_numpy(dark[5:15]))  # the middle 10 rows, at scale 1
    with pytest.raises(UsageError, match="--resize"):
        load(root, image_size=20, resize="squash")


def test_train_and_test_folders_are_the_splits(tmp_path):
    root = tmp_path / "split"
    for split, count in (("train", 3), ("test", 2)):
        for name in ("ant", "bee"):
            for i in range(count):
                save(root / split / name / f"{i}.png", gray(i * 40))
    save(root / "val" / "ant" / "0.png", gray(0))
    log = []
    train, test = load(root, "train", log), load(root, "test", log)
    assert (len(train), len(test)) == (6, 4) and train.classes == test.classes == ["ant", "bee"]
    assert test.source["layout"] == "splits" and test.source["files"][0] == "test/ant/0.png"
    assert "test_indices" not in test.source
    assert any("val" in line and "ignored" in line for line in log)
    for path in (root / "test" / "bee").iterdir():  # a test split may lack a class
        path.unlink()
    assert load(root, "test").labels.tolist() == [0, 0]
    save(root / "test" / "wasp" / "0.png", gray(0))  # but every class must have training images
    with pytest.raises(DataError, match="wasp"):
        load(root, "train")


def test_held_out_split_is_stratified_seeded_and_recorded(tmp_path):
    root = tmp_path / "held"
    for name, count in (("a", 10), ("b", 5), ("c", 1)):
        for i in range(count):
            save(root / name / f"{i:02d}.png", gray(i * 20))
    train, test = load(root, "train", seed=3), load(root, "test", seed=3)
    assert test.labels.tolist() == [0, 0, 1]  # round(0.2 * n) per class; a class of 1 keeps it for training
    assert len(train) + len(test) == 16
    indices = test.source["test_indices"]  # positions among all usable images, in listing order
    every_file = [f"a/{i:02d}.png" for i in range(10)] + [f"b/{i:02d}.png" for i in range(5)] + ["c/00.png"]
    assert test.source["files"] == [every_file[i] for i in indices]
    assert set(train.source["files"]).isdisjoint(test.source["files"])
    assert test.source["seed"] == 3 and test.source["test_fraction"] == 0.2
    other = load(root, "test", seed=4, no_cache=True).source["test_indices"]
    assert other != indices and load(root, "test", seed=3).source["test_indices"] == indices
    with pytest.raises(UsageError, match="--test-fraction"):
        load(root, "test", test_fraction=1.0)
    with pytest.raises(DataError, match="held-out test split is empty"):
        load(root, "test", test_fraction=0.0)


def test_empty_class_and_unusable_classes_are_errors(tmp_path):
    root = tmp_path / "bad"
    save(root / "a" / "0.png", gray(0))
    (root / "b").mkdir()
    with pytest.raises(DataError) as err:
        load(root)
    assert "1 class with no files: b" in str(err.value) and "\n" not in str(err.value)
    (root / "b" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="left with no usable images for training: b"):
        load(root)
    (root / "a" / "0.png").write_bytes(b"not a png either")
    with pytest.raises(DataError, match="no usable images"):
        load(root)
    (root / "b").rename(root / ".b")
    with pytest.raises(DataError, match="one class folder"):
        load(root)


def test_symlink_loops_are_followed_once_and_linked_files_count(tmp_path):
    root = tmp_path / "links"
    save(root / "a" / "0.png", gray(0))
    save(root / "a" / "sub" / "1.png", gray(50))
    save(root / "b" / "0.png", gray(100))
    os.symlink(root / "a", root / "a" / "sub" / "loop")  # a folder inside itself
    os.symlink(root / "a" / "0.png", root / "b" / "linked.png")
    os.symlink(root / "nowhere.png", root / "b" / "dangling.png")
    log = []
    data = load(root, log=log, test_fraction=0.0)
    assert data.source["files"] == ["a/0.png", "a/sub/1.png", "b/0.png", "b/linked.png"]
    assert data.labels.tolist() == [0, 0, 1, 1] and torch.equal(data.images[0], data.images[3])
    assert data.source["skipped"] == [{"path": "b/dangling.png", "reason": "broken symbolic link"}]
    assert any("loop" in line and "not followed" in line for line in log)


def test_non_ascii_names(tmp_path):
    root = tmp_path / "données"
    save(root / "café" / "Ünïcode 图.png", gray(0))
    save(root / "thé" / "ça.png", gray(255))
    data = load(root, test_fraction=0.0)
    assert data.classes == ["café", "thé"] and data.source["files"] == ["café/Ünïcode 图.png", "thé/ça.png"]


def test_many_skipped_files_are_summed_up_after_ten(tmp_path):
    root = tmp_path / "noisy"
    save(root / "a" / "ok.png", gray(0))
    save(root / "b" / "ok.png", gray(9))
    for i in range(13):
        (root / "b" / f"bad{i:02d}.png").write_bytes(b"")
    log = []
    data = load(root, log=log, test_fraction=0.0)
    assert len(data.source["skipped"]) == 13
    assert len(log) == 11 and log[-1] == "warning: skipped 3 more files that are not usable images (13 in all)"


def test_decoding_in_worker_processes_matches_one_process(tmp_path, monkeypatch):
    root = make_mixed_folder(tmp_path / "pets")
    serial = load(root, test_fraction=0.0, no_cache=True, workers=1)
    monkeypatch.setattr(images, "PARALLEL_FROM", 1)
    monkeypatch.setattr(images, "CHUNK", 2)  # colour and gray images in separate chunks and together
    parallel = load(root, test_fraction=0.0, no_cache=True, workers=2)
    assert torch.equal(serial.images, parallel.images) and serial.source["skipped"] == parallel.source["skipped"]


# A decode whose chunks take a minute: its workers are certainly busy when the parent is killed.
_STALLED_DECODE = """
import sys, time
from image_logreg.datasets import decode as images, workers
if sys.argv[1] == "watch":
    workers._kernel_kills_on_parent_death = lambda: False
def stall(task):
    time.sleep(60)
images._decode_chunk = stall
paths = [f"{i}.png" for i in range(4 * images.CHUNK)]
images.decode_files(paths, images.DecodeSettings((4, 4), "fit", "gray"), progress=False, workers=2)
"""


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker processes from /proc")
@pytest.mark.parametrize("how", ["kernel", "watch"])
def test_decode_workers_end_when_their_parent_is_killed(how):
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _STALLED_DECODE, how])
    workers = set()
    try:
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
            workers = _children(parent.pid)
        assert len(workers) == 2, f"the decode did not start its 2 workers (exit status {parent.poll()})"
        time.sleep(0.5)  # past the workers' start, into their chunks
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, workers)), f"workers {sorted(filter(_running, workers))} outlived their parent"
    finally:
        parent.kill()
        for pid in filter(_running, workers):
            os.kill(pid, signal.SIGKILL)


def test_progress_bar_goes_to_stderr_when_asked(tmp_path, capsys):
    root = tmp_path / "bar"
    save(root / "a" / "0.png", gray(0))
    save(root / "b" / "0.png", gray(1))
    load_split("folder", root, "train", progress=True, test_fraction=0.0)
    captured = capsys.readouterr()
    assert "decoding images" in captured.err and captured.out == ""


def test_image_size_parsing():
    assert images.parse_image_size("28x32") == (28, 32) and images.parse_image_size("64") == (64, 64)
    assert images.parse_image_size(32) == (32, 32) and images.parse_image_size([3, 4]) == (3, 4)
    for bad in ("0x5", "axb", "1x2x3", "99999"):
        with pytest.raises(UsageError, match="--image-size"):
            images.parse_image_size(bad)


# --- CSV ----------------------------------------------------------------------------------


def test_csv_paths_are_relative_to_the_csv_and_labels_are_class_names(tmp_path):
    save(tmp_path / "imgs" / "x.png", gray(0))
    save(tmp_path / "imgs" / "y.png", gray(80))
    save(tmp_path / "imgs" / "z.png", gray(160))
    manifest = tmp_path / "meta" / "labels.csv"
    manifest.parent.mkdir()
    manifest.write_text("\ufeffpath,label\n../imgs/x.png,zebra\n../imgs/y.png, ant \n\n../imgs/gone.png,ant\n../imgs/z.png,zebra\n", encoding="utf-8")
    data = load(manifest, test_fraction=0.0)
    assert data.classes == ["ant", "zebra"] and data.labels.tolist() == [1, 0, 1]
    assert data.source["kind"] == "csv" and data.source["files"] == ["../imgs/x.png", "../imgs/y.png", "../imgs/z.png"]
    assert data.source["skipped"] == [{"path": "../imgs/gone.png", "reason": "no such file"}]


def test_csv_split_column_and_malformed_files(tmp_path):
    for name in "abcd":
        save(tmp_path / f"{name}.png", gray(ord(name)))
    manifest = tmp_path / "l.csv"
    manifest.write_text("label,path,split\ncat,a.png,train\ndog,b.png,TRAIN\ncat,c.png,test\ndog,d.png,test\n")
    assert load(manifest, "test").source["files"] == ["c.png", "d.png"]
    for text, message in (
        ("file,class\na.png,cat\n", "header naming the columns path and label"),
        ("path,label\na.png,\n", "line 2 has an empty label"),
        ("path,label,split\na.png,cat,val\n", "line 2 has split 'val'"),
        ("path,label\na.png,cat\nb.png,cat\n", "a classifier needs at least two"),
        ("path,label\n", "lists no files"),
    ):
        manifest.write_text(text)
        with pytest.raises(DataError, match=message):
            load(manifest)
    with pytest.raises(DataError, match="expects a CSV file"):
        load_split("csv", tmp_path, "train")


# --- the cache ----------------------------------------------------------------------------


def make_small_folder(root: Path) -> Path:
    for name in ("a", "b"):
        for i in range(3):
            save(root / name / f"{i}.png", gray(30 * i + (0 if name == "a" else 100)))
    return root


def test_cache_hit_decodes_nothing_and_returns_the_same_images(tmp_path, monkeypatch, isolated_cache):
    root = make_small_folder(tmp_path / "small")
    first = load(root, test_fraction=0.0)
    assert first.source["cache"]["hit"] is False
    entry = Path(first.source["cache"]["path"])
    assert entry.parent == isolated_cache and (entry / cache.IMAGES_FILE).is_file()

    monkeypatch.setattr(folder, "decode_files", lambda *a, **k: pytest.fail("decoded on a cache hit"))
    again = load(root, test_fraction=0.0)
    assert again.source["cache"]["hit"] is True
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert again.source["files"] == first.source["files"]


def test_cache_misses_after_a_file_changes_or_with_other_settings(tmp_path, isolated_cache):
    root = make_small_folder(tmp_path / "small")
    load(root, test_fraction=0.0)
    changed = root / "a" / "1.png"
    save(changed, gray(222))
    os.utime(changed, ns=(1, 1_000_000_123))
    data = load(root, test_fraction=0.0)
    assert data.source["cache"]["hit"] is False
    assert torch.equal(data.images[1], torch.from_numpy(np.array(gray(222))))
    assert load(root, test_fraction=0.0, image_size=8).source["cache"]["hit"] is False
    assert len(list(isolated_cache.iterdir())) == 3


def test_interrupted_cache_write_leaves_no_entry(tmp_path, monkeypatch):
    root = make_small_folder(tmp_path / "small")
    cache_dir = tmp_path / "cache"

    def interrupted(folder_path, images_array, info):
        np.save(folder_path / cache.IMAGES_FILE, images_array)  # half the entry written, then
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_write_entry", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(root, test_fraction=0.0, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []


def test_failed_cache_write_warns_and_the_load_goes_on(tmp_path, monkeypatch):
    root = make_small_folder(tmp_path / "small")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "_write_entry", disk_full)
    log = []
    data = load(root, log=log, test_fraction=0.0, cache_dir=tmp_path / "cache")
    assert len(data) == 6 and data.source["cache"]["path"] is None
    assert any("No space left on device" in line for line in log)
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_cache_writes_nothing_and_a_damaged_entry_is_rebuilt(tmp_path, isolated_cache):
    root = make_small_folder(tmp_path / "small")
    load(root, test_fraction=0.0, no_cache=True)
    assert not isolated_cache.exists()
    entry = Path(load(root, test_fraction=0.0).source["cache"]["path"])
    (entry / cache.IMAGES_FILE).write_bytes(b"\x93NUMPY damaged")
    rebuilt = load(root, test_fraction=0.0)
    assert rebuilt.source["cache"]["hit"] is False and len(rebuilt) == 6
    assert load(root, test_fraction=0.0).source["cache"]["hit"] is True


def _lie_in_entry(entry: Path, lie: str) -> None:
    import json

    record_file = entry / cache.ENTRY_FILE
    record = json.loads(record_file.read_text())
    if lie == "pixels":
        images_file = entry / cache.IMAGES_FILE
        data = bytearray(images_file.read_bytes())
        data[-5] ^= 0xFF  # one pixel, in place: the file's size and header stay right
        images_file.write_bytes(bytes(data))
        return
    changes = {
        "usable out of range": {"usable": [*record["usable"][:-1], 10**6]},
        "usable negative": {"usable": [-1, *record["usable"][1:]]},
        "usable strings": {"usable": [str(i) for i in record["usable"]]},
        "usable repeated": {"usable": [0, *record["usable"][:-1]]},
        "usable a number": {"usable": 3},
        "skipped garbage": {"skipped": [[{"a": 1}, None]]},
        "image_size": {"image_size": [6, 8]},
        "image_size strings": {"image_size": ["12", "16"]},
        "color": {"color": "rgb"},
        "color unknown": {"color": ["gray"]},
        "shape": {"shape": "6x12x16"},
        "checksum": {"checksum": None},
    }
    if lie == "missing key":
        del record["usable"]
    elif lie == "a list":
        record = [record]
    elif lie == "nested garbage":
        record = {"format": record["format"], "checksum": record["checksum"], "usable": [[[[]]]] * 3, "skipped": {"x": [1]}}
    else:
        record.update(changes[lie])
    record_file.write_text(json.dumps(record))


@pytest.mark.parametrize("lie", [
    "pixels", "usable out of range", "usable negative", "usable strings", "usable repeated", "usable a number",
    "skipped garbage", "image_size", "image_size strings", "color", "color unknown", "shape", "checksum", "missing key",
    "a list", "nested garbage",
])
def test_a_lying_cache_entry_is_rebuilt(tmp_path, isolated_cache, lie):
    root = make_small_folder(tmp_path / "small")
    first = load(root, test_fraction=0.0)
    _lie_in_entry(Path(first.source["cache"]["path"]), lie)
    rebuilt = load(root, test_fraction=0.0)
    assert rebuilt.source["cache"]["hit"] is False
    assert torch.equal(rebuilt.images, first.images) and torch.equal(rebuilt.labels, first.labels)
    again = load(root, test_fraction=0.0)
    assert again.source["cache"]["hit"] is True and torch.equal(again.images, first.images)


def test_a_cache_entry_of_another_colour_or_size_than_asked_is_not_used(tmp_path, isolated_cache):
    """An entry's colour and size must be those the load asks for, even where the images agree with the record."""
    import json

    root = make_small_folder(tmp_path / "small")
    asked = dict(test_fraction=0.0, color="gray", image_size=8)
    first = load(root, **asked)
    entry = Path(first.source["cache"]["path"])
    rgb = np.repeat(np.load(entry / cache.IMAGES_FILE)[:, None], 3, axis=1)
    np.save(entry / cache.IMAGES_FILE, rgb)
    record = json.loads((entry / cache.ENTRY_FILE).read_text())
    record.update(color="rgb", shape=list(rgb.shape), checksum=cache.file_checksum(entry / cache.IMAGES_FILE))
    (entry / cache.ENTRY_FILE).write_text(json.dumps(record))
    again = load(root, **asked)
    assert again.source["cache"]["hit"] is False and again.images.shape == (6, 8, 8)


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache.default_cache_dir() == tmp_path / "x" / "image-logreg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == tmp_path / "home" / ".cache" / "image-logreg"


# --- colour through the rest of the pipeline ------------------------------------------------


def test_logistic_regression_on_colour_images_and_deskew_refused(tmp_path):
    from image_logreg import LogisticRegression, TrainConfig, fit, to_float

    root = tmp_path / "colours"
    rng = np.random.default_rng(0)
    for name, colour in (("blue", (0, 0, 200)), ("red", (200, 0, 0))):
        for i in range(6):
            noise = rng.integers(0, 40, size=(8, 8, 3), dtype=np.uint8)
            save(root / name / f"{i}.png", Image.fromarray(np.asarray(colour, dtype=np.uint8) + noise))
    data = load(root, test_fraction=0.0)
    assert data.input_shape == (3, 8, 8)
    model = LogisticRegression(data.input_shape, len(data.classes))
    assert sum(p.numel() for p in model.parameters()) == 3 * 8 * 8 * 2 + 2
    x = to_float(data.images)
    fit(model, x, data.labels, None, None, TrainConfig(epochs=20, batch_size=4, lr=0.05))
    assert model.score(x, data.labels) == 1.0
    assert prepare_inputs(data.images, {"deskew": False}).shape == (12, 3, 8, 8)
    with pytest.raises(UsageError, match="grayscale"):
        prepare_inputs(data.images, {"deskew": {"name": "moment-deskew"}})


def test_dispatch_and_options(tmp_path, toy_data):
    with pytest.raises(UsageError, match="--image-size applies to --dataset folder and csv only"):
        load_split("mnist", toy_data, "train", download=False, image_size=32)
    with pytest.raises(UsageError, match="cifar10"):
        load_split("cifar10", toy_data, "train", download=False, color="gray")
    with pytest.raises(TypeError, match="imagesize"):
        load_split("folder", tmp_path, "train", imagesize=32)
    # loading options are accepted for every dataset, so callers can pass them alike
    mnist = load_split("mnist", toy_data, "train", download=False, cache_dir=tmp_path, progress=False, image_size=None)
    assert len(mnist) == 600 and mnist.source == {}


# --- KMNIST and EMNIST --------------------------------------------------------------------


def test_kmnist_reads_its_idx_files(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    write_idx(raw / "t10k-images-idx3-ubyte", images)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([9, 0, 4], dtype=np.uint8))
    data = load_split("kmnist", tmp_path, "test", download=False)
    assert torch.equal(data.images, torch.from_numpy(images)) and data.labels.tolist() == [9, 0, 4]
    assert data.classes[9] == "wo" and data.dataset == "kmnist"
    with pytest.raises(DataError) as err:
        load_split("kmnist", tmp_path, "train", download=False)
    assert str(err.value).startswith("kmnist train data missing: train-images-idx3-ubyte, train-labels-idx1-ubyte not found")
    assert "DIR/KMNIST/raw/" in str(err.value)
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(DataError, match="not a valid IDX image file"):
        load_split("kmnist", tmp_path, "test", download=False)


def write_emnist(root: Path, which: str, split: str, upright: np.ndarray, labels: np.ndarray) -> None:
    """EMNIST's own files: each image stored transposed (column by column), as the NIST conversion wrote them."""
    raw = root / "EMNIST" / "raw"
    write_idx(raw / f"emnist-{which}-{split}-images-idx3-ubyte", upright.transpose(0, 2, 1))
    write_idx(raw / f"emnist-{which}-{split}-labels-idx1-ubyte", labels)


def test_emnist_letters_are_upright_and_labelled_from_zero(tmp_path):
    upright = np.zeros((2, 28, 28), dtype=np.uint8)
    upright[:, 2:26, 4:7] = 255  # the stem of an "L" on its left ...
    upright[:, 23:26, 4:20] = 255  # ... and its foot at the bottom
    write_emnist(tmp_path, "letters", "train", upright, np.array([12, 26], dtype=np.uint8))
    data = load_split("emnist-letters", tmp_path, "train", download=False)
    assert torch.equal(data.images, torch.from_numpy(upright))
    assert data.labels.tolist() == [11, 25] and data.classes[11] == "l" and len(data.classes) == 26
    write_emnist(tmp_path, "letters", "test", upright, np.array([0, 3], dtype=np.uint8))  # 0 is not a letter
    with pytest.raises(DataError, match="labels outside 1..26"):
        load_split("emnist-letters", tmp_path, "test", download=False)


def test_emnist_balanced_and_digits(tmp_path):
    upright = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    write_emnist(tmp_path, "balanced", "test", upright, np.array([0, 10, 36, 46], dtype=np.uint8))
    balanced = load_split("emnist-balanced", tmp_path, "test", download=False)
    assert [balanced.classes[i] for i in balanced.labels] == ["0", "A", "a", "t"] and len(balanced.classes) == 47
    assert torch.equal(balanced.images, torch.from_numpy(upright))
    write_emnist(tmp_path, "digits", "train", upright, np.array([1, 2, 3, 9], dtype=np.uint8))
    assert load_split("emnist-digits", tmp_path, "train", download=False).classes == list("0123456789")
    with pytest.raises(DataError, match="DIR/EMNIST/raw/"):
        load_split("emnist-digits", tmp_path, "test", download=False)


def test_failed_download_is_one_line_with_its_cause_and_leaves_nothing(tmp_path, monkeypatch):
    def no_network(data_dir):
        (data_dir / "cifar-10-python.tar.gz").write_bytes(b"partial")  # as a cut download leaves it
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nTried http://a/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(cifar, "_download_cifar", lambda dataset, data_dir: no_network(data_dir))
    (tmp_path / "mine.txt").write_text("the user's")
    with pytest.raises(DataError) as err:
        load_split("cifar10", tmp_path, "train", download=True)
    assert "download failed (Error downloading cifar-10-python.tar.gz: <urlopen error [Errno -2] Name or service not known>)" in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_a_failed_download_into_a_new_folder_removes_the_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(self, *a, **k):
        os.makedirs(self.raw_folder, exist_ok=True)  # as torchvision does before it downloads
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    with pytest.raises(DataError, match="download failed"):
        load_split("mnist", tmp_path / "data", "train", download=True)
    assert not (tmp_path / "data").exists()


# --- CIFAR ----------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the CIFAR batches: protocol 2, byte strings as
    Python 2 ``str`` opcodes, numpy arrays through ``numpy.core.multiarray._reconstruct``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    # numpy 2 names its module numpy._core; the files were written by numpy 1
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(n: int, labels_key: bytes, seed: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    batch = {b"batch_label": b"batch", labels_key: labels, b"data": data, b"filenames": [b"f%d.png" % i for i in range(n)]}
    return batch, data


def write_cifar10(root: Path) -> tuple[np.ndarray, list]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (base / "batches.meta").write_bytes(py2_pickle({b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}))
    all_data, all_labels = [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch, data = cifar_batch(2 + i, b"labels", i)
        (base / name).write_bytes(py2_pickle(batch))
        if name != "test_batch":
            all_data.append(data)
            all_labels += batch[b"labels"]
    return np.concatenate(all_data), all_labels


def test_cifar10_reads_python_batches_as_colour_images(tmp_path):
    data, labels = write_cifar10(tmp_path)
    train = load_split("cifar10", tmp_path, "train", download=False)
    assert train.images.shape == (len(data), 3, 32, 32) and train.input_shape == (3, 32, 32)
    assert train.labels.tolist() == labels and train.classes[0] == "airplane" and train.dataset == "cifar10"
    # each row: the 1024 red values (row by row), then green, then blue
    assert torch.equal(train.images[0, 1, 0, :5], torch.from_numpy(data[0, 1024:1029]))
    assert len(load_split("cifar10", tmp_path, "test", download=False)) == 7


def test_cifar100_uses_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    names = [b"class%02d" % i for i in range(100)]
    (base / "meta").write_bytes(py2_pickle({b"fine_label_names": names, b"coarse_label_names": names[:20]}))
    batch, data = cifar_batch(4, b"fine_labels", 0)
    batch[b"fine_labels"] = [99, 0, 50, 7]
    batch[b"coarse_labels"] = [1, 2, 3, 4]
    (base / "test").write_bytes(py2_pickle(batch))
    test = load_split("cifar100", tmp_path, "test", download=False)
    assert test.labels.tolist() == [99, 0, 50, 7] and test.classes[99] == "class99" and test.images.shape == (4, 3, 32, 32)
    with pytest.raises(DataError) as err:
        load_split("cifar100", tmp_path, "train", download=False)
    assert str(err.value).startswith("cifar100 train data missing: train not found in") and "\n" not in str(err.value)


def test_cifar_damage_is_a_one_line_data_error(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_split("cifar10", tmp_path, "test", download=False)
    broken, _ = cifar_batch(3, b"labels", 0)
    broken[b"labels"] = [0, 1]
    batch.write_bytes(py2_pickle(broken))
    with pytest.raises(DataError, match="one whole number per image"):
        load_split("cifar10", tmp_path, "test", download=False)
    broken[b"labels"] = [0, 1, 10]
    batch.write_bytes(py2_pickle(broken))
    with pytest.raises(DataError, match=r"labels outside 0..9"):
        load_split("cifar10", tmp_path, "test", download=False)


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    assert pickle.loads(pickle.dumps(Exploit(tmp_path / "control"))) == 0 and (tmp_path / "control").exists()
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"data": Exploit(marker), "labels": []}, protocol=2))
    with pytest.raises(DataError) as err:
        load_split("cifar10", tmp_path, "test", download=False)
    assert "posix.system" in str(err.value) or "nt.system" in str(err.value)
    assert "refused" in str(err.value) and not marker.exists()
    # nor does an object array smuggle anything in
    with pytest.raises(cifar.RefusedGlobal):
        cifar.loads_safely(pickle.dumps(np.array([1, "x"], dtype=object), protocol=2))


def test_class_lists_and_file_layouts_match_torchvision():
    from torchvision.datasets import CIFAR10, CIFAR100, EMNIST, KMNIST

    assert list(registry.KMNIST_CLASSES) == KMNIST.classes
    assert ["N/A"] + list(registry.EMNIST_CLASSES["letters"]) == EMNIST.classes_split_dict["letters"]
    assert list(registry.EMNIST_CLASSES["balanced"]) == EMNIST.classes_split_dict["balanced"]
    assert list(registry.EMNIST_CLASSES["digits"]) == EMNIST.classes_split_dict["digits"]
    for name, dataset in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        entry = registry.dataset(name)
        layout = entry.files
        assert entry.torchvision == dataset.__name__
        assert layout["folder"] == dataset.base_folder and layout["meta"] == dataset.meta["filename"]
        assert list(layout["train"]) == [f for f, _ in dataset.train_list] and list(layout["test"]) == [f for f, _ in dataset.test_list]
        assert layout["names_key"] == dataset.meta["key"]


def test_read_image_makes_a_new_file_as_the_dataset_was_made(tmp_path):
    photo = save(tmp_path / "photo.png", Image.new("RGB", (40, 20), (255, 0, 0)))
    settings = images.DecodeSettings((10, 10), "fit", "gray")
    pixels = images.read_image(photo, settings)
    assert pixels.shape == (10, 10) and pixels[5, 5] == 76
    assert images.read_image(photo, images.DecodeSettings((10, 10), "crop", "rgb")).shape == (3, 10, 10)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    from image_logreg.errors import ImageError

    with pytest.raises(ImageError, match=r"broken.jpg: "):
        images.read_image(broken, settings)


@pytest.mark.integration
def test_mnist_exported_as_png_folder_loads_back_to_the_same_pixels(real_data, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "mnist-png"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "export_folder.py"
    done = subprocess.run(
        [sys.executable, str(script), str(out), "--data-dir", str(real_data), "--limit", "700"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for split in ("train", "test"):
        mnist = load_split("mnist", real_data, split, download=False)
        data = load_split("folder", out, split, progress=False)
        order = np.argsort(mnist.labels[:700].numpy(), kind="stable")  # the folder lists class by class
        assert data.classes == [str(i) for i in range(10)] and data.source["layout"] == "splits"
        assert torch.equal(data.images, mnist.images[:700][order]) and torch.equal(data.labels, mnist.labels[:700][order])
