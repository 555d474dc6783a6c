"""Learning after training: ``partial_fit``, ``fit(init=...)``, ``train --init`` and ``learn``."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, run_cli, train
from image_logreg import LogisticRegression, TrainConfig, fit, load_model, load_split, split_indices, to_float
from image_logreg.errors import UsageError
from image_logreg.learn import hold_out, learn_run, read_class_folders, replay_fit
from image_logreg.lineage import class_folder, class_order
from image_logreg.preprocess import prepare_image
from image_logreg.settings import LEARN_REPLAY


def toy_split(toy_data):
    data = load_split("mnist", toy_data, "train", download=False)
    train_idx, val_idx = split_indices(len(data), 0.2, seed=0)
    x, y = to_float(data.images), data.labels
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def new_style(label: int, n: int, seed: int) -> np.ndarray:
    """``n`` images of ``label`` in a style the toy data never shows: its block in a spot no class uses
    (the toy classes' blocks fill rows 0-2 of a 3x4 grid but for its last two spots)."""
    rng = np.random.default_rng(seed)
    spot = {3: 2, 7: 3}[label]  # column of the free spots on the third row
    images = np.zeros((n, 28, 28), dtype=np.float32)
    images[:, 17:23, 2 + 6 * spot : 7 + 6 * spot] = rng.uniform(0.7, 1.0, size=(n, 6, 5))  # no two files alike
    return (images * 255).astype(np.uint8)


def write_folder(root, images_by_folder: dict) -> None:
    for folder, images in images_by_folder.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(root / folder / f"{i:03d}.png")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def parent(capsys, toy_data, tmp_path):
    out = tmp_path / "parent"
    train(capsys, toy_data, out)
    return out


@pytest.fixture
def new_images(tmp_path):
    """Twenty images each of two classes in the new style, as the server stores corrections: one class
    folder named as ``class_folder`` names it, one by the class's index."""
    root = tmp_path / "new"
    classes = [f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())]
    write_folder(root, {class_folder(classes, 3): new_style(3, 20, 1), "7": new_style(7, 20, 2)})
    return root


# --- partial_fit and fit(init=...) ---------------------------------------------------------------


def test_partial_fit_learns_from_the_current_weights(toy_data):
    x, y, x_val, y_val = toy_split(toy_data)
    torch.manual_seed(1)  # a start from which the model misreads the new style (from some, it reads it already)
    model = LogisticRegression()
    fit(model, x, y, x_val, y_val, TrainConfig(epochs=3))
    x_new = to_float(torch.from_numpy(new_style(3, 20, 0)))
    y_new = torch.full((20,), 3)
    assert model.score(x_new, y_new) < 0.5
    old_accuracy = model.score(x_val, y_val)
    for _ in range(5):  # one class only: the classes are the model's own
        model.partial_fit(torch.cat([x[:200], x_new]), torch.cat([y[:200], y_new]), steps=20)
    assert model.score(x_new, y_new) == 1.0
    assert model.score(x_val, y_val) > old_accuracy - 0.05


def test_partial_fit_moves_the_weights_at_most_max_change(toy_data):
    x, y, _, _ = toy_split(toy_data)
    model = LogisticRegression()
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    model.partial_fit(x[:100], (y[:100] + 1) % 10, steps=50, lr=0.5, max_change=0.25)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    assert moved.norm().item() == pytest.approx(0.25, rel=1e-4)


@pytest.mark.parametrize("x, y, says", [
    (torch.rand(3, 28, 28), torch.tensor([1, 2]), "as many labels"),
    (torch.rand(2, 28, 28), torch.tensor([1, 10]), "class indices 0..9"),
    (torch.rand(2, 20, 20), torch.tensor([1, 2]), "do not fit"),
])
def test_partial_fit_refuses_bad_input(x, y, says):
    with pytest.raises(UsageError, match=says):
        LogisticRegression().partial_fit(x, y)


def test_fit_starts_from_init_s_weights(toy_data):
    x, y, x_val, y_val = toy_split(toy_data)
    trained = LogisticRegression()
    fit(trained, x, y, x_val, y_val, TrainConfig(epochs=3))
    fresh = LogisticRegression()
    history = fit(fresh, x, y, x_val, y_val, TrainConfig(optimizer="sgd", lr=1e-9, epochs=1), init=trained)
    assert torch.allclose(fresh.linear.weight, trained.linear.weight, atol=1e-6)
    assert history[0]["val_accuracy"] == pytest.approx(trained.score(x_val, y_val))


@pytest.mark.parametrize("other", [LogisticRegression((28, 28), 3), LogisticRegression((32, 32), 10)])
def test_fit_refuses_an_init_of_other_classes_or_inputs(toy_data, other):
    x, y, x_val, y_val = toy_split(toy_data)
    with pytest.raises(UsageError, match="cannot start from a model of"):
        fit(LogisticRegression(), x, y, x_val, y_val, TrainConfig(epochs=1), init=other)


def test_class_order_matches_names_indices_and_leading_digits():
    mnist = [f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())]
    assert class_order(["a", "b", "c"], ["c", "a", "b"]) == [2, 0, 1]
    assert class_order(mnist, [str(i) for i in range(10)]) == list(range(10))
    assert class_order([str(i) for i in range(10)], mnist[::-1]) == list(range(9, -1, -1))
    with pytest.raises(UsageError, match="has 3 classes"):
        class_order(["a", "b", "c"], ["a", "b"])
    with pytest.raises(UsageError, match="'d' is none of the model's"):
        class_order(["a", "b", "c"], ["a", "b", "d"])


# --- train --init ----------------------------------------------------------------------------------


def test_train_init_starts_from_the_run_and_records_it_as_parent(capsys, toy_data, parent, tmp_path):
    child = tmp_path / "child"
    summary = train(capsys, toy_data, child, "--init", parent, "--optimizer", "sgd", "--lr", "1e-9", "--epochs", "1")
    weights = parent / "model.safetensors"
    lineage = {"path": str(weights.resolve()), "sha256": sha256(weights)}
    assert summary["parent"] == lineage
    assert json.loads((child / "config.json").read_text())["parent"] == lineage
    _, meta = load_model(child)
    assert meta["parent"] == lineage
    parent_val = json.loads((parent / "history.json").read_text())[-1]["val_accuracy"]
    assert summary["history"][0]["val_accuracy"] == pytest.approx(parent_val)  # it started where the parent ended


def test_train_init_puts_the_parent_s_classes_in_the_data_s_order(capsys, toy_data, tmp_path):
    """A folder's classes come sorted by name, not in Fashion-MNIST's order: the rows follow the names."""
    parent = tmp_path / "fashion"
    train(capsys, toy_data, parent, "--dataset", "fashion-mnist")
    data = load_split("fashion-mnist", toy_data, "train", download=False)
    # "T-shirt/top" cannot name a folder: class_folder names it by its index, which sorts first
    write_folder(tmp_path / "folder", {class_folder(data.classes, k): data.images[data.labels == k][:30].numpy() for k in range(10)})
    child = tmp_path / "child"
    train(capsys, tmp_path / "folder", child, "--dataset", "folder", "--init", parent, "--optimizer", "sgd", "--lr", "1e-9",
          "--epochs", "1")
    (started, meta), (trained, parent_meta) = load_model(child), load_model(parent)
    assert meta["classes"][:3] == ["0", "Ankle boot", "Bag"] and parent_meta["classes"][1:3] == ["Trouser", "Pullover"]
    for row, name in enumerate(meta["classes"]):
        k = 0 if name == "0" else parent_meta["classes"].index(name)
        assert torch.allclose(started.linear.weight[row], trained.linear.weight[k], atol=1e-6)


def test_train_init_of_other_classes_is_one_line(capsys, toy_data, parent, tmp_path):
    write_folder(tmp_path / "folder", {name: new_style(3, 10, k) for k, name in enumerate(["cat", "dog", "fish"])})
    code, _, err = run_cli(capsys, "train", "--dataset", "folder", "--data-dir", tmp_path / "folder", "--init", parent,
                           "--out", tmp_path / "child", *FAST)
    assert code == 2 and err.count("\n") == 1
    assert f"--init {parent}: the model has 10 classes" in err
    assert not (tmp_path / "child").exists()


# --- the new images --------------------------------------------------------------------------------


def test_train_init_refuses_a_parent_with_other_deskewing(capsys, toy_data, parent, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data-dir", toy_data, "--init", parent, "--deskew",
                           "--out", tmp_path / "child", *FAST)
    assert code == 2 and err.count("\n") == 1
    assert f"--init {parent}: its model was trained without --deskew" in err
    assert not (tmp_path / "child").exists()


def test_hold_out_takes_a_share_of_each_class_rounded_down():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 5)
    held = hold_out(labels, 0.2, seed=0)
    assert [int(held[labels == k].sum()) for k in range(3)] == [2, 0, 1]
    assert torch.equal(held, hold_out(labels, 0.2, seed=0))
    assert not torch.equal(held, hold_out(labels, 0.2, seed=1))


def test_class_folders_are_read_by_name_or_index_and_bad_files_counted(new_images):
    (new_images / "7" / "broken.png").write_bytes(b"not an image")
    (new_images / "loose.png").write_bytes(b"not in a class folder")
    (new_images / ".uploads" / "7").mkdir(parents=True)  # the server's hidden originals
    (new_images / ".uploads" / "7" / "x.png").write_bytes(b"ignored")
    classes = [f"{i} - {w}" for i, w in enumerate("zero one two three four five six seven eight nine".split())]
    found = read_class_folders(new_images, classes, lambda data, name: prepare_image(data, name=name))
    assert torch.bincount(found.labels, minlength=10).tolist() == [0, 0, 0, 20, 0, 0, 0, 20, 0, 0]
    assert len(found.files) == len(found.digests) == len(found.images) == 40
    skipped = dict(found.skipped)
    assert skipped[str(new_images / "loose.png")] == "not in a class folder"
    assert "not an image" in skipped[str(new_images / "7" / "broken.png")] and len(skipped) == 2


def test_a_folder_naming_no_class_is_one_line(capsys, parent, new_images, tmp_path):
    (new_images / "banana").mkdir()
    code, _, err = run_cli(capsys, "learn", parent, new_images, "--out", tmp_path / "learnt")
    assert code == 2 and err.count("\n") == 1
    assert "banana: the folder names none of the model's classes" in err
    code, _, err = run_cli(capsys, "learn", parent, new_images / "7", "--out", tmp_path / "learnt")
    assert code == 2 and "holds no class folders" in err
    assert not (tmp_path / "learnt").exists()


# --- learning --------------------------------------------------------------------------------------


def test_replay_fit_learns_the_new_images_and_keeps_the_old_predictions(toy_data):
    x, y, x_val, y_val = toy_split(toy_data)
    model = LogisticRegression()
    fit(model, x, y, x_val, y_val, TrainConfig(epochs=3))
    before = model.predict(x_val)
    x_new, y_new = to_float(torch.from_numpy(new_style(3, 16, 0))), torch.full((16,), 3)
    records = replay_fit(model, x_new, y_new, x[:300])
    assert model.score(x_new, y_new) == 1.0
    assert (model.predict(x_val) == before).double().mean().item() > 0.97
    assert records[-1]["objective"] < records[0]["objective"] and records[-1]["iterations"] <= 50
    with pytest.raises(UsageError, match="--replay must be a share"):
        replay_fit(model, x_new, y_new, x[:300], replay=1.0)


def test_replay_objective_gradient_equals_autograd():
    """The closed-form gradient of the distilled replay and the new images' cross-entropy."""
    import torch.nn.functional as F

    from image_logreg.learn import _Rows

    torch.manual_seed(0)
    model = LogisticRegression((4, 4), 3)
    x = torch.rand(12, 16)
    y_new = torch.tensor([0, 2, 2, 1])
    rows = _Rows(model, x, 8, y_new, replay=0.7, temperature=4.0)
    with torch.no_grad():
        model.linear.weight.add_(torch.randn(3, 16))  # away from the start, where the replay's gradient is zero
    loss = rows.objective(model, x)
    grads = [model.linear.weight.grad.clone(), model.linear.bias.grad.clone()]
    model.zero_grad()
    q = rows.targets[:8]  # the starting model's probabilities at temperature 4
    logits = model(x)
    replayed = -(q * F.log_softmax(logits[:8] / 4, 1)).sum(1).mean() * 16
    learnt = F.cross_entropy(logits[8:], y_new)
    expected = 0.7 * replayed + 0.3 * learnt
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grads[0], model.linear.weight.grad, atol=1e-6)
    assert torch.allclose(grads[1], model.linear.bias.grad, atol=1e-6)


def test_learn_writes_a_run_with_its_lineage_that_the_other_commands_use(capsys, parent, new_images, tmp_path):
    weights = parent / "model.safetensors"
    parent_hash = sha256(weights)
    out = tmp_path / "learnt"
    code, stdout, err = run_cli(capsys, "learn", parent, new_images, "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    before, after = summary["before"], summary["after"]
    assert summary["images"] == {"found": 40, "skipped": 0, "already_learnt": 0, "duplicates": 0, "new": 40, "learnt": 32,
                                 "held_out": 8, "learnt_before": 0}
    assert before["new_held_out"]["accuracy"] <= 0.5 and after["new_held_out"]["accuracy"] == 1.0
    assert after["parent_test"]["accuracy"] >= before["parent_test"]["accuracy"] - 0.02
    assert before["new_held_out"]["rejected"] > 0.5 and after["new_held_out"]["rejected"] == 0.0  # the calibration was fitted again
    assert after["parent_test"]["rejected"] < 0.05
    assert sha256(weights) == parent_hash  # the parent is left as it was

    lineage = {"path": str(weights.resolve()), "sha256": parent_hash}
    config = json.loads((out / "config.json").read_text())
    assert config["parent"] == lineage and config["learn"]["replay"] == LEARN_REPLAY and config["dataset"] == "mnist"
    assert load_model(out)[1]["parent"] == lineage
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["train_accuracy"] == 1.0 and "val_accuracy" in history[-1]
    assert {"curves.png", "split.json", "learnt.npz", "learnt.json", "history.csv"} <= {p.name for p in out.iterdir()}
    assert len(json.loads((out / "learnt.json").read_text())) == 40

    code, stdout, _ = run_cli(capsys, "evaluate", out, "--json")
    assert code == 0 and json.loads(stdout)["accuracy"] == pytest.approx(after["parent_test"]["accuracy"])
    code, stdout, _ = run_cli(capsys, "predict", out, new_images / "7", "--json")
    assert code == 0 and {p["label"] for p in json.loads(stdout)} == {"7 - seven"}
    code, stdout, _ = run_cli(capsys, "runs", tmp_path, "--json")
    assert code == 0 and {r["name"] for r in json.loads(stdout)} == {"parent", "learnt"}
    code, stdout, _ = run_cli(capsys, "report", out, "--json")
    assert code == 0 and json.loads(stdout)["test_accuracy"] == pytest.approx(after["parent_test"]["accuracy"])
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from image_logreg.serve import create_app, load_models

    with TestClient(create_app(load_models([f"learnt={out}"]), log=lambda line: None)) as client:
        answer = client.post("/v2/models/learnt/infer", json={"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8",
                                                                         "data": new_style(7, 1, 3).flatten().tolist()}]})
    assert answer.status_code == 200, answer.text


def test_learn_prints_before_and_after(capsys, parent, new_images, tmp_path):
    code, stdout, _ = run_cli(capsys, "learn", parent, new_images, "--out", tmp_path / "learnt", "--quiet")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("parent's mnist test split, 200 images: accuracy ")
    assert lines[1].startswith("new images held out (--hold-out), 8 images: accuracy 0.")
    assert "-> 1.0000" in lines[1]
    assert lines[-1].endswith(f"run saved to {tmp_path / 'learnt'}")


def test_learn_never_replaces_what_a_user_has(capsys, parent, new_images, tmp_path):
    out = tmp_path / "learnt"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run_cli(capsys, "learn", parent, new_images, "--out", out)
    assert code == 2 and "already exists" in err and (out / "mine.txt").read_text() == "keep"
    code, _, err = run_cli(capsys, "learn", parent, new_images, "--out", parent, "--overwrite")
    assert code == 2 and "is the run learnt from" in err and (parent / "model.safetensors").is_file()
    code, _, err = run_cli(capsys, "learn", parent, new_images, "--out", out, "--overwrite", "--quiet")
    assert code == 0 and not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_a_chain_learns_only_what_is_new_and_keeps_what_it_learnt(capsys, parent, new_images, tmp_path):
    first = tmp_path / "first"
    learn_run(parent, new_images, first)
    code, _, err = run_cli(capsys, "learn", first, new_images, "--out", tmp_path / "again")
    assert code == 2 and "nothing new to learn" in err
    write_folder(new_images, {"7/more": new_style(7, 10, 9)})  # ten more, in a folder within the class's
    second = learn_run(first, new_images, tmp_path / "second")
    assert second["images"]["new"] == 10 and second["images"]["already_learnt"] == 40
    assert second["images"]["learnt_before"] == 32 == second["replay"]["learnt_before"]  # replayed with the training images
    model, _ = load_model(tmp_path / "second")
    x3 = to_float(torch.from_numpy(new_style(3, 20, 5)))
    assert model.score(x3, torch.full((20,), 3)) == 1.0  # the first run's style is still known
    assert len(json.loads((tmp_path / "second" / "learnt.json").read_text())) == 50


def test_learn_without_replay_or_held_out_images(capsys, parent, new_images, tmp_path):
    code, stdout, err = run_cli(capsys, "learn", parent, new_images, "--out", tmp_path / "learnt", "--replay", "0",
                                "--hold-out", "0", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["replay"]["images"] == 0 and summary["images"]["learnt"] == 40 and summary["images"]["held_out"] == 0
    assert summary["after"]["new_learnt"]["accuracy"] == 1.0 and summary["after"]["new_held_out"]["n"] == 0
    assert summary["after"]["parent_test"]["rejected"] < 0.05  # the novelty score still knows the training images


@pytest.mark.parametrize("flag, value", [("--replay", "1"), ("--replay", "-0.1"), ("--hold-out", "1")])
def test_learn_refuses_shares_out_of_range(capsys, parent, new_images, tmp_path, flag, value):
    code, _, err = run_cli(capsys, "learn", parent, new_images, "--out", tmp_path / "learnt", flag, value)
    assert code == 2 and err.count("\n") == 1 and flag in err
