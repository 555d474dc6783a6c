"""What every request passes through before and after the routes: the token, the body limit,
the access log line and the metrics. Written as plain ASGI, since it runs on every request."""

from __future__ import annotations

import hmac
import sys
import time

import orjson

from .metrics import Metrics

# The page and its files hold no data; the browser must be able to fetch them before it has a token.
OPEN_PATHS = ("/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


class Guard:
    def __init__(self, app, *, metrics: Metrics, token: str | None, max_body: int, log=None):
        self.app = app
        self.metrics = metrics
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.log = log if log is not None else _stderr_line

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [0]

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.token and not _is_open(scope["path"]) and not self._authorized(scope):
                await send_error(tracked_send, 401, "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                                 [(b"www-authenticate", b"Bearer")])
                return
            body = await self._read_body(scope, receive, tracked_send)
            if body is None:
                return
            await self.app(scope, _replay(body, receive), tracked_send)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "unmatched")
            self.metrics.observe(endpoint, scope["method"], status[0], seconds)
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            query = f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
            self.log(f'{where} "{scope["method"]} {scope["path"]}{query}" {status[0]} {seconds * 1000:.1f} ms')

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None once a 413 is sent: nothing past the limit is read or kept."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                await send_error(send, 413, f"request body of {int(value)} bytes is over the limit of {self.max_body}")
                return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await send_error(send, 413, f"request body is over the limit of {self.max_body} bytes")
                return None
            if not message.get("more_body", False):
                return bytes(body)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client to disconnect

    return replay


async def send_error(send, status: int, message: str, headers: list | None = None) -> None:
    await send_json(send, status, {"error": message}, headers)


async def send_json(send, status: int, content, headers: list | None = None) -> None:
    body = orjson.dumps(content)
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
