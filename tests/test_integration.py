"""The accuracy figures on the real datasets (../shared/data): these are the product's promises."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from image_logreg.cli import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def tutorial_module():
    """The tutorial's own pipeline, as the speed benchmark reproduces it."""
    spec = importlib.util.spec_from_file_location("epoch_speed", ROOT / "benchmarks" / "epoch_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_json(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)



def test_tutorial_settings_pass_80_percent_in_5_epochs(capsys, real_data, tmp_path):
    summary = cli_json(
        capsys, "train", "--data-dir", real_data, "--out", tmp_path / "tutorial", "--optimizer", "sgd",
        "--lr", "0.001", "--batch-size", "100", "--schedule", "constant", "--epochs", "5", "--quiet", "--json",
    )
    assert summary["epochs"] == 5 and summary["val_accuracy"] > 0.80


def test_defaults_reach_925_on_mnist_test(capsys, mnist_run):
    config = json.loads((mnist_run / "config.json").read_text())
    assert config["epochs"] <= 10
    result = cli_json(capsys, "evaluate", mnist_run, "--json")
    assert result["n"] == 10000 and result["accuracy"] >= 0.925


def test_defaults_reach_84_on_fashion_mnist_test(capsys, real_data, tmp_path):
    out = tmp_path / "fashion"
    cli_json(capsys, "train", "--dataset", "fashion-mnist", "--data-dir", real_data, "--out", out, "--quiet", "--json")
    result = cli_json(capsys, "evaluate", out, "--json")
    assert result["dataset"] == "fashion-mnist" and result["accuracy"] >= 0.84


def test_saved_model_reloads_to_identical_predictions(mnist_run, real_data):
    from image_logreg import load_model, load_split, to_float

    test = load_split("mnist", real_data, "test", download=False)
    a, _ = load_model(mnist_run)
    b, _ = load_model(mnist_run / "model.safetensors")
    x = to_float(test.images)
    assert torch.equal(a.predict_proba(x), b.predict_proba(x))


def test_tutorial_state_dict_scores_what_the_tutorial_computes(capsys, mnist_run, real_data, tmp_path):
    """Save as the tutorial does, evaluate with the tutorial's code and with ours: same accuracy."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import MNIST
    from torchvision.transforms import ToTensor

    from image_logreg import load_model

    tutorial = tutorial_module()
    ours, _ = load_model(mnist_run)
    model = tutorial.MnistModel()
    model.load_state_dict(ours.state_dict())
    torch.save(model.state_dict(), tmp_path / "mnist-logistic.pth")

    test_loader = DataLoader(MNIST(root=str(real_data), train=False, transform=ToTensor()), batch_size=200)
    loss, _, acc = tutorial.evaluate(model, torch.nn.functional.cross_entropy, test_loader, metric=tutorial.accuracy)
    result = cli_json(capsys, "evaluate", tmp_path / "mnist-logistic.pth", "--data-dir", real_data, "--json")
    assert result["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert result["loss"] == pytest.approx(loss, rel=1e-4)


def test_predict_index_matches_the_label_for_a_clear_digit(capsys, mnist_run, real_data):
    (pred,) = cli_json(capsys, "predict", mnist_run, "--index", "0", "--json", "--data-dir", real_data)
    assert pred["label"] == pred["true_label"] == "7 - seven" and pred["top_k"][0]["probability"] > 0.5
