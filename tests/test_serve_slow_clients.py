"""Slow, idle and greedy clients against a real server on 127.0.0.1: every connection is let go
in time, and past the caps new requests get a 503. Short limits keep the tests quick; every
socket has its own timeout, so no test can hang."""

import json
import socket
import time
import urllib.request

import pytest

from test_serve import runs  # noqa: F401  (the module fixture)
from test_serve_process import Server

HEADER_S, BODY_S, KEEP_ALIVE_S = 2.0, 2.0, 1.0
MAX_CONNECTIONS, MAX_BODY, MAX_BUFFERED = 4, 200_000, 300_000
SLACK_S = 1.5  # a busy 2-core machine: the server's timers may fire a little late
SOCKET_S = 10.0  # no single read or write waits longer than this


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(runs, request):  # noqa: F811
    """Each HTTP parser keeps the limits in its own way (serve/connections.py)."""
    s = Server(f"plain={runs / 'plain'}", "--header-timeout", HEADER_S, "--body-timeout", BODY_S,
               "--keep-alive", KEEP_ALIVE_S, "--max-connections", MAX_CONNECTIONS, "--max-body", MAX_BODY,
               "--max-buffered", MAX_BUFFERED, "--http", request.param)
    yield s
    s.stop()


def connect(server) -> socket.socket:
    host, port = server.address.rsplit(":", 1)
    assert host == "127.0.0.1"
    return socket.create_connection((host, int(port)), timeout=SOCKET_S)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One response with a Content-Length body: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def get(sock: socket.socket, path: str = "/v2/health/live") -> tuple[int, dict, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return read_response(sock)


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"", every: float = 0.2, limit: float = 10.0):
    """Sends ``trickle`` every ``every`` seconds until the server answers or closes: (seconds, what it
    sent, or None if it only closed). Bounded by ``limit``."""
    start = time.monotonic()
    received = b""
    sock.settimeout(every)
    while time.monotonic() - start < limit:
        try:
            if trickle:
                sock.sendall(trickle)
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    else:
        pytest.fail(f"the connection was still open after {limit} s")
    return time.monotonic() - start, received or None


def assert_408_or_closed(answer: bytes | None):
    if answer is not None:
        status, _, body = read_response(_Replay(answer))
        assert status == 408 and "not complete within 2 s" in json.loads(body)["error"]


class _Replay:
    """What was received, read again as a socket."""

    def __init__(self, data: bytes):
        self.data = data

    def recv(self, n: int) -> bytes:
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def metric(server, endpoint: str, method: str, status: int) -> float:
    with urllib.request.urlopen(server.url + "metrics", timeout=SOCKET_S) as response:
        text = response.read().decode()
    series = f'image_logreg_requests_total{{endpoint="{endpoint}",method="{method}",status="{status}"}} '
    for line in text.splitlines():
        if line.startswith(series):
            return float(line.removeprefix(series))
    return 0.0


def test_a_chunked_body_that_never_ends_is_cut_off(server):
    before = metric(server, "/v2/models/{name}/infer", "POST", 408)
    with connect(server) as sock:
        sock.sendall(b"POST /v2/models/plain/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        seconds, answer = seconds_until_closed(sock, trickle=b"1\r\n[\r\n")
    assert BODY_S - 0.2 <= seconds <= BODY_S + SLACK_S
    assert_408_or_closed(answer)
    assert metric(server, "/v2/models/{name}/infer", "POST", 408) == before + 1


def test_a_body_at_a_few_bytes_a_second_is_cut_off(server):
    with connect(server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        seconds, answer = seconds_until_closed(sock, trickle=b"x", every=0.5)
    assert BODY_S - 0.2 <= seconds <= BODY_S + SLACK_S
    assert_408_or_closed(answer)


def test_a_body_still_coming_after_a_413_is_cut_off(server):
    # answered already, so no 408 can come: the connection is closed a little after the body deadline
    with connect(server) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        assert read_response(sock)[0] == 413
        seconds, answer = seconds_until_closed(sock, trickle=b"x")
    assert answer is None and seconds <= BODY_S + 1 + SLACK_S


def test_unfinished_headers_get_the_connection_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        seconds, answer = seconds_until_closed(sock, trickle=b"a")  # never the blank line that ends them
    assert answer is None and seconds <= HEADER_S + SLACK_S


def test_a_connection_that_never_sends_a_request_is_closed(server):
    with connect(server) as sock:
        seconds, answer = seconds_until_closed(sock)
    assert answer is None and HEADER_S - 0.2 <= seconds <= HEADER_S + SLACK_S


def test_an_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        assert get(sock)[0] == 200
        assert get(sock)[0] == 200  # still open after a request: keep-alive works
        seconds, answer = seconds_until_closed(sock)
    assert answer is None and seconds <= KEEP_ALIVE_S + SLACK_S


def test_past_the_connection_cap_new_requests_get_503(server):
    time.sleep(0.5)  # the connections of the tests before are gone
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            assert get(sock)[0] == 200
        with connect(server) as extra:
            status, headers, body = get(extra)
            assert status == 503 and headers["connection"] == "close"
            assert "too many connections" in json.loads(body)["error"]
        assert get(held[0])[0] == 200  # the connections already open are still served
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the server sees the closes a moment later
        with connect(server) as sock:
            if get(sock)[0] == 200:
                break
        assert time.monotonic() < deadline, "connections closed by the client still count against the cap"
        time.sleep(0.1)


def test_past_the_buffered_bytes_cap_a_new_big_body_gets_503(server):
    post = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
    with connect(server) as stalled:
        stalled.sendall(post % MAX_BODY + b"\0" * 150_000)  # then nothing: half a body held
        time.sleep(0.5)
        with connect(server) as big:
            big.sendall(post % MAX_BODY)
            status, headers, body = read_response(big)
        assert status == 503 and headers["retry-after"] == "1"
        assert "too many request bodies" in json.loads(body)["error"]
    time.sleep(0.5)  # the stalled request's bytes are let go when its client leaves
    with connect(server) as big:
        big.sendall(b"POST /v2/models/plain/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % MAX_BODY
                    + b"\0" * MAX_BODY)
        status, _, body = read_response(big)
    assert status == 400 and "JSON" in json.loads(body)["error"]  # read in full, then refused as not JSON
