"""Acceptance: digits the way users bring them score as well as the dataset's own 28x28 images."""

import json

import numpy as np
import pytest

from image_logreg.cli import main
from user_digits import KINDS, write_user_digit_set

pytestmark = pytest.mark.integration
N = 800  # test digits re-rendered; enough for a 3-point margin to mean something, quick to write



def test_rerendered_digits_score_within_3_points_of_the_originals(capsys, mnist_run, real_data, tmp_path):
    from image_logreg import load_model, load_split, to_float

    test = load_split("mnist", real_data, "test", download=False)
    picks = np.random.default_rng(0).choice(len(test), N, replace=False)
    model, _ = load_model(mnist_run)
    original = model.score(to_float(test.images[picks]), test.labels[picks])

    paths = write_user_digit_set(test.images[picks].numpy(), tmp_path / "user", seed=0)
    assert {p.suffix for p in paths} >= {".png", ".jpg"} and len(paths) == N
    assert main(["predict", str(mnist_run), str(tmp_path / "user"), "--json", "--top-k", "1"]) == 0
    preds = {p["source"]: p["label"] for p in json.loads(capsys.readouterr().out)}
    truth = [test.classes[int(test.labels[i])] for i in picks]
    correct = [preds[str(path)] == label for path, label in zip(paths, truth)]
    rerendered = float(np.mean(correct))
    print(f"original 28x28: {original:.4f}, re-rendered files: {rerendered:.4f}")
    assert rerendered >= original - 0.03
    for k, kind in enumerate(KINDS):  # no file kind is left behind
        assert np.mean(correct[k :: len(KINDS)]) >= original - 0.06, kind


def test_naive_resizing_would_fail_on_the_same_files(capsys, mnist_run, real_data, tmp_path):
    """Why the normalisation exists: fed naively, such files score near chance."""
    from image_logreg import load_split

    test = load_split("mnist", real_data, "test", download=False)
    paths = write_user_digit_set(test.images[:100].numpy(), tmp_path / "user", seed=1)
    main(["predict", str(mnist_run), str(tmp_path / "user"), "--json", "--top-k", "1", "--no-normalize"])
    preds = {p["source"]: p["label"] for p in json.loads(capsys.readouterr().out)}
    truth = [test.classes[int(y)] for y in test.labels[:100]]
    assert np.mean([preds[str(p)] == t for p, t in zip(paths, truth)]) < 0.5
