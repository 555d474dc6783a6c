"""Streaming: a training set whose float form exceeds --max-memory is trained batch by batch from
its memory-mapped uint8 file, to exactly the weights in-memory training gives."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, train
from image_logreg import stream
from image_logreg.errors import UsageError


def weights(run) -> dict:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key}: max difference {(wa[key] - wb[key]).abs().max()}"


@pytest.mark.parametrize("extra", [[], ["--optimizer", "sgd", "--momentum", "0.9", "--batch-size", "50"], ["--deskew"]],
                         ids=["adam", "sgd", "deskew"])
def test_streamed_training_gives_the_in_memory_weights(capsys, toy_data, tmp_path, extra):
    in_memory = train(capsys, toy_data, tmp_path / "memory", *extra)
    streamed = train(capsys, toy_data, tmp_path / "streamed", *extra, "--max-memory", "1K")
    assert json.loads((tmp_path / "memory" / "config.json").read_text())["streamed"] is False
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["streamed"] is True and config["max_memory"] == 1024
    assert_same_weights(tmp_path / "memory", tmp_path / "streamed")
    for a, b in zip(in_memory["history"], streamed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_a_folder_streams_from_its_cache(capsys, tmp_path):
    from test_own_images import make_folder

    data = make_folder(tmp_path / "pets", classes=3, per_class=6, color=True)
    flags = ["--dataset", "folder", "--cache-dir", str(tmp_path / "cache"), "--epochs", "4"]
    train(capsys, data, tmp_path / "memory", *flags)
    train(capsys, data, tmp_path / "streamed", *flags, "--max-memory", "100")
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["streamed"] is True
    assert_same_weights(tmp_path / "memory", tmp_path / "streamed")


def test_the_default_budget_keeps_mnist_in_memory(capsys, toy_data, tmp_path):
    train(capsys, toy_data, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["streamed"] is False and config["max_memory"] == stream.default_max_memory()
    assert stream.default_max_memory() > 60_000 * 784 * 4  # all of MNIST as floats fits on any machine here


@pytest.mark.parametrize("text, expected", [("4G", 4 << 30), ("800M", 800 << 20), ("1.5GiB", 3 << 29), ("1073741824", 1 << 30),
                                            ("64k", 64 << 10), (" 2 gb ", 2 << 30)])
def test_max_memory_sizes(text, expected):
    assert stream.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "1.5X", "nan", "inf"])
def test_bad_max_memory_is_a_one_line_error(capsys, toy_data, tmp_path, text):
    with pytest.raises(UsageError):
        stream.parse_memory(text)
    code, out, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "r", "--quiet", "--no-download",
                             f"--max-memory={text}")  # "=": argparse would take "-1G" for a flag
    assert code == 2 and err.startswith("image-logreg: error: --max-memory") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_lbfgs_needs_the_set_in_memory(capsys, toy_data, tmp_path):
    code, out, err = run_cli(capsys, "train", "--data-dir", toy_data, "--out", tmp_path / "r", "--quiet", "--no-download",
                             "--optimizer", "lbfgs", "--max-memory", "1K")
    assert code == 2 and "L-BFGS" in err and "--max-memory" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_rows_are_read_from_the_file_the_images_are_mapped_from(tmp_path):
    """The rows asked for, scaled as in memory, read from the IDX file; without a file, from memory."""
    from conftest import write_toy_dataset
    from image_logreg.data import prepare_inputs
    from image_logreg.datasets import load_split
    from image_logreg.datasets.base import FileRegion, file_region

    data = load_split("mnist", write_toy_dataset(tmp_path / "data"), "train", download=False)
    assert data.file == FileRegion(str(tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"), 16)
    rows = torch.tensor([5, 3, 400, 7])
    expected = prepare_inputs(data.images[rows], None).reshape(4, -1)
    for file in (data.file, None):
        streamed = stream.StreamedImages(data.images, rows, None, "cpu", file)
        assert torch.equal(streamed.take(torch.tensor([0, 1, 2, 3])), expected)
        assert torch.equal(streamed[1:3], expected[1:3]) and streamed.shape == (4, 784) and len(streamed) == 4
    # a view keeps its place in the file; an array in memory, or not contiguous, has none
    mapped = np.memmap(data.file.path, dtype=np.uint8, mode="r", offset=16, shape=(len(data), 28, 28))
    assert file_region(mapped[10:20]) == FileRegion(data.file.path, 16 + 10 * 784)
    assert file_region(mapped.reshape(len(data), -1)) == data.file
    assert file_region(mapped[:, :, ::2]) is None and file_region(np.zeros((3, 28, 28), np.uint8)) is None


def test_a_file_cut_short_while_training_is_a_one_line_error(tmp_path):
    from conftest import write_toy_dataset
    from image_logreg.datasets import load_split
    from image_logreg.errors import DataError

    data = load_split("mnist", write_toy_dataset(tmp_path / "data"), "train", download=False)
    copy = tmp_path / "copy"
    copy.write_bytes(open(data.file.path, "rb").read(16 + 100 * 784))
    streamed = stream.StreamedImages(data.images, torch.arange(len(data)), None, "cpu", data.file._replace(path=str(copy)))
    assert streamed.take(torch.tensor([99])).shape == (1, 784)
    with pytest.raises(DataError, match="ended early"):
        streamed.take(torch.tensor([0, 100]))


def test_streaming_keeps_the_process_small(tmp_path):
    """Reading every row of a file larger than the growth allowed leaves resident memory where it was."""
    from image_logreg.datasets.base import FileRegion

    n, size = 40_000, 32 * 32 * 3  # 123 MB of rows
    path = tmp_path / "rows.bin"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(b"HEAD")
        for _ in range(n // 5_000):
            f.write(rng.integers(0, 256, (5_000, size), dtype=np.uint8).tobytes())
    images = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=4, shape=(n, 3, 32, 32)))
    streamed = stream.StreamedImages(images, torch.arange(n), None, "cpu", FileRegion(str(path), 4))

    def resident_mb():
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024

    before = resident_mb()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    check = 0.0
    for i in range(0, n, 256):
        check += float(streamed.take(order[i : i + 256])[:, 0].sum())
    assert resident_mb() - before < 40, f"grew {resident_mb() - before:.0f} MB reading {n * size >> 20} MB of rows"
    assert check == pytest.approx(float(images[:, 0, 0, 0].double().sum()) / 255, rel=1e-6)


def test_a_split_of_millions_is_written_a_block_at_a_time(tmp_path, monkeypatch):
    """Index tensors in a JSON file read back as the lists they hold, with the other values as before."""
    from image_logreg import files

    monkeypatch.setattr(files, "ARRAY_BLOCK", 7)
    indices = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    data = {"n": 50, "nested": {"a": [1, 2]}, "train_indices": indices, "val_indices": torch.tensor([], dtype=torch.long),
            "more": np.arange(3)}
    files.write_json(tmp_path / "split.json", data)
    back = json.loads((tmp_path / "split.json").read_text())
    assert back == {"n": 50, "nested": {"a": [1, 2]}, "train_indices": indices.tolist(), "val_indices": [], "more": [0, 1, 2]}


def test_a_sweep_streams_each_run(capsys, toy_data, tmp_path):
    from image_logreg.cli import main

    argv = ["sweep", "--data-dir", str(toy_data), "--epochs", "1", "--quiet", "--no-download", "--lr", "0.01,0.1"]
    assert main([*argv, "--out", str(tmp_path / "streamed"), "--max-memory", "1K"]) == 0
    assert main([*argv, "--out", str(tmp_path / "memory")]) == 0
    capsys.readouterr()
    runs = sorted(p.name for p in (tmp_path / "streamed").iterdir() if (p / "config.json").is_file())
    assert len(runs) == 2
    for name in runs:
        assert json.loads((tmp_path / "streamed" / name / "config.json").read_text())["streamed"] is True
        assert json.loads((tmp_path / "memory" / name / "config.json").read_text())["streamed"] is False
        assert_same_weights(tmp_path / "memory" / name, tmp_path / "streamed" / name)


def test_the_default_budget_is_half_of_a_containers_limit(tmp_path, monkeypatch):
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(stream, "CGROUP_LIMITS", (str(limit), str(tmp_path / "v1")))
    machine = stream.memory_available()  # no limit file: the machine's memory
    assert machine > 1 << 30
    limit.write_text("max\n")
    assert stream.memory_available() == machine
    limit.write_text(f"{2 << 30}\n")
    assert stream.memory_available() == min(machine, 2 << 30) and stream.default_max_memory() == min(machine, 2 << 30) // 2
    limit.unlink()
    (tmp_path / "v1").write_text(f"{1 << 30}\n")  # cgroup v1's file, when v2's is missing
    assert stream.memory_available() == 1 << 30
