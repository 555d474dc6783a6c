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


def test_rows_are_gathered_and_the_mapping_released_as_it_goes(tmp_path, monkeypatch):
    """The rows asked for, scaled as in memory; the mapped pages released every RELEASE_BYTES read."""
    from image_logreg.data import load_split, mapping_of, prepare_inputs
    from conftest import write_toy_dataset

    data = load_split("mnist", write_toy_dataset(tmp_path / "data"), "train", download=False)
    assert data.mapping is not None  # IDX images are memory-mapped, not read into memory
    released = []
    monkeypatch.setattr(stream, "RELEASE_BYTES", 10 * 784)
    monkeypatch.setattr(stream, "release", released.append)
    rows = torch.tensor([5, 3, 400, 7])
    streamed = stream.StreamedImages(data.images, rows, None, "cpu", data.mapping)
    expected = prepare_inputs(data.images[rows], None).reshape(4, -1)
    assert torch.equal(streamed.take(torch.tensor([0, 1, 2, 3])), expected)
    assert torch.equal(streamed[1:3], expected[1:3]) and streamed.shape == (4, 784) and len(streamed) == 4
    assert released == []
    for _ in range(3):
        streamed.take(torch.tensor([0, 1, 2, 3]))
    assert released == [data.mapping]
    assert mapping_of(np.zeros(3)) is None
