"""Training on the user's own images end to end: train, evaluate, predict, report, sweep, through the CLI.

Folders (2 classes and 100, gray and colour), a CSV, a held-out test split that evaluate finds
again, colour prediction on files of other sizes, skipped files, bad flag combinations; the
MNIST-folder parity on a subset of the real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, write_idx
from image_logreg.checkpoint import load_model
from image_logreg.data import DATASET_DECODE
from image_logreg.errors import CheckpointError
from image_logreg.predict import predict_file
from image_logreg.datasets import decode as images

QUIET = ["--quiet", "--no-download"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test its own image cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("IMAGE_LOGREG_DATA", raising=False)
    yield


def pattern(label: int, color: bool, size: int = 8, seed: int = 0) -> np.ndarray:
    """A class's own fixed random pattern plus a little noise: learnable by a linear model."""
    base = np.random.default_rng(1000 + label).integers(0, 256, (size, size, 3) if color else (size, size))
    noise = np.random.default_rng(seed).integers(-12, 13, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_folder(root: Path, classes: int, per_class: int, color: bool, size: int = 8) -> Path:
    for label in range(classes):
        for k in range(per_class):
            path = root / f"class{label:03d}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pattern(label, color, size, seed=label * 100 + k)).save(path)
    return root


def cli_ok(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    return out, err


def cli_json(capsys, *argv):
    return json.loads(cli_ok(capsys, *argv, "--json")[0])


def one_line_error(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("image-logreg: error: ") and err.count("\n") == 1, err
    return err


def train_folder(capsys, data, run, *extra, dataset="folder"):
    return cli_json(capsys, "train", "--dataset", dataset, "--data-dir", data, "--out", run, *QUIET, *extra)


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("color", [False, True], ids=["gray", "rgb"])
def test_two_classes_three_images_end_to_end(tmp_path, capsys, color):
    data = make_folder(tmp_path / "pets", classes=2, per_class=3, color=color)
    run = tmp_path / "run"
    summary = train_folder(capsys, data, run, "--epochs", "20")
    assert summary["epochs"] == 20

    meta = load_model(run)[1]
    shape = [3, 8, 8] if color else [8, 8]
    assert meta["dataset"] == "folder" and meta["classes"] == ["class000", "class001"] and meta["input_shape"] == shape
    files = meta["preprocessing"]["image_files"]
    assert files == dict(files, name=DATASET_DECODE, image_size=[8, 8], resize="fit", color="rgb" if color else "gray")

    source = json.loads((run / "source.json").read_text())
    assert len(source["test_files"]) == 2 and len(source["train_files"]) == 4  # one of each class's three held out
    result = cli_json(capsys, "evaluate", run)
    assert result["n"] == 2 and result["dataset"] == "folder"

    user = tmp_path / "user.png"
    Image.fromarray(pattern(1, color, size=24, seed=7)).save(user)
    (prediction,) = cli_json(capsys, "predict", run, user)
    assert prediction["label"] in meta["classes"]
    (sample,) = cli_json(capsys, "predict", run, "--index", "1")
    assert sample["true_label"] == "class001"

    report = cli_json(capsys, "report", run)
    assert Path(report["report"]).is_file() and (run / "report-weights.png").is_file()


@pytest.mark.parametrize("color", [False, True], ids=["gray", "rgb"])
def test_a_hundred_classes_end_to_end(tmp_path, capsys, color):
    data = make_folder(tmp_path / "many", classes=100, per_class=4, color=color)
    run = tmp_path / "run"
    train_folder(capsys, data, run, "--epochs", "30", "--val-fraction", "0.25")
    meta = load_model(run)[1]
    assert meta["num_classes"] == 100

    result = cli_json(capsys, "evaluate", run)
    assert result["n"] == 100  # round(0.2 * 4) = 1 per class
    assert result["accuracy"] > 0.5  # each class its own pattern: far above chance (0.01)
    out, _ = cli_ok(capsys, "evaluate", run)
    assert "too wide to print" in out  # a 100 x 100 matrix is left to --json and the report

    user = tmp_path / "user.png"
    Image.fromarray(pattern(42, color, size=8, seed=99)).save(user)
    (prediction,) = cli_json(capsys, "predict", run, user, "--top-k", "5")
    assert len(prediction["top_k"]) == 5

    report = cli_json(capsys, "report", run)
    assert report["test_accuracy"] == pytest.approx(result["accuracy"])


def test_csv_dataset_end_to_end(tmp_path, capsys):
    root = tmp_path / "shipped"
    rows = ["path,label"]
    for label, name in enumerate(["cat", "dog", "eel"]):
        for k in range(5):
            relative = f"img/{name}-{k}.png"
            (root / "img").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pattern(label, True, seed=k)).save(root / relative)
            rows.append(f"{relative},{name}")
    csv_file = root / "labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")

    run = tmp_path / "run"
    train_folder(capsys, csv_file, run, "--epochs", "20", dataset="csv")
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "csv" and config["data_dir"] == str(csv_file.resolve())
    result = cli_json(capsys, "evaluate", run)
    assert result["n"] == 3 and result["accuracy"] == 1.0  # one of each class's five held out
    (prediction,) = cli_json(capsys, "predict", run, root / "img" / "dog-0.png")
    assert prediction["label"] == "dog"
    assert Path(cli_json(capsys, "report", run)["report"]).is_file()


def test_held_out_split_is_the_same_test_images_later(tmp_path, capsys):
    data = make_folder(tmp_path / "photos", classes=3, per_class=10, color=True)
    run = tmp_path / "run"
    train_folder(capsys, data, run, "--test-fraction", "0.3", "--seed", "3")
    source = json.loads((run / "source.json").read_text())
    train_files, test_files = source["train_files"], source["test_files"]
    assert len(test_files) == 9 and len(train_files) == 21  # 3 of each class's 10
    assert not set(test_files) & set(train_files)
    assert source["test_fraction"] == 0.3 and source["seed"] == 3
    split = json.loads((run / "split.json").read_text())
    assert split["n"] == 21 and {"train_indices", "val_indices", "seed", "val_fraction"} <= set(split)

    first = cli_json(capsys, "evaluate", run)
    assert first["n"] == 9
    shown, _ = cli_ok(capsys, "evaluate", run, "--json")
    assert len(shown.splitlines()) < 40  # each list of numbers on one line
    matrix = cli_ok(capsys, "evaluate", run)[0].split("confusion matrix")[1].splitlines()
    assert [line.split()[:2] for line in matrix[2:5]] == [["0", "class000"], ["1", "class001"], ["2", "class002"]]
    # Files added since training reshuffle a fresh held-out split; evaluate keeps the run's own.
    for k in range(10, 16):
        Image.fromarray(pattern(0, True, seed=500 + k)).save(data / "class000" / f"{k}.png")
    again = cli_json(capsys, "evaluate", run)
    assert again["n"] == 9 and again["accuracy"] == first["accuracy"] and again["confusion"] == first["confusion"]
    assert cli_json(capsys, "evaluate", run, "--split", "val")["n"] == len(split["val_indices"])

    # and a test image gone is said plainly
    (data / test_files[0]).unlink()
    err = one_line_error(capsys, "evaluate", run)
    assert "no longer usable" in err and test_files[0] in err


def test_folder_with_train_and_test_subfolders(tmp_path, capsys):
    for split, count in (("train", 4), ("test", 2)):
        make_folder(tmp_path / "data" / split, classes=2, per_class=count, color=False)
    run = tmp_path / "run"
    train_folder(capsys, tmp_path / "data", run, "--val-fraction", "0")
    assert json.loads((run / "source.json").read_text())["layout"] == "splits"
    assert cli_json(capsys, "evaluate", run)["n"] == 4


def test_colour_predict_resizes_a_file_as_recorded(tmp_path, capsys):
    data = make_folder(tmp_path / "colour", classes=2, per_class=3, color=True, size=12)
    run = tmp_path / "run"
    train_folder(capsys, data, run, "--image-size", "6x10", "--resize", "stretch")
    model, meta = load_model(run)
    assert meta["input_shape"] == [3, 6, 10] and meta["preprocessing"]["image_files"]["resize"] == "stretch"
    assert json.loads((run / "config.json").read_text())["image_size"] == [6, 10]

    photo = np.zeros((30, 44, 3), dtype=np.uint8)
    photo[:, :22] = (250, 20, 20)
    photo[:, 22:] = (20, 20, 250)
    user = tmp_path / "photo.jpg"
    Image.fromarray(photo).save(user, quality=95)
    seen = tmp_path / "seen"
    (prediction,) = cli_json(capsys, "predict", run, user, "--save-preprocessed", seen)
    saved = np.asarray(Image.open(prediction["preprocessed"]))
    expected = images.read_image(user, images.DecodeSettings((6, 10), "stretch", "rgb"))
    assert saved.shape == (6, 10, 3) and np.array_equal(saved, expected.transpose(1, 2, 0))
    assert saved[:, 0, 0] .min() > 200 and saved[:, -1, 2].min() > 200  # stretched: red left, blue right, no padding

    # the HTTP server's path: the same file as uploaded bytes decodes and predicts alike
    by_path, image = predict_file(model, meta, user)
    by_bytes, uploaded = predict_file(model, meta, user.read_bytes(), name="photo.jpg")
    assert np.array_equal(image, uploaded) and by_bytes["top_k"] == by_path["top_k"] and by_bytes["source"] == "photo.jpg"


def test_digit_models_still_normalise_files(toy_data, tmp_path, capsys):
    run = tmp_path / "mnist"
    cli_ok(capsys, "train", "--data-dir", toy_data, "--out", run, "--epochs", "1", *QUIET)
    meta = load_model(run)[1]
    assert meta["preprocessing"]["image_files"]["name"] == "mnist-normalize"
    config = json.loads((run / "config.json").read_text())
    assert not (run / "source.json").exists() and config["image_size"] is None


def test_skipped_files_are_listed_in_the_run(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=2, per_class=3, color=False)
    whole = (data / "class000" / "0.png").read_bytes()
    (data / "class000" / "broken.png").write_bytes(whole[: len(whole) // 2])  # cut off halfway: a truncated PNG
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--dataset", "folder", "--data-dir", data, "--out", run, *QUIET)
    assert code == 0, err
    assert "warning: skipped class000/broken.png:" in err
    skipped = json.loads((run / "skipped.json").read_text())
    assert [s["path"] for s in skipped] == ["class000/broken.png"] and "corrupt" in skipped[0]["reason"]
    assert json.loads((run / "source.json").read_text())["skipped"] == 1
    assert cli_json(capsys, "evaluate", run)["n"] == 2


def test_a_sweep_and_the_runs_list_on_a_folder(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=2, per_class=5, color=True)
    result = cli_json(capsys, "sweep", "--dataset", "folder", "--data-dir", data, "--out", tmp_path / "sweep",
                      "--lr", "0.01,0.1", "--image-size", "8", *QUIET, "--epochs", "2")
    assert result["trained"] == 2 and result["best"]["n_test"] == 2
    again = cli_json(capsys, "sweep", "--dataset", "folder", "--data-dir", data, "--out", tmp_path / "sweep",
                     "--lr", "0.01,0.1", "--image-size", "8x8", *QUIET, "--epochs", "2")
    assert again["skipped"] == 2  # 8 and 8x8 are the same size
    runs = cli_json(capsys, "runs", tmp_path / "sweep")
    assert [r["dataset"] for r in runs] == ["folder", "folder"]


def test_show_draws_colour_samples(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=2, per_class=3, color=True)
    out = tmp_path / "grid.png"
    cli_ok(capsys, "show", "--dataset", "folder", "--data-dir", data, "--out", out, "--split", "test", "--no-download")
    assert Image.open(out).size[0] > 50


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--image-size", "8x8"], "--image-size applies to --dataset folder and csv only, not mnist"),
        (["--dataset", "kmnist", "--test-fraction", "0.1"], "--test-fraction applies to --dataset folder and csv only"),
        (["--dataset", "cifar10", "--resize", "crop"], "--resize applies to --dataset folder and csv only"),
        (["--dataset", "cifar10", "--deskew"], "--deskew works on grayscale images only; cifar10 is colour"),
        (["--dataset", "folder", "--color", "rgb", "--deskew"], "--deskew works on grayscale images only"),
        (["--dataset", "folder", "--image-size", "8y8"], "--image-size must be HxW"),
        (["--dataset", "folder", "--test-fraction", "1"], "--test-fraction must be at least 0 and below 1"),
    ],
)
def test_bad_flag_combinations_are_one_line_errors(tmp_path, capsys, argv, says):
    data = make_folder(tmp_path / "data", classes=2, per_class=3, color=False)
    err = one_line_error(capsys, "train", "--data-dir", data, "--out", tmp_path / "run", *QUIET, *argv)
    assert says in err
    assert not (tmp_path / "run").exists()


def test_deskew_on_a_folder_that_turns_out_colour(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=2, per_class=3, color=True)
    err = one_line_error(capsys, "train", "--dataset", "folder", "--data-dir", data, "--out", tmp_path / "run", "--deskew", *QUIET)
    assert "--deskew works on grayscale images only" in err


def test_a_state_dict_cannot_claim_a_folder(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save({"linear.weight": torch.zeros(10, 784), "linear.bias": torch.zeros(10)}, path)
    err = one_line_error(capsys, "evaluate", path, "--dataset", "folder")
    assert "records no class names" in err


def test_checkpoint_decode_record_must_fit_the_input_shape(tmp_path, capsys):
    from image_logreg.checkpoint import save_model
    from image_logreg.data import preprocessing_for
    from image_logreg.model import LogisticRegression

    model = LogisticRegression((3, 8, 8), 2)
    good = preprocessing_for(decode={"image_size": [8, 8], "resize": "fit", "color": "rgb"})
    save_model(tmp_path / "good.safetensors", model, {"dataset": "folder", "classes": ["a", "b"], "preprocessing": good})
    assert load_model(tmp_path / "good.safetensors")[1]["input_shape"] == [3, 8, 8]
    bad = preprocessing_for(decode={"image_size": [8, 8], "resize": "fit", "color": "gray"})
    save_model(tmp_path / "bad.safetensors", model, {"dataset": "folder", "classes": ["a", "b"], "preprocessing": bad})
    with pytest.raises(CheckpointError, match="image_files make 8x8 images, but input_shape is 3x8x8"):
        load_model(tmp_path / "bad.safetensors")


# --- parity with the IDX reader, on the real MNIST ---------------------------------------


@pytest.mark.integration
def test_mnist_as_a_png_folder_matches_mnist_as_idx(real_data, tmp_path, capsys, monkeypatch):
    """The same 6,000 + 1,000 MNIST images as IDX files and as a PNG folder train to the same test accuracy.

    The folder lists its images class by class, so the IDX files are written in that order
    too: with the same settings and seed, the validation split and the batches then hold the
    same images, and any difference would be the folder pipeline's own.
    """
    import importlib

    from image_logreg.datasets import load_split

    # imported by name, so its worker processes find the function they are sent
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    export = importlib.import_module("export_folder")
    limits = {"train": 6000, "test": 1000}
    pngs = tmp_path / "mnist-png"
    assert export.main([str(pngs), "--data-dir", str(real_data), "--limit", "6000", "--workers", "2"]) == 0
    for path in (pngs / "test").rglob("*.png"):  # --limit cuts both splits alike: the test split to 1,000 here
        if int(path.stem) >= limits["test"]:
            path.unlink()
    idx = tmp_path / "idx"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_split("mnist", real_data, split, download=False)
        labels = data.labels[: limits[split]].numpy()
        order = np.argsort(labels, kind="stable")  # class by class, by index within a class: the folder's order
        write_idx(idx / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", data.images[: limits[split]].numpy()[order])
        write_idx(idx / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", labels[order])

    cli_ok(capsys, "train", "--dataset", "mnist", "--data-dir", idx, "--out", tmp_path / "idx-run", *QUIET)
    cli_ok(capsys, "train", "--dataset", "folder", "--data-dir", pngs, "--out", tmp_path / "png-run", *QUIET)
    by_idx = cli_json(capsys, "evaluate", tmp_path / "idx-run")
    by_png = cli_json(capsys, "evaluate", tmp_path / "png-run")
    assert by_idx["n"] == by_png["n"] == 1000
    with capsys.disabled():
        print(f"\nMNIST 6,000 + 1,000, test accuracy: IDX {by_idx['accuracy']:.4f}, PNG folder {by_png['accuracy']:.4f}")
    assert abs(by_idx["accuracy"] - by_png["accuracy"]) <= 0.002


# --- real data no one here made: scikit-learn's digits ---------------------------------------


def export_digits(root: Path):
    """scikit-learn's 1,797 8x8 digits (values 0..16) as a PNG folder, one subfolder per digit, 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for number, (image, label) in enumerate(zip(digits.images, digits.target)):
        path = root / str(label) / f"{number:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8)).save(path)
    return digits


def test_sklearn_digits_defaults_reach_sklearn_logistic_regression(tmp_path, capsys):
    """Over five seeded splits (one split of 359 test images moves by 0.3% per image), the defaults
    score at least scikit-learn's LogisticRegression(max_iter=1000) on the same splits, and are
    never far behind on any one of them."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    digits = export_digits(tmp_path / "digits")
    number = lambda files: [int(Path(f).stem) for f in files]  # noqa: E731
    ours, theirs = [], []
    for seed in range(5):
        run = tmp_path / f"run-{seed}"
        summary = train_folder(capsys, tmp_path / "digits", run, "--seed", str(seed))  # otherwise the defaults
        # 9 steps per epoch: as many epochs as make MNIST's 1,125 steps, unless the patience rule stops it first
        assert json.loads((run / "config.json").read_text())["epochs"] == 125 and summary["epochs"] <= 125
        ours.append(cli_json(capsys, "evaluate", run)["accuracy"])
        source = json.loads((run / "source.json").read_text())
        train, test = number(source["train_files"]), number(source["test_files"])
        assert len(test) == 359 and not set(train) & set(test)
        reference = LogisticRegression(max_iter=1000).fit(digits.data[train], digits.target[train])
        theirs.append(reference.score(digits.data[test], digits.target[test]))
    with capsys.disabled():
        print(f"\nsklearn digits, test accuracy over 5 splits of 359 images: image-logreg defaults "
              f"{' '.join(f'{a:.4f}' for a in ours)} (mean {np.mean(ours):.4f}), LogisticRegression(max_iter=1000) "
              f"{' '.join(f'{a:.4f}' for a in theirs)} (mean {np.mean(theirs):.4f})")
    assert np.mean(ours) >= np.mean(theirs)
    assert min(a - b for a, b in zip(ours, theirs)) > -0.02  # within 7 images on every split


def test_an_imbalanced_folder_says_each_class_recall_and_records_the_class_weight(tmp_path, capsys):
    data = make_folder(tmp_path / "few", classes=3, per_class=12, color=False)
    make_folder(tmp_path / "many", classes=1, per_class=60, color=False)
    for k, path in enumerate(sorted((tmp_path / "many" / "class000").iterdir())):
        path.rename(data / "class000" / f"extra{k}.png")  # class000: 72 images, the others 12
    run = tmp_path / "run"
    out, err = cli_ok(capsys, "train", "--dataset", "folder", "--data-dir", data, "--out", run, "--no-download",
                      "--class-weight", "balanced", "--epochs", "20", "--patience", "3")
    line = next(line for line in err.splitlines() if line.startswith("imbalanced classes"))
    assert "weighed equally): validation recall" in line and all(f"class00{k}" in line for k in range(3)), line
    config = json.loads((run / "config.json").read_text())
    assert config["class_weight"] == "balanced" and config["patience"] == 3 and config["keep_best"] is True
    assert config["epochs"] == 20 and 1 <= config["kept_epoch"] <= config["epochs_trained"] <= 20
    assert load_model(run)[1]["kept_epoch"] == config["kept_epoch"]


def test_no_keep_best_trains_every_epoch_and_keeps_the_last(tmp_path, capsys):
    data = make_folder(tmp_path / "pets", classes=2, per_class=6, color=False)
    summary = train_folder(capsys, data, tmp_path / "run", "--epochs", "15", "--no-keep-best")
    assert summary["epochs"] == 15 and "kept_epoch" not in summary
    assert json.loads((tmp_path / "run" / "config.json").read_text())["keep_best"] is False
