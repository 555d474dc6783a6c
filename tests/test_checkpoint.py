import json

import pytest
import torch

from image_logreg import LogisticRegression, load_model, save_model
from image_logreg.checkpoint import FORMAT
from image_logreg.errors import CheckpointError

META = {"dataset": "mnist", "classes": [str(i) for i in range(10)], "preprocessing": {"scale": "x / 255"}}


def trained_like_model(seed=0):
    torch.manual_seed(seed)
    model = LogisticRegression()
    with torch.no_grad():
        model.linear.weight.normal_()
    return model


def test_round_trip_gives_identical_predictions(tmp_path):
    model = trained_like_model()
    path = save_model(tmp_path / "m.safetensors", model, dict(META, metrics={"val_accuracy": 0.5}))
    loaded, meta = load_model(path)
    x = torch.rand(64, 28, 28)
    assert torch.equal(model.predict_proba(x), loaded.predict_proba(x))
    assert meta["dataset"] == "mnist" and meta["metrics"]["val_accuracy"] == 0.5
    assert meta["input_shape"] == [28, 28] and meta["num_classes"] == 10
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary behind


def test_metadata_is_readable_without_image_logreg(tmp_path):
    from safetensors import safe_open

    path = save_model(tmp_path / "m.safetensors", trained_like_model(), META)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == FORMAT
    assert json.loads(header["image_logreg"])["classes"] == META["classes"]


def test_run_directory_resolves_to_its_checkpoint(tmp_path):
    save_model(tmp_path / "model.safetensors", trained_like_model(), META)
    model, _ = load_model(tmp_path)
    assert isinstance(model, LogisticRegression)


def test_tutorial_state_dict_loads_with_weights_only(tmp_path):
    model = trained_like_model()
    torch.save(model.state_dict(), tmp_path / "mnist-logistic.pth")
    loaded, meta = load_model(tmp_path / "mnist-logistic.pth")
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert meta["source"] == "state_dict" and meta["classes"][0] == "0 - zero"
    _, meta = load_model(tmp_path / "mnist-logistic.pth", dataset="fashion-mnist")
    assert meta["classes"][0] == "T-shirt/top"


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"linear.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused.*print.*could run code"):
        load_model(tmp_path / "evil.pth")


def test_wrong_shape_is_explained(tmp_path):
    torch.save(LogisticRegression((28, 28), 5).state_dict(), tmp_path / "five.pth")
    with pytest.raises(CheckpointError, match=r"linear.weight has shape \[5, 784\].*needs \[10, 784\]"):
        load_model(tmp_path / "five.pth")


def test_wrong_keys_are_explained(tmp_path):
    torch.save({"fc.weight": torch.zeros(10, 784)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="expected tensors linear.weight, linear.bias, found fc.weight"):
        load_model(tmp_path / "other.pth")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_garbage_files_are_refused(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_model(path)


def test_truncated_safetensors_is_refused(tmp_path):
    path = save_model(tmp_path / "m.safetensors", trained_like_model(), META)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        load_model(path)


def test_dataset_mismatch_is_refused(tmp_path):
    path = save_model(tmp_path / "m.safetensors", trained_like_model(), META)
    with pytest.raises(CheckpointError, match="trained on mnist, not fashion-mnist"):
        load_model(path, dataset="fashion-mnist")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nope")


def _lying_checkpoint(path, **fields):
    """A checkpoint whose metadata claims ``fields``, over weights that fit a 28x28 digit model."""
    from safetensors.torch import save_file

    meta = {**META, "input_shape": [28, 28], "num_classes": 10, **fields}
    tensors = {"linear.weight": torch.zeros(10, 784), "linear.bias": torch.zeros(10)}
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": "1", "image_logreg": json.dumps(meta)})
    return path


@pytest.mark.parametrize(("fields", "named"), [
    ({"preprocessing": {"image_files": ["mnist-normalize"]}}, "preprocessing.image_files"),
    ({"input_shape": [784]}, "input_shape"),
])
def test_lying_metadata_is_refused_by_predict_and_serve(tmp_path, capsys, fields, named):
    from image_logreg.cli import main
    from image_logreg.serve.registry import load_models

    path = _lying_checkpoint(tmp_path / "lying.safetensors", **fields)
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.new("L", (28, 28), 0).save(image)
    assert main(["predict", str(path), str(image)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and f"field {named} " in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match=f"field {named} "):
        load_models([f"m={path}"])


def test_a_folder_that_is_not_a_run_is_named_as_such(tmp_path):
    from image_logreg.checkpoint import resolve_checkpoint
    from image_logreg.errors import CheckpointError

    (tmp_path / "runs" / "mnist-1").mkdir(parents=True)
    (tmp_path / "runs" / "mnist-1" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="a folder, but not a run directory .*runs such as mnist-1"):
        resolve_checkpoint(tmp_path / "runs")
    with pytest.raises(CheckpointError, match="no such checkpoint file or run directory"):
        resolve_checkpoint(tmp_path / "nothing")
