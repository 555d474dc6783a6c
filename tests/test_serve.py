"""The HTTP API: every endpoint, every error a client can cause, auth, limits, metrics, two models."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import class_pattern, run_cli, toy_images, train

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from image_logreg.data import prepare_inputs  # noqa: E402
from image_logreg.serve import create_app, load_models  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two toy models, one plain and one deskewed, trained once for the module."""
    from conftest import write_toy_dataset
    from image_logreg.cli import main

    root = tmp_path_factory.mktemp("serve")
    data = write_toy_dataset(root / "data", "MNIST")
    for name, extra in (("plain", []), ("deskewed", ["--deskew"])):
        argv = ["train", "--data-dir", str(data), "--out", str(root / name), "--epochs", "3", "--quiet", "--no-download"]
        assert main(argv + extra) == 0
    return root


@pytest.fixture(scope="module")
def models(runs):
    return load_models([f"plain={runs / 'plain'}", f"deskewed={runs / 'deskewed'}"])


@pytest.fixture
def client(models):
    lines = []
    with TestClient(create_app(models, log=lines.append)) as c:
        c.log_lines = lines
        yield c


def infer_body(images: np.ndarray, datatype="UINT8", nested=False, **extra) -> dict:
    data = images.tolist() if nested else images.reshape(-1).tolist()
    return {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": datatype, "data": data}], **extra}


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def user_digit(label: int = 3) -> bytes:
    """A toy class pattern as a user would bring it: dark on light, large."""
    big = Image.fromarray(((1 - class_pattern(label)) * 255).astype(np.uint8)).resize((168, 168), Image.NEAREST)
    return png_bytes(np.asarray(big))


def assert_error(response, status: int, *fragments):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# --- the Open Inference Protocol --------------------------------------------------------------


def test_health_and_server_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "image-logreg" and "version" in meta and meta["extensions"] == []


def test_model_metadata_describes_tensors_and_classes(client, models):
    meta = client.get("/v2/models/plain").json()
    assert meta["name"] == "plain" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probabilities": [-1, 10], "class_index": [-1],
                                                               "rejected": [-1], "ood_score": [-1]}
    assert meta["parameters"]["classes"] == models["plain"].classes and meta["parameters"]["deskew"] is False
    assert client.get("/v2/models/deskewed/versions/1").json()["parameters"]["deskew"] is True
    assert client.get("/v2/models/plain/ready").json() == {"name": "plain", "ready": True}
    assert [m["name"] for m in client.get("/v2/models").json()["models"]] == ["plain", "deskewed"]


def test_unknown_model_or_version_is_404(client):
    assert_error(client.get("/v2/models/nope"), 404, "unknown model 'nope'", "plain, deskewed")
    assert_error(client.get("/v2/models/nope/ready"), 404)
    assert_error(client.post("/v2/models/nope/infer", json=infer_body(toy_images(1))), 404)
    assert_error(client.get("/v2/models/plain/versions/2"), 404, "version 1 only")
    assert_error(client.get("/no/such/path"), 404, "not found")
    assert_error(client.delete("/v2/models/plain"), 405)


@pytest.mark.parametrize("name", ["plain", "deskewed"])
def test_infer_applies_the_models_own_preprocessing(client, models, name):
    images = toy_images(5)
    response = client.post(f"/v2/models/{name}/infer", json=infer_body(images, id="req-1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == name and body["model_version"] == "1" and body["id"] == "req-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    served = models[name]
    expected = served.model.predict_proba(prepare_inputs(torch.from_numpy(images), served.meta["preprocessing"]))
    got = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(outputs["probabilities"]["shape"])
    assert outputs["probabilities"]["datatype"] == "FP32" and got.shape == (5, 10)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert outputs["class_index"] == {"name": "class_index", "datatype": "INT64", "shape": [5],
                                      "data": expected.argmax(1).tolist()}


def test_infer_takes_nested_lists_fp32_and_selected_outputs(client):
    images = toy_images(3, seed=1)
    flat = client.post("/v2/models/plain/infer", json=infer_body(images)).json()
    nested = client.post("/v2/models/plain/infer", json=infer_body(images, nested=True)).json()
    assert nested["outputs"] == flat["outputs"]
    fp32 = client.post("/v2/models/plain/infer", json=infer_body(images / 255.0, "FP32")).json()
    np.testing.assert_allclose(fp32["outputs"][0]["data"], flat["outputs"][0]["data"], atol=1e-6)
    only = client.post("/v2/models/plain/infer", json=infer_body(images, outputs=[{"name": "class_index"}])).json()
    assert [o["name"] for o in only["outputs"]] == ["class_index"]
    assert only["outputs"][0]["data"] == flat["outputs"][1]["data"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"inputs": 3}, "'inputs' must be a list"),
        ([1, 2], "JSON object"),
        ({"inputs": [{"name": "x", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}, "unknown input 'x'"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "INT8", "data": [0] * 784}]}, "datatype 'INT8'"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 27], "datatype": "UINT8", "data": [0] * 756}]}, "does not fit"),
        ({"inputs": [{"name": "input", "shape": [784], "datatype": "UINT8", "data": [0] * 784}]}, "does not fit"),
        ({"inputs": [{"name": "input", "shape": [0, 28, 28], "datatype": "UINT8", "data": []}]}, "no images"),
        ({"inputs": [{"name": "input", "shape": ["1", 28, 28], "datatype": "UINT8", "data": [0] * 784}]}, "list of integers"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 783}]}, "holds 783 values"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [256] * 784}]}, "0..255"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0.5] * 784}]}, "whole numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": [2.0] * 784}]}, "0.0..1.0"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": ["a"] * 784}]}, "only numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [True] * 784}]}, "only numbers"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [[0] * 28, [0]]}]}, "rectangular"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [10**30] * 784}]}, "0..255"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}],
          "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
        ({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784,
                      "parameters": {"binary_data_size": 784}}]}, "binary tensor data"),
    ],
)
def test_bad_tensors_are_400_with_a_reason(client, body, fragment):
    assert_error(client.post("/v2/models/plain/infer", json=body), 400, fragment)


def test_infer_refuses_bad_json_binary_bodies_and_too_many_images(models):
    with TestClient(create_app(models, max_images=4, log=lambda line: None)) as client:
        assert_error(client.post("/v2/models/plain/infer", content=b"{not json"), 400, "not valid JSON")
        binary = client.post("/v2/models/plain/infer", content=b"{}\x00\x01",
                             headers={"Inference-Header-Content-Length": "2"})
        assert_error(binary, 400, "binary tensor data")
        assert_error(client.post("/v2/models/plain/infer", json=infer_body(toy_images(5))), 413, "limit is 4")
        assert client.post("/v2/models/plain/infer", json=infer_body(toy_images(4))).status_code == 200


# --- image files ------------------------------------------------------------------------------


def test_predict_answers_what_the_cli_prints(capsys, client, runs, tmp_path):
    files = {"three.png": user_digit(3), "seven.png": user_digit(7)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    code, out, err = run_cli(capsys, "predict", runs / "plain", *[tmp_path / n for n in files], "--top-k", "4", "--json")
    assert code == 0, err
    cli = json.loads(out)
    for r in cli:
        r["source"] = r["source"].rsplit("/", 1)[-1]
    multipart = client.post("/predict?model=plain&top_k=4",
                            files=[("files", (n, d, "image/png")) for n, d in files.items()])
    assert multipart.status_code == 200, multipart.text
    assert multipart.json() == cli
    raw = client.post("/predict?top_k=4&filename=seven.png", content=files["seven.png"],
                      headers={"Content-Type": "image/png"})
    assert raw.json() == cli[1:]
    assert client.post("/predict", content=files["seven.png"]).json()[0]["source"] == "upload"


def test_predict_normalize_false_and_the_deskewed_model(capsys, client, runs, tmp_path):
    (tmp_path / "d.png").write_bytes(user_digit(5))
    for model, flags in (("plain", ["--no-normalize"]), ("deskewed", [])):
        code, out, err = run_cli(capsys, "predict", runs / model, tmp_path / "d.png", "--json", *flags)
        assert code == 0, err
        query = "&normalize=false" if flags else ""
        got = client.post(f"/predict?model={model}&filename=d.png{query}", content=user_digit(5)).json()
        assert got[0]["top_k"] == json.loads(out)[0]["top_k"]


def test_predict_explain_shows_what_the_model_saw_and_why(client, models):
    result = client.post("/predict?explain=true&top_k=10", content=user_digit(2)).json()[0]
    seen = np.array(result["seen"])
    evidence = np.array(result["evidence"])
    assert seen.shape == (28, 28) and evidence.shape == (28, 28) and 0 <= seen.min() and seen.max() <= 255
    assert len(result["probabilities"]) == 10 and abs(sum(result["probabilities"]) - 1) < 1e-5
    model = models["plain"].model
    top = result["top_k"][0]["index"]
    logit = model(torch.tensor(seen / 255.0, dtype=torch.float32)[None])[0, top].item()
    assert evidence.sum() + result["bias"] == pytest.approx(logit, abs=1e-2)
    assert result["probabilities"][top] == pytest.approx(result["top_k"][0]["probability"])


def test_predict_errors_name_the_problem(client, tmp_path):
    # a file that cannot be used is 422, once no file in the request could be
    assert_error(client.post("/predict", content=b"hello", headers={"Content-Type": "image/png"}), 422, "upload: not an image")
    blank = png_bytes(np.full((50, 50), 255, np.uint8))
    assert_error(client.post("/predict?filename=blank.png", content=blank), 422, "blank.png: blank image")
    truncated = user_digit(1)[:60]
    assert_error(client.post("/predict", files=[("files", ("cut.png", truncated, "image/png"))]), 422, "cut.png")
    assert_error(client.post("/predict", content=b""), 400, "empty body")
    assert_error(client.post("/predict", json={"x": 1}), 415, "not an image")
    assert_error(client.post("/predict?model=nope", content=user_digit(1)), 404, "unknown model")
    assert_error(client.post("/predict?top_k=0", content=user_digit(1)), 400, "top_k")
    assert_error(client.post("/predict?top_k=abc", content=user_digit(1)), 400, "top_k")
    assert_error(client.post("/predict", params={"top_k": "²"}, content=user_digit(1)), 400, "top_k")  # a digit to isdigit()
    assert_error(client.post("/predict", files=[("other", ("a.png", user_digit(1), "image/png"))]), 400, "'files'")


def test_decompression_bomb_is_413(client):
    buf = io.BytesIO()
    Image.new("L", (12000, 12000), 255).save(buf, format="PNG")  # 144 Mpixels in a few hundred KB
    assert len(buf.getvalue()) < 1_000_000
    assert_error(client.post("/predict?filename=bomb.png", content=buf.getvalue()), 413, "bomb.png: image too large")


def test_body_and_image_count_limits_are_413(models):
    with TestClient(create_app(models, max_body=4096, max_images=2, log=lambda line: None)) as client:
        assert_error(client.post("/predict", content=b"x" * 5000), 413, "over the limit of 4096")
        three = [("files", (f"{i}.png", user_digit(i), "image/png")) for i in range(3)]
        assert_error(client.post("/predict", files=three), 413, "limit is 2")
        assert client.post("/predict", files=three[:2]).status_code == 200


# --- auth, CORS, metrics, the page ----------------------------------------------------------


def test_token_guards_the_api_but_not_the_page(models):
    with TestClient(create_app(models, token="s3cret", log=lambda line: None)) as client:
        assert_error(client.get("/v2/health/live"), 401, "Bearer")
        assert_error(client.get("/v2/models", headers={"Authorization": "Bearer nope"}), 401)
        assert_error(client.post("/predict", content=user_digit(1), headers={"Authorization": "Basic s3cret"}), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/v2/health/live", headers=ok).status_code == 200
        assert client.post("/predict", content=user_digit(1), headers=ok).status_code == 200
        assert client.get("/metrics", headers=ok).status_code == 200
        assert client.get("/").status_code == 200 and "<html" in client.get("/").text.lower()
        icon = client.get("/favicon.ico")  # every browser asks for it before it has a token
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
        assert Image.open(io.BytesIO(icon.content)).format == "ICO"


def test_a_trailing_slash_is_a_404_not_a_redirect(client):
    # a redirect's location would be built from the Host header the client sent
    for path in ("/v2/models/", "/v2/health/live/", "/predict/"):
        response = client.get(path, headers={"Host": "evil.test"}, follow_redirects=False)
        assert_error(response, 404, "not found")
        assert "location" not in response.headers


def test_short_tokens_are_refused_and_token_files_others_can_read_are_warned_of(capsys, monkeypatch, tmp_path):
    from image_logreg.errors import UsageError
    from image_logreg.serve.server import TOKEN_ENV, read_token

    short = tmp_path / "short"
    short.write_text("x\n")
    short.chmod(0o600)
    with pytest.raises(UsageError, match="a 1-character token is too short; use at least 16.*secrets.token_urlsafe"):
        read_token(str(short))
    monkeypatch.setenv(TOKEN_ENV, "abc")
    with pytest.raises(UsageError, match=f"\\${TOKEN_ENV}: a 3-character token"):
        read_token(None)
    monkeypatch.setenv(TOKEN_ENV, "a" * 16)
    assert read_token(None) == "a" * 16
    capsys.readouterr()

    good = tmp_path / "token"
    good.write_text("t" * 32 + "\n")
    good.chmod(0o600)
    assert read_token(str(good)) == "t" * 32 and capsys.readouterr().err == ""
    good.chmod(0o644)
    assert read_token(str(good)) == "t" * 32
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "can be read by other users" in err and "chmod 600" in err


def test_cors_is_closed_unless_an_origin_is_given(models):
    origin = {"Origin": "http://example.test"}
    with TestClient(create_app(models, log=lambda line: None)) as client:
        assert "access-control-allow-origin" not in client.get("/v2/health/live", headers=origin).headers
    with TestClient(create_app(models, cors_origins=["http://example.test"], log=lambda line: None)) as client:
        assert client.get("/v2/health/live", headers=origin).headers["access-control-allow-origin"] == "http://example.test"
        other = client.get("/v2/health/live", headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers


def test_metrics_count_requests_latency_and_images(client):
    client.post("/v2/models/plain/infer", json=infer_body(toy_images(3)))
    client.post("/predict?model=deskewed", content=user_digit(4))
    client.get("/v2/models/nope")
    text = client.get("/metrics").text
    assert 'image_logreg_requests_total{endpoint="/v2/models/{name}/infer",method="POST",status="200"} 1.0' in text
    assert 'image_logreg_requests_total{endpoint="/v2/models/{name}",method="GET",status="404"} 1.0' in text
    assert 'image_logreg_images_predicted_total{model="plain"} 3.0' in text
    assert 'image_logreg_images_predicted_total{model="deskewed"} 1.0' in text
    assert 'image_logreg_request_duration_seconds_count{endpoint="/predict"} 1.0' in text


def test_requests_refused_before_routing_are_counted_under_their_endpoint(models):
    """413 and 401 are sent before FastAPI routes the request; the metrics still name its route."""
    with TestClient(create_app(models, max_body=4096, token="t" * 16, log=lambda line: None)) as client:
        ok = {"Authorization": "Bearer " + "t" * 16}
        client.post("/v2/models/plain/infer", content=b"x" * 5000, headers=ok)
        client.post("/predict", content=b"x" * 5000, headers=ok)
        client.get("/v2/models/plain")
        client.get("/no/such/path", headers=ok)
        text = client.get("/metrics", headers=ok).text
    assert 'image_logreg_requests_total{endpoint="/v2/models/{name}/infer",method="POST",status="413"} 1.0' in text
    assert 'image_logreg_requests_total{endpoint="/predict",method="POST",status="413"} 1.0' in text
    assert 'image_logreg_requests_total{endpoint="/v2/models/{name}",method="GET",status="401"} 1.0' in text
    assert 'image_logreg_requests_total{endpoint="unmatched",method="GET",status="404"} 1.0' in text


def test_one_access_line_per_request(client):
    client.get("/v2/health/live")
    client.get("/v2/models/nope?x=1")
    assert len(client.log_lines) == 2
    assert '"GET /v2/health/live" 200' in client.log_lines[0]
    assert '"GET /v2/models/nope?x=1" 404' in client.log_lines[1]


def test_openapi_documents_the_typed_endpoints(client):
    schema = client.get("/openapi.json").json()
    assert {"/v2/health/live", "/v2/models/{name}/infer", "/predict", "/metrics"} <= set(schema["paths"])
    assert "InferenceRequest" in schema["components"]["schemas"]
    assert "RequestInput" in schema["components"]["schemas"]


# --- loading models ---------------------------------------------------------------------------


def test_model_names_come_from_the_spec_or_the_path(runs, tmp_path):
    from image_logreg.errors import UsageError
    from image_logreg.serve.registry import parse_model_spec

    assert parse_model_spec(f"digits={runs / 'plain'}") == ("digits", str(runs / "plain"))
    assert parse_model_spec(str(runs / "plain"))[0] == "plain"
    assert parse_model_spec(str(runs / "plain" / "model.safetensors"))[0] == "model"
    with pytest.raises(UsageError, match="two models are named 'plain'"):
        load_models([str(runs / "plain"), f"plain={runs / 'deskewed'}"])


def test_serve_refuses_bad_setups_with_one_line(capsys, runs, tmp_path):
    from test_cli import assert_one_line_error

    code, out, err = run_cli(capsys, "serve", runs / "plain", "--host", "0.0.0.0")
    assert_one_line_error(code, out, err, "--token-file", "--no-auth")
    code, out, err = run_cli(capsys, "serve", tmp_path / "missing")
    assert_one_line_error(code, out, err, "no such checkpoint")
    (tmp_path / "empty").write_text("\n")
    code, out, err = run_cli(capsys, "serve", runs / "plain", "--token-file", tmp_path / "empty")
    assert_one_line_error(code, out, err, "is empty")
    for flags, fragment in ((["--max-buffered", "1000", "--max-body", "2000"], "--max-buffered (1000 bytes) must be"),
                            (["--header-timeout", "0"], "--header-timeout must be a number of seconds above 0"),
                            (["--body-timeout", "nan"], "--body-timeout must be"),
                            (["--max-connections", "0"], "--max-connections must be at least 1"),
                            (["--port", "65536"], "--port must be 0 to 65535"), (["--port", "-1"], "--port must be 0 to 65535")):
        code, out, err = run_cli(capsys, "serve", runs / "plain", *flags)
        assert_one_line_error(code, out, err, fragment)


def test_a_colour_model_is_served_as_its_dataset_was_made(capsys, tmp_path):
    """A folder of red and blue images: infer takes 3 x H x W, /predict decodes and explains in colour."""
    for label, colour in (("blue", (20, 40, 230)), ("red", (230, 30, 20))):
        for i in range(6):
            noisy = np.clip(np.array(colour) + np.random.default_rng(i).integers(-20, 20, (8, 8, 3)), 0, 255)
            path = tmp_path / "shapes" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy.astype(np.uint8), "RGB").save(path)
    train(capsys, tmp_path / "shapes", tmp_path / "run", "--dataset", "folder", "--epochs", "20", "--cache-dir", tmp_path / "cache")
    models = load_models([f"colours={tmp_path / 'run'}"])
    with TestClient(create_app(models, log=lambda line: None)) as client:
        meta = client.get("/v2/models/colours").json()
        assert meta["inputs"][0]["shape"] == [-1, 3, 8, 8] and meta["parameters"]["classes"] == ["blue", "red"]
        red = np.zeros((1, 3, 8, 8), np.uint8)
        red[:, 0] = 230
        body = {"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": red.reshape(-1).tolist()}]}
        assert client.post("/v2/models/colours/infer", json=body).json()["outputs"][1]["data"] == [1]
        big_blue = png_bytes(np.tile(np.array([20, 40, 230], np.uint8), (40, 30, 1)))  # another size: resized as trained
        result = client.post("/predict?explain=true", content=big_blue).json()[0]
        assert result["label"] == "blue"
        assert np.array(result["seen"]).shape == (8, 8, 3) and np.array(result["evidence"]).shape == (8, 8)
        assert np.array(result["seen"])[..., 2].mean() > 150


def test_made_up_methods_add_no_metric_series(client):
    for i in range(5):
        client.request(f"BREW{i}", "/v2/health/live")
    text = client.get("/metrics").text
    assert "BREW" not in text and 'method="other",status="405"} 5.0' in text


# --- the hot routes: answered in front of FastAPI, alike ------------------------------------


def test_hot_routes_answer_as_the_fastapi_routes_do(models):
    """``infer`` and ``/predict`` are answered before FastAPI sees them; FastAPI's own routes for
    them (what the OpenAPI document describes) must give the same answers, errors included."""
    from image_logreg.serve.hot import HotRoutes

    served = create_app(models, log=lambda line: None)
    fastapi_only = served.app
    assert isinstance(fastapi_only, HotRoutes)
    requests = [
        ("post", "/v2/models/plain/infer", {"json": infer_body(toy_images(2), id="a")}),
        ("post", "/v2/models/deskewed/versions/1/infer", {"json": infer_body(toy_images(1), outputs=[{"name": "class_index"}])}),
        ("post", "/v2/models/plain/infer", {"json": infer_body(toy_images(1), datatype="FP32")}),
        ("post", "/v2/models/plain/infer", {"json": infer_body(toy_images(3), outputs=[{"name": "ood_score"}, {"name": "rejected"}])}),
        ("post", "/v2/models/plain/infer", {"json": {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": [True] * 784}]}}),
        ("post", "/v2/models/plain/infer", {"json": infer_body(toy_images(1)), "headers": {"Inference-Header-Content-Length": "10"}}),
        ("post", "/v2/models/nope/infer", {"json": infer_body(toy_images(1))}),
        ("post", "/v2/models/plain/versions/2/infer", {"json": infer_body(toy_images(1))}),
        ("post", "/v2/models/plain/infer", {"content": b"{not json"}),
        ("post", "/predict?top_k=2", {"content": user_digit(2)}),
        ("post", "/predict?model=deskewed&explain=true", {"content": png_bytes(toy_images(1)[0])}),
        ("post", "/predict", {"files": [("files", ("a.png", user_digit(1), "image/png")), ("files", ("b.png", user_digit(5), "image/png"))]}),
        ("post", "/predict", {"content": b"hello", "headers": {"Content-Type": "image/png"}}),
        ("post", "/predict?top_k=x", {"content": user_digit(1)}),
        ("post", "/predict", {"json": {"x": 1}}),
    ]
    with TestClient(served) as hot, TestClient(fastapi_only.app) as plain:
        for method, path, kwargs in requests:
            a, b = getattr(hot, method)(path, **kwargs), getattr(plain, method)(path, **kwargs)
            assert (a.status_code, a.json()) == (b.status_code, b.json()), path
            assert a.headers["content-type"] == "application/json"
        # paths the hot layer does not own still reach FastAPI: the method, an empty name
        assert_error(hot.get("/predict"), 405, "method GET")
        assert_error(hot.post("/v2/models//infer", json=infer_body(toy_images(1))), 404, "not found")


def test_a_bug_in_a_hot_route_is_a_logged_500_in_one_line(models, monkeypatch, caplog):
    from image_logreg.serve import app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module.Inference, "infer", broken)
    with TestClient(create_app(models, log=lambda line: None), raise_server_exceptions=False) as client:
        assert_error(client.post("/v2/models/plain/infer", json=infer_body(toy_images(1))), 500, "internal error")
    assert "a bug" in caplog.text


# --- knowing when it does not know: rejected and ood_score ----------------------------------


@pytest.fixture(scope="module")
def real_models(mnist_run, tmp_path_factory):
    """The real MNIST model, and the same weights as an old checkpoint (a tutorial state_dict),
    which has no novelty score."""
    from image_logreg.checkpoint import load_model

    model, _ = load_model(mnist_run)
    old = tmp_path_factory.mktemp("old") / "tutorial.pth"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, old)
    return load_models([f"mnist={mnist_run}", f"old={old}"])


@pytest.fixture
def real_client(real_models):
    with TestClient(create_app(real_models, log=lambda line: None)) as c:
        yield c


@pytest.fixture(scope="module")
def mnist_test_images(real_data) -> np.ndarray:
    from image_logreg.datasets import load_split

    return load_split("mnist", real_data, "test").images[:200].numpy()


def outputs_of(response) -> dict:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def noise_images(n: int) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (n, 28, 28)).astype(np.uint8)


def dot_png() -> bytes:
    """A tap on the page's pad: one round dot of its pen, dark on white."""
    yy, xx = np.mgrid[:280, :280]
    return png_bytes(np.where((yy - 140) ** 2 + (xx - 140) ** 2 <= 13**2, 0, 255).astype(np.uint8))


def test_metadata_lists_the_novelty_outputs_only_for_models_that_have_them(real_client, real_models):
    meta = real_client.get("/v2/models/mnist").json()
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "class_index", "datatype": "INT64", "shape": [-1]},
        {"name": "rejected", "datatype": "BOOL", "shape": [-1]},
        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
    ]
    model = real_models["mnist"].model
    assert meta["parameters"]["temperature"] == model.temperature != 1.0
    assert meta["parameters"]["novelty"] == {"threshold": model.novelty.threshold, "keep": model.novelty.keep}
    old = real_client.get("/v2/models/old").json()
    assert [o["name"] for o in old["outputs"]] == ["probabilities", "class_index"]
    assert old["parameters"]["novelty"] is None and old["parameters"]["temperature"] == 1.0


def test_infer_rejects_noise_and_accepts_mnist_digits(real_client, real_models, mnist_test_images):
    # without outputs named, the two a model always has; the novelty ones when asked for
    assert list(outputs_of(real_client.post("/v2/models/mnist/infer", json=infer_body(mnist_test_images[:2])))) == [
        "probabilities", "class_index"]
    digits = outputs_of(real_client.post("/v2/models/mnist/infer", json=infer_body(mnist_test_images, outputs=[{"name": n} for n in ("probabilities", "class_index", "rejected", "ood_score")])))
    assert list(digits) == ["probabilities", "class_index", "rejected", "ood_score"]
    rejected, scores = digits["rejected"], digits["ood_score"]
    assert rejected["datatype"] == "BOOL" and rejected["shape"] == [200] and {type(v) for v in rejected["data"]} == {bool}
    assert scores["datatype"] == "FP32" and scores["shape"] == [200]
    assert sum(rejected["data"]) <= 10  # the threshold keeps 99% of held-out digits
    served = real_models["mnist"]
    expected = served.model.novelty_scores(served.inputs(torch.from_numpy(mnist_test_images)))
    np.testing.assert_allclose(scores["data"], expected.numpy(), rtol=1e-5, atol=1e-5)
    assert rejected["data"] == [s > served.model.novelty.threshold for s in scores["data"]]

    noise = outputs_of(real_client.post("/v2/models/mnist/infer", json=infer_body(noise_images(16), outputs=[{"name": n} for n in ("probabilities", "class_index", "rejected", "ood_score")])))
    assert noise["rejected"]["data"] == [True] * 16
    assert min(noise["ood_score"]["data"]) > max(scores["data"])
    # the probabilities are still there: rejecting is the client's call to make
    assert noise["probabilities"]["shape"] == [16, 10]


def test_named_outputs_may_be_the_novelty_ones_alone(real_client, mnist_test_images):
    images = mnist_test_images[:3]
    everything = outputs_of(real_client.post("/v2/models/mnist/infer", json=infer_body(images, outputs=[{"name": n} for n in ("probabilities", "class_index", "rejected", "ood_score")])))
    named = real_client.post("/v2/models/mnist/infer",
                             json=infer_body(images, outputs=[{"name": "ood_score"}, {"name": "rejected"}]))
    assert list(outputs_of(named)) == ["ood_score", "rejected"]
    assert outputs_of(named)["ood_score"] == everything["ood_score"]
    fp32 = outputs_of(real_client.post("/v2/models/mnist/infer", json=infer_body(images / 255.0, "FP32", outputs=[{"name": n} for n in ("probabilities", "class_index", "rejected", "ood_score")])))
    assert fp32["rejected"] == everything["rejected"]
    np.testing.assert_allclose(fp32["ood_score"]["data"], everything["ood_score"]["data"], rtol=1e-4, atol=1e-4)


def test_a_model_without_novelty_answers_as_before(real_client, mnist_test_images):
    old = outputs_of(real_client.post("/v2/models/old/infer", json=infer_body(noise_images(2))))
    assert list(old) == ["probabilities", "class_index"]
    asked = real_client.post("/v2/models/old/infer", json=infer_body(noise_images(1), outputs=[{"name": "rejected"}]))
    assert_error(asked, 400, "unknown output 'rejected'", "probabilities, class_index", "no novelty score")
    assert_error(real_client.post("/v2/models/mnist/infer", json=infer_body(noise_images(1), outputs=[{"name": "ood"}])),
                 400, "unknown output 'ood'", "rejected, ood_score")
    entry = real_client.post("/predict?model=old", content=dot_png()).json()[0]
    assert "rejected" not in entry and "ood_score" not in entry


def test_predict_entries_say_whether_the_image_is_rejected(real_client, real_models, mnist_test_images):
    seven = mnist_test_images[0]  # a plain, upright 7, as a user would bring it: large, dark on white
    user_seven = png_bytes(np.asarray(Image.fromarray(255 - seven).resize((224, 224), Image.Resampling.BICUBIC)))
    files = [("files", ("seven.png", user_seven, "image/png")), ("files", ("dot.png", dot_png(), "image/png"))]
    entries = real_client.post("/predict?model=mnist", files=files).json()
    assert entries[0]["label"] == real_models["mnist"].classes[7]
    assert [e["rejected"] for e in entries] == [False, True]
    assert entries[0]["ood_score"] <= real_models["mnist"].model.novelty.threshold < entries[1]["ood_score"]
    explained = real_client.post("/predict?model=mnist&explain=true", files=files).json()
    for plain, why in zip(entries, explained):
        # the same image's score by the one-image path and the batch path: the same but for the last bits
        assert why["rejected"] == plain["rejected"] and why["ood_score"] == pytest.approx(plain["ood_score"], rel=1e-5, abs=1e-6)
        assert len(why["probabilities"]) == 10 and "evidence" in why

