"""`image-logreg serve` as a real process on 127.0.0.1: start-up, a standard protocol client, shutdown."""

import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from test_serve import runs, user_digit  # noqa: F401  (the module fixture)

START_LIMIT = 60  # seconds for the server to load its models and answer


class Server:
    """``image-logreg serve ... --port 0`` in a child process; always stopped by the fixture."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "image_logreg", "serve", *map(str, args), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.banner = []
        deadline = time.monotonic() + START_LIMIT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.banner.append(line)
            if line.startswith("serving "):
                self.url = line.split(" at ")[1].split()[0]
                return
        self.stop()
        raise AssertionError(f"server did not start: {''.join(self.banner)} {self.proc.stderr.read()}")

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://").rstrip("/")

    def stop(self, sig=signal.SIGTERM, timeout=20) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def server(runs):  # noqa: F811
    s = Server(f"plain={runs / 'plain'}", runs / "deskewed")
    yield s
    s.stop()


def test_banner_names_the_url_and_every_model(server, runs):  # noqa: F811
    assert server.url.startswith("http://127.0.0.1:")
    text = "".join(server.banner)
    assert "model plain: mnist, 10 classes" in text and "model deskewed: mnist" in text
    with urllib.request.urlopen(server.url + "v2/health/ready", timeout=10) as response:
        assert response.status == 200


def test_a_standard_open_inference_protocol_client_works_unchanged(server, runs):  # noqa: F811
    httpclient = pytest.importorskip("tritonclient.http")
    from image_logreg import load_model, to_float

    client = httpclient.InferenceServerClient(server.address, connection_timeout=10, network_timeout=10)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("plain")
    assert client.get_server_metadata()["name"] == "image-logreg"
    assert client.get_model_metadata("deskewed")["inputs"][0]["shape"] == [-1, 28, 28]

    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    tensor = httpclient.InferInput("input", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=False)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "class_index")]
    result = client.infer("plain", [tensor], outputs=outputs, request_id="7")
    model, _ = load_model(runs / "plain")
    expected = model.predict_proba(to_float(__import__("torch").from_numpy(images))).numpy()
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("class_index"), expected.argmax(1))
    assert result.get_response()["id"] == "7"
    with pytest.raises(httpclient.InferenceServerException, match="unknown model"):
        client.infer("nope", [tensor])
    client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_lets_requests_in_flight_finish(server, sig):
    # Enough large drawings to keep the server busy for a while after the signal.
    files = [("files", (f"{i}.png", user_digit(i % 10), "image/png")) for i in range(300)]
    import httpx

    answer = {}

    def post():
        answer["response"] = httpx.post(server.url + "predict", files=files, timeout=60)

    thread = threading.Thread(target=post)
    thread.start()
    time.sleep(0.5)  # the upload is in and being predicted
    code, err = server.stop(sig)
    thread.join(60)
    assert answer["response"].status_code == 200 and len(answer["response"].json()) == 300
    assert code == 0 and "server stopped" in err and "Traceback" not in err
    assert '"POST /predict" 200' in err  # the access line


def test_port_in_use_is_one_line(capsys, server, runs):  # noqa: F811
    from conftest import run_cli
    from test_cli import assert_one_line_error

    port = server.address.rsplit(":", 1)[1]
    code, out, err = run_cli(capsys, "serve", runs / "plain", "--port", port)
    assert_one_line_error(code, out, err, f"cannot listen on 127.0.0.1:{port}")


def test_listening_socket_is_tcp_so_responses_are_not_delayed():
    # asyncio disables Nagle's algorithm only on sockets created as IPPROTO_TCP; on others every
    # keep-alive response would wait for the client's delayed ACK (40 ms).
    import socket

    from image_logreg.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname()[:2], timeout=5)
        accepted, _ = sock.accept()
        assert accepted.proto == socket.IPPROTO_TCP
        client.close()
        accepted.close()
    finally:
        sock.close()
