"""``--device cuda`` end to end: train, evaluate, predict, sweep, deskew and serve give what the CPU gives.

Every test here is marked ``cuda`` and skips without a CUDA device, so ``pytest -m cuda`` on a
GPU machine runs exactly these (``benchmarks/device_check.sh`` does). The toy datasets keep each
test to a second or two. Tolerances are float32's: the GPU sums in another order than the CPU,
and plain SGD carries those last-bit differences forward without amplifying them.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, class_pattern, run_cli, toy_images, train, write_toy_dataset

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# Adam's first steps are lr * sign(gradient), so a gradient entry within rounding of zero can
# step either way on the two devices; SGD's steps are linear in the gradient.
SGD = ["--optimizer", "sgd", "--lr", "0.1"]
WEIGHT_TOL = 1e-4
PROBA_TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("cuda") / "data", "MNIST")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same toy run trained on each device, plain and deskewed: {(device, deskew): run dir}."""
    from image_logreg.cli import main

    root = tmp_path_factory.mktemp("cuda-runs")
    made = {}
    for device in ("cpu", "cuda"):
        for deskew in (False, True):
            out = root / f"{device}{'-deskew' if deskew else ''}"
            argv = ["train", "--data-dir", str(data), "--out", str(out), *FAST, *SGD, "--device", device]
            assert main(argv + (["--deskew"] if deskew else [])) == 0
            made[device, deskew] = out
    return made


def weights(run) -> dict[str, torch.Tensor]:
    from image_logreg import load_model

    model, _ = load_model(run)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def config_of(run) -> dict:
    return json.loads((run / "config.json").read_text())


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def user_digit(label: int) -> bytes:
    """A toy class pattern as a user would bring it: dark on light, large."""
    big = Image.fromarray(((1 - class_pattern(label)) * 255).astype(np.uint8)).resize((168, 168), Image.NEAREST)
    return png_bytes(np.asarray(big))


# --- train ------------------------------------------------------------------------------------


@pytest.mark.parametrize("deskew", [False, True], ids=["raw", "deskew"])
def test_train_on_cuda_matches_cpu(runs, deskew):
    cpu, cuda = weights(runs["cpu", deskew]), weights(runs["cuda", deskew])
    for name in cpu:
        assert torch.allclose(cuda[name], cpu[name], atol=WEIGHT_TOL, rtol=0), (name, (cuda[name] - cpu[name]).abs().max())
    assert config_of(runs["cuda", deskew])["device_used"] == "cuda"
    assert config_of(runs["cpu", deskew])["device_used"] == "cpu"
    history = [json.loads((runs[d, deskew] / "history.json").read_text()) for d in ("cpu", "cuda")]
    assert history[1][-1]["val_accuracy"] == pytest.approx(history[0][-1]["val_accuracy"], abs=1 / 120)
    assert history[1][-1]["val_loss"] == pytest.approx(history[0][-1]["val_loss"], abs=1e-4)


def test_auto_picks_cuda(capsys, data, tmp_path):
    from image_logreg.train import resolve_device

    assert resolve_device("auto").type == "cuda"
    train(capsys, data, tmp_path / "run", *SGD, "--epochs", "1")
    assert config_of(tmp_path / "run")["device_used"] == "cuda"


def test_train_hands_fit_tensors_already_on_cuda(capsys, data, tmp_path, monkeypatch):
    """The images are moved to the device once, before training, not batch by batch."""
    import image_logreg.run
    from image_logreg.train import fit

    seen = {}

    def spy(model, x_train, y_train, x_val, y_val, *args, **kwargs):
        seen.update(model=model.device.type, x_train=x_train.device.type, y_train=y_train.device.type,
                    x_val=x_val.device.type, y_val=y_val.device.type)
        return fit(model, x_train, y_train, x_val, y_val, *args, **kwargs)

    monkeypatch.setattr(image_logreg.run, "fit", spy)
    train(capsys, data, tmp_path / "run", *SGD, "--device", "cuda")
    assert seen == dict.fromkeys(("model", "x_train", "y_train", "x_val", "y_val"), "cuda")


def test_fit_copies_no_images_to_the_device_per_step(data):
    """Host-to-device copies during ``fit`` on tensors already on the GPU: the shuffled order once
    an epoch, not a batch per step (90 steps here)."""
    from torch.profiler import ProfilerActivity, profile

    from image_logreg import LogisticRegression, TrainConfig, fit, load_split, to_float

    train_set = load_split("mnist", data, "train", download=False)
    x, y = to_float(train_set.images, "cuda"), train_set.labels.cuda()
    model = LogisticRegression().cuda()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, batch_size=16, epochs=3, schedule="constant")
    fit(model, x[:480], y[:480], x[480:], y[480:], cfg)  # warm-up: kernels loaded, allocator primed
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fit(model, x[:480], y[:480], x[480:], y[480:], cfg)
        torch.cuda.synchronize()
    events = prof.key_averages()
    if not any("HtoD" in e.key or "DtoH" in e.key for e in events):  # .item() copies back, always
        pytest.skip("the profiler records no device-side copies here (no CUPTI)")
    copies = sum(e.count for e in events if "HtoD" in e.key)
    assert copies <= 3 * cfg.epochs, [(e.key, e.count) for e in events if "Memcpy" in e.key]


def test_lbfgs_on_cuda(capsys, data, tmp_path):
    extra = ["--optimizer", "lbfgs", "--weight-decay", "1e-3", "--epochs", "5"]
    cpu = train(capsys, data, tmp_path / "cpu", *extra, "--device", "cpu")
    cuda = train(capsys, data, tmp_path / "cuda", *extra, "--device", "cuda")
    assert set(cuda["lbfgs"]) == {"converged", "grad_norm", "iterations"}
    # L-BFGS feeds rounding differences back into its line searches: close, not last-bit close
    assert cuda["val_accuracy"] == pytest.approx(cpu["val_accuracy"], abs=0.02)
    assert cuda["train_loss"] == pytest.approx(cpu["train_loss"], rel=1e-2, abs=1e-3)


# --- evaluate and predict ---------------------------------------------------------------------


@pytest.mark.parametrize("split", ["test", "val"])
def test_evaluate_on_cuda_matches_cpu(capsys, runs, split):
    results = {}
    for device in ("cpu", "cuda"):
        code, out, err = run_cli(capsys, "evaluate", runs["cpu", True], "--split", split, "--device", device, "--json")
        assert code == 0, err
        results[device] = json.loads(out)
    assert results["cuda"]["accuracy"] == results["cpu"]["accuracy"]
    assert results["cuda"]["confusion"] == results["cpu"]["confusion"]
    assert results["cuda"]["loss"] == pytest.approx(results["cpu"]["loss"], rel=1e-5)


def predicted(capsys, run, device, *args) -> list[dict]:
    code, out, err = run_cli(capsys, "predict", run, *args, "--device", device, "--json", "--top-k", "3")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("deskew", [False, True], ids=["raw", "deskew"])
def test_predict_files_on_cuda_matches_cpu(capsys, runs, tmp_path, deskew):
    paths = []
    for label in range(10):
        paths.append(tmp_path / f"{label}.png")
        paths[-1].write_bytes(user_digit(label))
    run = runs["cpu", deskew]
    cpu, cuda = predicted(capsys, run, "cpu", *paths), predicted(capsys, run, "cuda", *paths)
    assert [p["label"] for p in cuda] == [p["label"] for p in cpu]
    for a, b in zip(cpu, cuda):
        assert b["top_k"][0]["probability"] == pytest.approx(a["top_k"][0]["probability"], abs=PROBA_TOL)
    cpu, cuda = predicted(capsys, run, "cpu", "--index", 0, 1, 2), predicted(capsys, run, "cuda", "--index", 0, 1, 2)
    assert [p["label"] for p in cuda] == [p["label"] for p in cpu]


def test_predict_runs_on_the_device_asked_for(capsys, runs, tmp_path, monkeypatch):
    """``predict --device cuda`` puts the model on the GPU, as evaluate does (not quietly the CPU)."""
    import image_logreg.predict

    devices = []
    top_k = image_logreg.predict.top_k

    def spy(model, x, *args, **kwargs):
        devices.append(model.device.type)
        return top_k(model, x, *args, **kwargs)

    monkeypatch.setattr(image_logreg.predict, "top_k", spy)
    (tmp_path / "3.png").write_bytes(user_digit(3))
    predicted(capsys, runs["cpu", False], "cuda", tmp_path / "3.png")
    assert devices == ["cuda"]


# --- sweep ------------------------------------------------------------------------------------


def test_sweep_on_cuda(capsys, data, tmp_path):
    results = {}
    for device in ("cpu", "cuda"):
        argv = ["sweep", "--data-dir", data, "--out", tmp_path / device, *FAST, "--json",
                "--optimizer", "sgd", "--lr", "0.05,0.1", "--device", device]
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        results[device] = json.loads(out)
    cuda, cpu = results["cuda"], results["cpu"]
    assert cuda["trained"] == 2 and cuda["failed"] == 0
    runs = [p for p in (tmp_path / "cuda").iterdir() if p.is_dir()]
    assert len(runs) == 2 and all(config_of(p)["device_used"] == "cuda" for p in runs)
    by_lr = lambda result: {row["settings"]["lr"]: row["val_accuracy"] for row in result["configs"]}
    assert by_lr(cuda) == pytest.approx(by_lr(cpu), abs=1 / 120)
    assert cuda["best"]["test_accuracy"] == pytest.approx(cpu["best"]["test_accuracy"], abs=1 / 200)


# --- serve ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clients(runs):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from image_logreg.serve import create_app, load_models

    specs = [f"plain={runs['cpu', False]}", f"deskewed={runs['cpu', True]}"]
    made = {}
    for device in ("cpu", "cuda"):
        models = load_models(specs, device=device)
        assert {m.model.device.type for m in models.values()} == {device}
        made[device] = TestClient(create_app(models, log=lambda line: None)).__enter__()
    yield made
    for client in made.values():
        client.__exit__(None, None, None)


@pytest.mark.parametrize("name", ["plain", "deskewed"])
def test_serve_infer_on_cuda_matches_cpu(clients, name):
    images = toy_images(16)
    body = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.reshape(-1).tolist()}]}
    answers = {}
    for device, client in clients.items():
        response = client.post(f"/v2/models/{name}/infer", json=body)
        assert response.status_code == 200, response.text
        answers[device] = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert answers["cuda"]["class_index"] == answers["cpu"]["class_index"]
    assert np.allclose(answers["cuda"]["probabilities"], answers["cpu"]["probabilities"], atol=PROBA_TOL, rtol=0)


@pytest.mark.parametrize("name", ["plain", "deskewed"])
def test_serve_predict_png_on_cuda(clients, name):
    answers = {}
    for device, client in clients.items():
        response = client.post(f"/predict?model={name}&top_k=3&explain=true&filename=seven.png",
                               content=user_digit(7), headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        answers[device] = response.json()[0]
    cpu, cuda = answers["cpu"], answers["cuda"]
    assert cuda["label"] == cpu["label"] and cuda["source"] == "seven.png"
    assert np.allclose(cuda["probabilities"], cpu["probabilities"], atol=PROBA_TOL, rtol=0)
    # deskewing rounds to whole pixel values: a sample that lands on .5 may round either way
    assert np.abs(np.array(cuda["seen"], int) - np.array(cpu["seen"], int)).max() <= (1 if name == "deskewed" else 0)
    if name == "plain":
        assert np.allclose(cuda["evidence"], cpu["evidence"], atol=1e-5, rtol=1e-5)


def test_learn_on_cuda_matches_cpu(capsys, runs, tmp_path):
    """``learn --device cuda``: the same images learnt, the parent's test accuracy kept as on the CPU
    (L-BFGS's line searches see the GPU's other rounding, so the weights agree loosely)."""
    new = tmp_path / "new" / "3"
    new.mkdir(parents=True)
    for i in range(10):  # class 3's block in a spot no toy class uses
        image = np.zeros((28, 28), dtype=np.uint8)
        image[17:23, 14:19] = 180 + 7 * i
        Image.fromarray(image).save(new / f"{i}.png")
    results = {}
    for device in ("cpu", "cuda"):
        code, stdout, err = run_cli(capsys, "learn", runs["cpu", False], new.parent, "--out", tmp_path / device, "--device", device,
                                    "--json", "--quiet")
        assert code == 0, err
        results[device] = json.loads(stdout)
    cpu, cuda = (results[d]["after"] for d in ("cpu", "cuda"))
    assert cuda["new_held_out"]["accuracy"] == cpu["new_held_out"]["accuracy"] == 1.0
    assert cuda["parent_test"]["accuracy"] == pytest.approx(cpu["parent_test"]["accuracy"], abs=0.01)
    assert json.loads((tmp_path / "cuda" / "config.json").read_text())["device_used"] == "cuda"
