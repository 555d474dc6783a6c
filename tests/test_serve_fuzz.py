"""Whatever a client sends, the answer is a 2xx, or a 4xx with a one-line JSON error: never a 500."""

import json
from urllib.parse import quote

import pytest

hypothesis = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from image_logreg.serve import create_app, load_models  # noqa: E402
from test_serve import runs, user_digit  # noqa: E402,F401  (the module fixture)

FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)
shapes = st.lists(st.integers(-3, 40) | st.sampled_from([28, 2**40]) | json_scalars, max_size=4)
HEADER_CHARS = st.characters(min_codepoint=32, max_codepoint=126)  # what an HTTP client lets through
datatypes = st.sampled_from(["UINT8", "FP32", "INT64", "BYTES", "BOOL", "FP16"]) | st.text(max_size=6)


@st.composite
def tensors(draw):
    """Mostly well-formed inputs with one thing wrong, so the checks deep inside are reached too."""
    n = draw(st.integers(0, 3))
    shape = draw(st.sampled_from([[n, 28, 28], [n, 28, 28], [n, 784], [28, 28]]) | shapes)
    size = n * 784 if draw(st.booleans()) else draw(st.integers(0, 2000))
    value = draw(st.sampled_from([0, 255, 256, -1, 0.5, 1.0, float("nan"), "x", True, None, 1e300]))
    data = draw(st.sampled_from(["flat", "nested", "other"]))
    if data == "flat":
        data = [value] * size
    elif data == "nested":
        data = [[[value] * 28] * 28] * n
    else:
        data = draw(json_values)
    tensor = {"name": draw(st.sampled_from(["input", "input", "x"])), "shape": shape,
              "datatype": draw(datatypes), "data": data}
    if draw(st.booleans()):
        tensor["parameters"] = draw(json_values)
    body = {"inputs": [tensor] if draw(st.integers(0, 4)) else draw(json_values)}
    if draw(st.booleans()):
        body["outputs"] = draw(st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]), json_values), max_size=3)
                               | json_values)
    if draw(st.booleans()):
        body["id"] = draw(json_values)
    return body


@pytest.fixture(scope="module")
def client(runs):  # noqa: F811
    models = load_models([f"plain={runs / 'plain'}", f"deskewed={runs / 'deskewed'}"])
    with TestClient(create_app(models, token=None, max_images=2, log=lambda line: None), raise_server_exceptions=False) as c:
        yield c


def assert_handled(response):
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = json.loads(response.content)
        assert set(body) == {"error"} and isinstance(body["error"], str) and "\n" not in body["error"]


@FUZZ
@given(body=tensors(), model=st.sampled_from(["plain", "deskewed", "nope"]))
def test_infer_never_fails_on_structured_nonsense(client, body, model):
    assert_handled(client.post(f"/v2/models/{model}/infer", content=json.dumps(body, allow_nan=True)))


@FUZZ
@given(
    body=st.binary(max_size=2000),
    content_type=st.sampled_from(["application/json", "image/png", "multipart/form-data", "multipart/form-data; boundary=x",
                                  "text/plain", "", "application/octet-stream"]) | st.text(HEADER_CHARS, max_size=20),
    path=st.sampled_from(["/v2/models/plain/infer", "/predict", "/predict?top_k=2&normalize=false", "/predict?explain=true",
                          "/v2/models/plain/versions/1/infer", "/v2/models/plain/versions/x/infer"]),
    extra=st.dictionaries(st.sampled_from(["Authorization", "Inference-Header-Content-Length", "Accept", "X-Any"]),
                          st.text(HEADER_CHARS, max_size=20), max_size=2),
)
def test_any_bytes_under_any_headers(client, body, content_type, path, extra):
    headers = {"Content-Type": content_type, **extra} if content_type else extra
    assert_handled(client.post(path, content=body, headers=headers))


@FUZZ
@given(
    query=st.dictionaries(st.sampled_from(["model", "top_k", "normalize", "explain", "filename", "other"]),
                          st.text(max_size=10) | st.integers(-5, 20).map(str), max_size=4),
    files=st.lists(st.sampled_from(["digit", "bytes", "empty", "text-field"]), max_size=4),
    junk=st.binary(max_size=300),
)
def test_predict_with_any_query_and_uploads(client, query, files, junk):
    parts = []
    for i, kind in enumerate(files):
        if kind == "text-field":
            parts.append(("files", (None, "not a file")))
        else:
            data = {"digit": user_digit(i % 10), "bytes": junk, "empty": b""}[kind]
            parts.append(("files", (f"f{i}.png", data, "image/png")))
    response = client.post("/predict", params=query, files=parts) if parts else client.post("/predict", params=query, content=junk)
    assert_handled(response)


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.sampled_from(["/", "/v2", "/v2/models", "/v2/models/plain", "/v2/health/live", "/metrics", "/static/app.js",
                             "/static/../../etc/passwd", "/v2/models/%00", "/predict"])
       | st.text(max_size=30).map(lambda t: "/" + quote(t, safe="/?=&%")))
def test_any_method_on_any_path(client, method, path):
    response = client.request(method, path)
    if method == "HEAD":  # no body to read, by definition
        assert response.status_code < 500
    else:
        assert_handled(response)
