"""uvicorn's HTTP protocols with the deadlines and the connection cap it lacks.

uvicorn closes a keep-alive connection only once it has answered a request on it: a connection
that never sends a request, stops halfway through its headers, or drips its body after being
answered is held for good. Each connection here has a deadline while it waits for its client
(the rest of a request's headers or body) and one timer, re-armed only when it fires before a
later deadline: the requests of a busy connection start no timers.
"""

from __future__ import annotations

import orjson

# The Guard answers a body that is too slow with a 408 within half a second of the body deadline
# (guard.SWEEP_SECONDS); the connection is closed this much later only where nobody is left to
# answer (a body still dripping after a 413).
BODY_GRACE_SECONDS = 1.0
HEAD, BODY, APP = "head", "body", "app"  # what a connection waits for: the client, or the app


class Deadlines:
    """Mixed into uvicorn's httptools or h11 protocol; the limits are set on the subclass.

    Where a request stands is read once after each read from the socket (a parser callback per
    step would cost more): on a busy keep-alive connection it stays ``APP`` and nothing changes.
    """

    header_timeout: float
    body_timeout: float
    max_connections: int | None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer = None
        self._deadline = None
        self._enter(HEAD)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self.app = too_many_connections  # this connection only: those already open carry on

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _enter(self, phase: str) -> None:
        self._phase = phase
        if phase is APP:  # the app's turn; between requests uvicorn's keep-alive timer takes over
            self._deadline = None
            return
        # A body still coming after its request was answered (a 413) has nobody left to send a 408.
        seconds = self.header_timeout if phase is HEAD else self.body_timeout + BODY_GRACE_SECONDS
        deadline = self._deadline = self.loop.time() + seconds
        if self._timer is not None and self._timer.when() > deadline:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        if self._deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:  # moved along since the timer was set
            self._timer = self.loop.call_at(self._deadline, self._on_deadline)
        else:
            self.transport.close()


def protocol_class(http: str, *, header_timeout: float, body_timeout: float, max_connections: int | None):
    """The protocol for ``--http`` (auto: httptools where installed) with these limits."""
    if http == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            http = "h11"
        else:
            http = "httptools"
    base = _httptools_protocol() if http == "httptools" else _h11_protocol()
    limits = {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_connections": max_connections}
    return type(base.__name__, (base,), limits)


def _httptools_protocol():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HttpTools(Deadlines, HttpToolsProtocol):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle = self.cycle  # the latest request whose headers are all in
            if cycle is None:
                phase = HEAD
            elif cycle.more_body:
                phase = BODY
            else:  # answered already, yet more bytes came: the next request's headers
                phase = HEAD if cycle.response_complete else APP
            if phase is not self._phase:
                self._enter(phase)

    return HttpTools


def _h11_protocol():
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11(Deadlines, H11Protocol):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            phase = HEAD if state is h11.IDLE else BODY if state is h11.SEND_BODY else APP
            if phase is not self._phase:
                self._enter(phase)

    return H11


async def too_many_connections(scope, receive, send) -> None:
    body = orjson.dumps({"error": "too many connections open at once; retry shortly"})
    await send({
        "type": "http.response.start",
        "status": 503,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"), (b"retry-after", b"1")],
    })
    await send({"type": "http.response.body", "body": body})
