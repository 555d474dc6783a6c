"""Fixtures: tiny IDX datasets in torchvision's layout, and the real datasets beside the repo."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FAST = ["--epochs", "3", "--quiet", "--no-download"]  # train flags for the toy datasets


def run_cli(capsys, *argv):
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    from image_logreg.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, data_dir, out, *extra) -> dict:
    """``image-logreg train --json`` on a toy dataset; the parsed summary."""
    import json

    code, stdout, err = run_cli(capsys, "train", "--data-dir", data_dir, "--out", out, *FAST, "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as an IDX file: magic 0x08 0x0N, then big-endian dims, then bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())
    return path


def class_pattern(label: int, size: int = 28) -> np.ndarray:
    """A distinct bright block per class, so a linear model can learn the toy data quickly."""
    img = np.zeros((size, size), dtype=np.float32)
    row, col = divmod(label, 4)
    img[3 + 7 * row : 3 + 7 * row + 6, 2 + 6 * col : 2 + 6 * col + 5] = 1.0
    return img


def toy_images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` noisy toy digits (uint8 N x 28 x 28) of random classes, as a client would send them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.stack([class_pattern(int(k)) for k in labels]) * 200 + rng.uniform(0, 40, (n, 28, 28))
    return images.astype(np.uint8)


def make_toy_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = np.stack([class_pattern(int(k)) for k in labels])
    images = images * rng.uniform(0.6, 1.0, size=(n, 1, 1)) + rng.uniform(0, 0.35, size=images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels.astype(np.uint8)


def write_toy_dataset(root: Path, folder: str = "MNIST", n_train: int = 600, n_test: int = 200) -> Path:
    raw = root / folder / "raw"
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = make_toy_split(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def toy_data(tmp_path) -> Path:
    """A data dir holding a small, learnable MNIST and Fashion-MNIST in torchvision's layout."""
    root = tmp_path / "data"
    write_toy_dataset(root, "MNIST")
    write_toy_dataset(root, "FashionMNIST")
    return root


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The full datasets; in CI they are always there, so their absence is a failure."""
    if not (REAL_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real datasets not found at {REAL_DATA}")
        pytest.skip(f"real datasets not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def mnist_run(real_data, tmp_path_factory) -> Path:
    """A run directory trained with the defaults on the real MNIST (about a second), shared by all tests."""
    from image_logreg.cli import main

    out = tmp_path_factory.mktemp("runs") / "mnist"
    assert main(["train", "--data-dir", str(real_data), "--out", str(out), "--quiet"]) == 0
    return out
