"""What every request passes through before and after the routes: the token, the body limit,
the access log line and the metrics. Written as plain ASGI, since it runs on every request."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import time

import orjson
from starlette.routing import Match

from ..console import say
from .metrics import Metrics

# The page and its files hold no data; the browser must be able to fetch them before it has a token.
OPEN_PATHS = ("/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
# The body deadlines are checked by one timer for all requests, every half second at most
# (less for short deadlines), so a 408 comes at most that late.
SWEEP_SECONDS = 0.5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Guard:
    def __init__(self, app, *, metrics: Metrics, token: str | None, max_body: int, body_timeout: float | None = None,
                 max_buffered: int | None = None, log=None):
        """A request's whole body must arrive within ``body_timeout`` seconds (else 408), and the
        bodies of all requests in flight may hold ``max_buffered`` bytes together (else 503);
        None: no such limit."""
        self.app = app
        self.metrics = metrics
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.log = log if log is not None else say
        self.body_timeout = body_timeout
        self.max_buffered = max_buffered
        self.buffered = 0  # bytes of request bodies held by requests in flight, all together
        self._deadlines: dict[asyncio.Task, float] = {}
        self._timed_out: set[asyncio.Task] = set()
        self._sweeping = False
        self._routes = None


    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [0]
        body = None

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
            if body:
                self.buffered -= len(body)
            seconds = time.perf_counter() - start
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or self._endpoint_of(scope)
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
        """The whole body, counted in ``buffered`` until the request ends; or None once an error
        is sent or the client has gone: nothing past a limit is read or kept."""
        has_body = False
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                length = int(value)
                if length > self.max_body:
                    await send_error(send, 413, f"request body of {length} bytes is over the limit of {self.max_body}")
                    return None
                if self.max_buffered is not None and self.buffered + length > self.max_buffered:
                    await send_error(send, 503, self._busy_message(), RETRY_SOON)
                    return None
                has_body = has_body or length > 0
            elif name == b"transfer-encoding":
                has_body = True
        body = await self._receive_body(receive, has_body)
        if isinstance(body, tuple):
            await send_error(send, *body)
            return None
        return body

    async def _receive_body(self, receive, has_body: bool):
        """The body, None if the client left, or the (status, message, headers) of an error."""
        task = None
        if has_body and self.body_timeout is not None:  # without a body, the server has the whole request
            task = asyncio.current_task()
            self._deadlines[task] = time.monotonic() + self.body_timeout
            if not self._sweeping:
                self._sweep_soon()
        body = bytearray()
        complete = False
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                if self.max_buffered is not None and self.buffered + len(chunk) > self.max_buffered:
                    return 503, self._busy_message(), RETRY_SOON
                self.buffered += len(chunk)
                body += chunk
                if len(body) > self.max_body:
                    return 413, f"request body is over the limit of {self.max_body} bytes", None
                if not message.get("more_body", False):
                    complete = True
                    return bytes(body)
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise
            self._timed_out.discard(task)
            task.uncancel()
            # The rest of the body may never come: the connection cannot carry another request.
            return 408, f"request body not complete within {self.body_timeout:g} s", [(b"connection", b"close")]
        finally:
            if task is not None:
                self._deadlines.pop(task, None)
            if not complete:
                self.buffered -= len(body)

    def _busy_message(self) -> str:
        return f"the server holds too many request bodies at once (over {self.max_buffered} bytes); retry shortly"

    def _sweep_soon(self) -> None:
        self._sweeping = True
        asyncio.get_running_loop().call_later(min(SWEEP_SECONDS, self.body_timeout / 10), self._sweep)

    def _sweep(self) -> None:
        """Cancels the body reads past their deadline; their requests answer 408 (see _receive_body)."""
        now = time.monotonic()
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[task]
                self._timed_out.add(task)
                task.cancel()
        self._sweeping = False
        if self._deadlines:
            self._sweep_soon()

    def _endpoint_of(self, scope) -> str:
        """The route template of a request answered before routing (401, 408, 413, 503), for the metrics."""
        path = scope["path"]
        if path.startswith("/static/"):
            return "/static"
        if self._routes is None:
            self._routes = _routes_behind(self.app)
        for route in self._routes:
            if route.matches(scope)[0] is not Match.NONE:
                return route.path
        return "unmatched"


RETRY_SOON = [(b"retry-after", b"1")]


def _routes_behind(app) -> list:
    while app is not None and not hasattr(app, "router"):
        app = getattr(app, "app", None)
    return [route for route in app.router.routes if hasattr(route, "path")] if app is not None else []


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
