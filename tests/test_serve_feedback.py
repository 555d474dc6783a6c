"""Corrections over the API: POST /v2/models/NAME/feedback stores, limits, learns, rolls back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import class_pattern, run_cli

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from image_logreg.lineage import class_folder, class_of_folder  # noqa: E402
from image_logreg.serve import create_app, load_models  # noqa: E402
from image_logreg.serve.feedback import UPLOADS, FeedbackStore, folders_for, setup_feedback  # noqa: E402
from image_logreg.serve.learning import MAX_CHANGE  # noqa: E402

LOOPBACK = ("127.0.0.1", 50000)  # a client on this machine; TestClient's own is "testclient", another machine
TOKEN = "feedback-token-0123456789"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy MNIST run whose data stays where the run recorded it, as --learn needs."""
    from conftest import write_toy_dataset
    from image_logreg.cli import main

    root = tmp_path_factory.mktemp("feedback")
    data = write_toy_dataset(root / "data", "MNIST")
    argv = ["train", "--data-dir", str(data), "--out", str(root / "toy"), "--epochs", "3", "--quiet", "--no-download"]
    assert main(argv) == 0
    return root / "toy"


def serve_app(run, folder, *, learn=False, token=None, client=LOOPBACK, **limits):
    """A TestClient on ``run`` (served as "toy"), corrections stored in ``folder``."""
    models = load_models([f"toy={run}"])
    feedback = setup_feedback(models, learn=learn, feedback_dir=str(folder), **limits)
    app = create_app(models, token=token, feedback=feedback, log=lambda line: None)
    test_client = TestClient(app, client=client)
    test_client.models, test_client.feedback = models, feedback
    return test_client


def tensor_body(image: np.ndarray, label, datatype="UINT8") -> dict:
    return {"inputs": [{"name": "input", "shape": [1, *image.shape], "datatype": datatype,
                        "data": image.reshape(-1).tolist()}], "label": label}


def toy_image(label: int) -> np.ndarray:
    return (class_pattern(label) * 220).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def samples(folder) -> list:
    """The stored samples: files in the class folders (not the uploads, not temporaries)."""
    return sorted(p for p in folder.glob("*/*") if not p.parent.name.startswith(".") and not p.name.startswith("."))


def assert_error(response, status: int, *fragments):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# --- storing -----------------------------------------------------------------------------------


def test_feedback_is_off_unless_asked_for(toy_run):
    models = load_models([f"toy={toy_run}"])
    assert setup_feedback(models) is None
    with TestClient(create_app(models, log=lambda line: None), client=LOOPBACK) as client:
        assert_error(client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(3), 3)), 404,
                     "--feedback-dir", "--learn")
        assert "feedback" not in client.get("/v2/models/toy").json()["parameters"]


def test_a_correction_is_stored_as_the_model_saw_it(toy_run, tmp_path):
    folder = tmp_path / "corrections"
    with serve_app(toy_run, folder) as client:
        meta = client.get("/v2/models/toy").json()
        assert meta["parameters"]["feedback"] == {"learn": False} and meta["versions"] == ["1"]
        image = toy_image(3)
        response = client.post("/v2/models/toy/feedback", json=tensor_body(image, 5))
        assert response.status_code == 200, response.text
        body = response.json()
        classes = client.models["toy"].classes
        assert body["label"] == classes[5] and body["class_index"] == 5 and body["learning"] is False
        assert body["model_version"] == "1" and body["steps"] == 0 and body["original"] is None
        stored = folder / body["stored"]
        assert stored.parent.name == class_folder(classes, 5) and class_of_folder(classes, stored.parent.name) == 5
        assert np.array_equal(np.asarray(Image.open(stored)), image)  # exactly the tensor sent
        # FP32 (0-1) is stored as the dataset would hold it: rounded to 0-255
        fp32 = client.post("/v2/models/toy/feedback", json=tensor_body(image / 255.0, "5", "FP32"))
        assert fp32.status_code == 200, fp32.text
        assert np.array_equal(np.asarray(Image.open(folder / fp32.json()["stored"])), image)
        # an image file: the sample is what the model saw (28x28), the file is kept as it came
        upload = png_bytes(np.asarray(Image.fromarray(255 - image).resize((140, 140), Image.NEAREST)))
        response = client.post("/v2/models/toy/feedback?label=7&explain=true", content=upload,
                               headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        body = response.json()
        sample = np.asarray(Image.open(folder / body["stored"]))
        assert sample.shape == (28, 28) and sample.dtype == np.uint8 and sample.max() > 100
        assert np.array_equal(np.array(body["result"]["seen"], dtype=np.uint8), sample)
        assert body["original"].startswith(f"{UPLOADS}/{class_folder(classes, 7)}/")
        assert (folder / body["original"]).read_bytes() == upload
        assert body["stored_count"] == 3 and len(samples(folder)) == 3


def test_stored_files_never_replace_one_another(tmp_path):
    from datetime import datetime, timezone

    moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    classes = [str(k) for k in range(10)]
    store = FeedbackStore(tmp_path, classes, clock=lambda: moment)
    image = toy_image(2)
    first, _ = store.save(image, 2, None)
    assert first.name.startswith("20260102T030405678Z-") and first.parent == tmp_path / "2"
    before = first.read_bytes()
    second, _ = store.save(image, 2, None)  # the same image in the same millisecond: a name of its own
    assert second != first and second.name.endswith("-2.png") and first.read_bytes() == before
    mine = tmp_path / "2" / second.name.replace("-2.png", "-3.png")
    mine.write_bytes(b"a file the user had")
    third, _ = store.save(image, 2, None)
    assert third.name.endswith("-4.png") and mine.read_bytes() == b"a file the user had"
    assert sorted(p.name for p in (tmp_path / "2").iterdir() if p.name.startswith(".")) == []  # no temporaries left
    assert store.count() == 4


BAD = [
    ({"json": tensor_body(toy_image(1), 10)}, 400, "label: 10 is no class"),
    ({"json": tensor_body(toy_image(1), True)}, 400, "label: True is no class"),
    ({"json": tensor_body(toy_image(1), "eleven")}, 400, "label: 'eleven' is no class"),
    ({"json": {"inputs": tensor_body(toy_image(1), 1)["inputs"]}}, 400, "label: none"),
    ({"json": {"inputs": [{"name": "input", "shape": [2, 28, 28], "datatype": "UINT8", "data": [0] * 1568}],
               "label": 1}}, 413, "limit is 1"),
    ({"json": {"inputs": [{"name": "input", "shape": [1, 27, 28], "datatype": "UINT8", "data": [0] * 756}],
               "label": 1}}, 400, "does not fit"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ({"json": tensor_body(np.zeros((28, 28), np.uint8), 1)}, 400, "blank image"),  # nothing to learn, as learn skips it
    ({"json": tensor_body(np.full((28, 28), 0.5, np.float32), 1, "FP32")}, 400, "blank image"),
    ({"content": png_bytes(np.full((40, 40), 255, np.uint8)), "headers": {"Content-Type": "image/png"},
      "params": {"label": "1"}}, 400, "blank image"),
    ({"content": b"not an image", "headers": {"Content-Type": "image/png"}, "params": {"label": "1"}}, 400, "not an image"),
    ({"content": png_bytes(toy_image(1)), "headers": {"Content-Type": "image/png"}}, 400, "label: none"),
    ({"content": b"", "headers": {"Content-Type": "image/png"}, "params": {"label": "1"}}, 400, "empty body"),
    # types a page on another site may send without asking first (CORS) are refused
    ({"content": png_bytes(toy_image(1)), "params": {"label": "1"}}, 415, "'(none)'"),
    ({"content": b"x", "headers": {"Content-Type": "text/plain"}, "params": {"label": "1"}}, 415, "'text/plain'"),
    ({"files": {"files": ("a.png", png_bytes(toy_image(1)), "image/png")}, "params": {"label": "1"}}, 415, "multipart"),
]


@pytest.mark.parametrize("request_args, status, fragment", BAD)
def test_bad_corrections_are_4xx_and_store_nothing(toy_run, tmp_path, request_args, status, fragment):
    with serve_app(toy_run, tmp_path) as client:
        assert_error(client.post("/v2/models/toy/feedback", **request_args), status, fragment)
        assert_error(client.post("/v2/models/nope/feedback", json=tensor_body(toy_image(1), 1)), 404, "unknown model")
    assert samples(tmp_path) == [] and client.feedback.stored == 0


def test_corrections_need_the_token_and_from_other_machines_one(toy_run, tmp_path):
    body = tensor_body(toy_image(4), 4)
    with serve_app(toy_run, tmp_path, token=TOKEN, client=("203.0.113.9", 40000)) as client:
        assert_error(client.post("/v2/models/toy/feedback", json=body), 401, "Bearer")
        ok = client.post("/v2/models/toy/feedback", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text
    # a server without a token (--no-auth off loopback) takes corrections from this machine only
    with serve_app(toy_run, tmp_path, client=("203.0.113.9", 40000)) as client:
        refused = client.post("/v2/models/toy/feedback", json=body)
        assert_error(refused, 401, "another machine", "--token-file")
        assert refused.headers["www-authenticate"] == "Bearer"
        assert client.get("/v2/models/toy").status_code == 200  # reading is as open as before
    with serve_app(toy_run, tmp_path, client=("::1", 40000)) as client:
        assert client.post("/v2/models/toy/feedback", json=body).status_code == 200
    assert len(samples(tmp_path)) == 2


def test_corrections_are_bounded_in_all_and_per_client(toy_run, tmp_path):
    with serve_app(toy_run, tmp_path / "a", max_feedback=2) as client:
        for k in range(2):
            assert client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(k), k)).status_code == 200
        assert_error(client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(2), 2)), 429, "--max-feedback", "2")
    assert len(samples(tmp_path / "a")) == 2
    # counted again at the next start: the folder still holds 2
    with serve_app(toy_run, tmp_path / "a", max_feedback=3) as client:
        assert client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(2), 2)).status_code == 200
        assert_error(client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(3), 3)), 429)

    now = [1000.0]
    with serve_app(toy_run, tmp_path / "b", rate=3) as client:  # 3 a minute: one every 20 s, 3 at once
        client.feedback.rate.clock = lambda: now[0]
        codes = [client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(k), k)).status_code for k in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(5), 5))
        assert_error(refused, 429, "3 a minute")
        assert refused.headers["retry-after"] == "20"
        now[0] += 20
        assert client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(6), 6)).status_code == 200
        assert client.post("/v2/models/toy/feedback", json=tensor_body(toy_image(7), 7)).status_code == 429
    assert len(samples(tmp_path / "b")) == 4


def test_rate_buckets_are_bounded(monkeypatch):
    from image_logreg.serve import feedback

    monkeypatch.setattr(feedback, "MAX_CLIENTS", 3)
    limit = feedback.RateLimit(1, clock=lambda: 0.0)
    assert [limit.wait(f"10.0.0.{k}") for k in range(5)] == [0.0] * 5
    assert len(limit._buckets) == 3
    assert limit.wait("10.0.0.4") == pytest.approx(60.0)  # the latest clients are still counted


# --- learning ------------------------------------------------------------------------------------


def weights(served) -> torch.Tensor:
    return torch.cat([served.model.linear.weight.reshape(-1), served.model.linear.bias]).detach()


def test_a_learnt_correction_is_a_new_version_beside_the_original(toy_run, tmp_path):
    with serve_app(toy_run, tmp_path, learn=True) as client:
        learner = client.feedback.learners["toy"]
        original = learner.original
        image = toy_image(3)
        infer = {"inputs": tensor_body(image, 0)["inputs"]}
        before = client.post("/v2/models/toy/infer", json=infer).json()
        assert before["model_version"] == "1" and before["outputs"][1]["data"] == [3]
        # a confirmation teaches nothing: no new version
        same = client.post("/v2/models/toy/feedback", json=tensor_body(image, 3)).json()
        assert same["steps"] == 0 and same["model_version"] == "1" and same["answered"] is True

        body = client.post("/v2/models/toy/feedback", json=tensor_body(image, 8)).json()
        assert body["learning"] is True and body["steps"] >= 1
        assert body["model_version"] == "2" and body["versions"] == ["1", "2"]
        live = learner.live
        assert live is not original and live.version == "2"
        assert float((weights(live) - weights(original)).norm()) <= MAX_CHANGE + 1e-4
        # the checkpoint's own calibration and novelty score are the original's
        assert live.model.temperature == original.model.temperature and live.model.novelty is original.model.novelty
        assert client.get("/v2/models/toy").json()["versions"] == ["1", "2"]
        assert client.get("/v2/models/toy/versions/1").json()["versions"] == ["1", "2"]
        now = client.post("/v2/models/toy/infer", json=infer).json()
        assert now["model_version"] == "2"
        assert now == client.post("/v2/models/toy/versions/2/infer", json=infer).json()
        first = client.post("/v2/models/toy/versions/1/infer", json=infer).json()
        assert first == before  # the original still answers, unchanged
        assert now["outputs"][0]["data"] != before["outputs"][0]["data"]
        assert body["result"]["top_k"][0]["probability"] == pytest.approx(
            max(now["outputs"][0]["data"]), abs=1e-6)  # the answer sent back is the new version's
        assert_error(client.post("/v2/models/toy/versions/3/infer", json=infer), 404, "versions 1, 2")
        assert client.get("/v2/models/toy/versions/2/ready").status_code == 200
        # /predict and the page follow the live version
        from image_logreg.predict import predict_file

        upload = png_bytes(255 - image)
        entry = client.post("/predict?model=toy", content=upload).json()[0]
        assert entry["top_k"] == predict_file(live.model, live.meta, upload)[0]["top_k"]
        assert entry["top_k"] != predict_file(original.model, original.meta, upload)[0]["top_k"]
        third = client.post("/v2/models/toy/feedback", json=tensor_body(image, 8)).json()
        assert third["model_version"] in ("2", "3")  # "2" when the second correction was already answered
    assert len(samples(tmp_path)) == 3


def test_learn_refuses_a_model_without_its_data(toy_run, tmp_path, capsys):
    from test_cli import assert_one_line_error

    from image_logreg.checkpoint import load_model
    from image_logreg.errors import UsageError

    model, _ = load_model(toy_run)
    lone = tmp_path / "tutorial.pth"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, lone)
    empty = tmp_path / "no-data"
    empty.mkdir()
    models = load_models([f"lone={lone}"])
    with pytest.raises(UsageError, match="--learn: model lone needs its run's training split.*--feedback-dir alone"):
        setup_feedback(models, learn=True, data_dir=str(empty))
    stored = setup_feedback(models, feedback_dir=str(tmp_path / "fb"))  # storing alone needs no data
    assert stored.stores["lone"].folder == tmp_path / "fb" and stored.learners == {}
    assert folders_for(models, None) == {"lone": tmp_path / "tutorial-feedback"}
    code, out, err = run_cli(capsys, "serve", f"lone={lone}", "--learn", "--data-dir", empty, "--port", "0")
    assert_one_line_error(code, out, err, "--learn: model lone", "--feedback-dir alone")
    for flags, fragment in ((["--max-drop", "2"], "--max-drop"), (["--feedback-rate", "5"], "--feedback-rate"),
                            (["--data-dir", tmp_path], "--data-dir is about corrections"),
                            (["--feedback-dir", tmp_path / "x", "--max-drop", "2"], "--max-drop is for --learn"),
                            (["--feedback-dir", tmp_path / "x", "--data-dir", tmp_path], "--data-dir is for --learn"),
                            (["--feedback-dir", tmp_path / "x", "--max-feedback", "0"], "--max-feedback must be at least 1"),
                            (["--feedback-dir", tmp_path / "x", "--feedback-rate", "0"], "--feedback-rate must be")):
        code, out, err = run_cli(capsys, "serve", toy_run, *flags, "--port", "0")
        assert_one_line_error(code, out, err, fragment)


def test_feedback_folders_are_beside_the_run_and_never_in_the_package(toy_run, tmp_path):
    import image_logreg
    from image_logreg.errors import UsageError

    models = load_models([f"toy={toy_run}"])
    assert folders_for(models, None) == {"toy": toy_run / "feedback"}
    two = load_models([f"a={toy_run}", f"b={toy_run}"])
    assert folders_for(two, str(tmp_path)) == {"a": tmp_path / "a", "b": tmp_path / "b"}
    package = Path(image_logreg.__file__).parent
    with pytest.raises(UsageError, match="inside the image_logreg package"):
        setup_feedback(models, feedback_dir=str(package / "serve" / "static" / "feedback"))
    assert not (package / "serve" / "static" / "feedback").exists()


def test_openapi_documents_the_feedback_route(toy_run, tmp_path):
    with serve_app(toy_run, tmp_path) as client:
        schema = client.get("/openapi.json").json()
    route = schema["paths"]["/v2/models/{name}/feedback"]["post"]
    assert set(route["requestBody"]["content"]) == {"application/json", "image/*"}
    assert {"label", "explain"} <= {p["name"] for p in route["parameters"]}
    assert "label" in schema["components"]["schemas"]["FeedbackRequest"]["properties"]
    assert {"429", "401", "415"} <= set(route["responses"])


# --- on MNIST: corrections flip answers, a burst of wrong labels is rolled back --------------------


@pytest.fixture(scope="module")
def mnist_test(real_data):
    from image_logreg.datasets import load_split

    return load_split("mnist", real_data, "test")


@pytest.mark.integration
def test_corrections_of_misread_digits_usually_flip_them(mnist_run, mnist_test, tmp_path):
    models = load_models([f"mnist={mnist_run}"])
    served = models["mnist"]
    x = served.inputs(mnist_test.images)
    misread = (served.model.predict(x) != mnist_test.labels).nonzero().flatten()[:20]
    feedback = setup_feedback(models, learn=True, feedback_dir=str(tmp_path), rate=1000)
    learner = feedback.learners["mnist"]
    with TestClient(create_app(models, feedback=feedback, log=lambda line: None), client=LOOPBACK) as client:
        answered = []
        for i in misread.tolist():
            body = client.post("/v2/models/mnist/feedback",
                               json=tensor_body(mnist_test.images[i].numpy(), int(mnist_test.labels[i]))).json()
            answered.append(body["answered"])
        assert sum(answered) >= 15, answered  # 93% over 150 such digits (learning.py)
        assert learner.accuracy(learner.live.model) > learner.baseline - 0.01


@pytest.mark.integration
def test_a_burst_of_wrong_labels_is_rolled_back(mnist_run, mnist_test, tmp_path):
    from image_logreg.serve.learning import CHECK_EVERY

    models = load_models([f"mnist={mnist_run}"])
    served = models["mnist"]
    right = (served.model.predict(served.inputs(mnist_test.images)) == mnist_test.labels).nonzero().flatten()
    lines = []
    feedback = setup_feedback(models, learn=True, feedback_dir=str(tmp_path), rate=1000, log=lines.append)
    learner = feedback.learners["mnist"]
    with TestClient(create_app(models, feedback=feedback, log=lambda line: None), client=LOOPBACK) as client:
        previous = weights(learner.live)
        for n, i in enumerate(right[:CHECK_EVERY].tolist(), 1):
            wrong = (int(mnist_test.labels[i]) + 1) % 10
            body = client.post("/v2/models/mnist/feedback", json=tensor_body(mnist_test.images[i].numpy(), wrong)).json()
            assert body["steps"] >= 1, body
            if n < CHECK_EVERY:
                assert body["model_version"] == str(n + 1) and body["rolled_back"] is None
                now = weights(learner.live)
                assert float((now - previous).norm()) <= MAX_CHANGE + 1e-4  # each wrong label moves it a bounded step
                previous = now
        back = body["rolled_back"]
        assert set(back) == {"from", "to", "accuracy", "baseline", "max_drop"}
        assert (back["from"], back["to"], back["max_drop"]) == (str(CHECK_EVERY + 1), "1", 1.0)
        assert back["baseline"] == learner.baseline and back["accuracy"] < learner.baseline - 0.01
        assert body["model_version"] == "1" and body["versions"] == ["1"] and learner.live is learner.original
        assert len(lines) == 1 and "rolled back from version 51 to version 1" in lines[0] and "--max-drop 1" in lines[0]
        assert client.get("/v2/models/mnist").json()["versions"] == ["1"]
        assert_error(client.post("/v2/models/mnist/versions/51/infer",
                                 json={"inputs": tensor_body(mnist_test.images[0].numpy(), 0)["inputs"]}), 404)
        # versions are never reused: the next correction is 52
        i = right[CHECK_EVERY].item()
        body = client.post("/v2/models/mnist/feedback",
                           json=tensor_body(mnist_test.images[i].numpy(), (int(mnist_test.labels[i]) + 1) % 10)).json()
        assert body["model_version"] == "52" and body["versions"] == ["1", "52"]
    assert len(samples(tmp_path)) == CHECK_EVERY + 1  # rolled back or not, every correction stays stored


def test_serve_says_where_corrections_go(toy_run, tmp_path):
    from image_logreg.serve.server import _feedback_line

    models = load_models([f"toy={toy_run}"])
    stored = setup_feedback(models, feedback_dir=str(tmp_path / "a"))
    assert _feedback_line(stored, "toy") == f"  corrections stored in {tmp_path / 'a'} (not learnt: --learn learns from them)"
    learnt = setup_feedback(models, learn=True, feedback_dir=str(tmp_path / "b"), max_drop=0.5)
    line = _feedback_line(learnt, "toy")
    assert line.startswith(f"  corrections stored in {tmp_path / 'b'} and learnt: 480 training images replayed")
    assert "checked every 50 corrections (rolled back past 0.5 points lower)" in line
