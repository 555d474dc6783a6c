"""``image-logreg serve``: load the models, bind, run uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import UsageError
from .guard import is_loopback

TOKEN_ENV = "IMAGE_LOGREG_TOKEN"
# Requests in flight get this long to finish once a shutdown signal arrives.
GRACEFUL_SECONDS = 10
# Slow or idle clients must not hold connections and memory for good. The body deadline is for a
# whole body of up to --max-body (8 MiB) over a slow uplink (about 1 Mbit/s); the buffered cap
# lets 16 such bodies be read at once, a few hundred MiB of server memory at most.
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 60.0
KEEP_ALIVE = 5.0
MAX_CONNECTIONS = 1000
MAX_BUFFERED = 128 * 1024 * 1024
TOKEN_MIN_LENGTH = 16
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))" > token.txt'


def read_token(token_file: str | None) -> str | None:
    """The token from ``--token-file``, else ``$IMAGE_LOGREG_TOKEN``, else None."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--token-file {token_file}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        if not token:
            raise UsageError(f"--token-file {token_file} is empty")
        check_token(token, f"--token-file {token_file}")
        warn_if_others_can_read(token_file)
        return token
    token = os.environ.get(TOKEN_ENV, "").strip() or None
    if token:
        check_token(token, f"${TOKEN_ENV}")
    return token


def check_token(token: str, where: str) -> None:
    """A short token is guessed quickly: the API answers each wrong one at once."""
    if len(token) < TOKEN_MIN_LENGTH:
        raise UsageError(f"{where}: a {len(token)}-character token is too short; use at least {TOKEN_MIN_LENGTH} "
                         f"characters, for example: {MAKE_TOKEN}")


def warn_if_others_can_read(token_file: str) -> None:
    try:
        mode = Path(token_file).stat().st_mode
    except OSError:
        return
    if mode & 0o044:
        print(f"warning: --token-file {token_file} can be read by other users; chmod 600 {token_file}",
              file=sys.stderr, flush=True)


def check_connection_limits(header_timeout: float, body_timeout: float, keep_alive: float, max_connections: int,
                            max_buffered: int, max_body: int) -> None:
    for flag, seconds in (("--header-timeout", header_timeout), ("--body-timeout", body_timeout),
                          ("--keep-alive", keep_alive)):
        if not seconds > 0:
            raise UsageError(f"{flag} must be a number of seconds above 0, got {seconds}")
    if max_connections < 1:
        raise UsageError(f"--max-connections must be at least 1, got {max_connections}")
    if max_buffered < max_body:
        raise UsageError(f"--max-buffered ({max_buffered} bytes) must be at least --max-body ({max_body} bytes), "
                         "or no body of the largest size could ever be read")


def check_exposure(host: str, token: str | None, no_auth: bool) -> None:
    """Anything beyond this machine needs a token, or the user's explicit --no-auth."""
    if token and no_auth:
        raise UsageError("--no-auth and a token (--token-file or $IMAGE_LOGREG_TOKEN) contradict each other")
    if not is_loopback(host) and not token and not no_auth:
        raise UsageError(
            f"--host {host} lets other machines in: give a token with --token-file FILE or ${TOKEN_ENV}, "
            "or pass --no-auth to serve without one"
        )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off only on sockets that
    # say they are TCP, and without that every keep-alive response waits 40 ms for an ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn, ending with status 0 once SIGINT or SIGTERM has let requests in flight finish.

        uvicorn raises the caught signal again after its graceful shutdown, which would kill
        the process by that signal; a finished, clean stop is not a failure.
        """

        stopped_by = ""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", [])
                if captured:
                    self.stopped_by = signal.Signals(captured[0]).name
                captured.clear()

    return GracefulServer


def serve(
    specs: list[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token_file: str | None = None,
    no_auth: bool = False,
    cors_origins: list[str] | None = None,
    max_body: int | None = None,
    max_images: int | None = None,
    max_pixels: int | None = None,
    dataset: str | None = None,
    device: str = "auto",
    http: str = "auto",
    header_timeout: float | None = None,
    body_timeout: float | None = None,
    keep_alive: float | None = None,
    max_connections: int | None = None,
    max_buffered: int | None = None,
    learn: bool = False,
    feedback_dir: str | None = None,
    max_feedback: int | None = None,
    feedback_rate: float | None = None,
    max_drop: float | None = None,
    data_dir: str | None = None,
    out=sys.stdout,
) -> None:
    """Serve ``specs`` (``NAME=PATH`` or ``PATH``) until interrupted; requests in flight finish.
    ``learn`` ... ``max_drop``: corrections (``feedback``), stored and, with ``learn``, learnt from."""
    import torch
    import uvicorn

    from ..train import resolve_device
    from .app import MAX_BODY, MAX_IMAGES, MAX_PIXELS, create_app
    from .connections import protocol_class
    from .feedback import setup_feedback
    from .registry import load_models

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0 to 65535 (0 picks a free port), got {port}")
    token = read_token(token_file)
    check_exposure(host, token, no_auth)
    if any(limit is not None and limit < 1 for limit in (max_body, max_images, max_pixels)):
        raise UsageError("--max-body, --max-images and --max-pixels must be at least 1")
    header_timeout = HEADER_TIMEOUT if header_timeout is None else header_timeout
    body_timeout = BODY_TIMEOUT if body_timeout is None else body_timeout
    keep_alive = KEEP_ALIVE if keep_alive is None else keep_alive
    max_connections = MAX_CONNECTIONS if max_connections is None else max_connections
    max_buffered = MAX_BUFFERED if max_buffered is None else max_buffered
    check_connection_limits(header_timeout, body_timeout, keep_alive, max_connections, max_buffered,
                            max_body or MAX_BODY)
    models = load_models(specs, dataset=dataset, device=resolve_device(device))
    feedback = setup_feedback(models, learn=learn, feedback_dir=feedback_dir, max_feedback=max_feedback,
                              rate=feedback_rate, max_drop=max_drop, data_dir=data_dir)
    # Requests are small: one thread each answers faster than several sharing one product.
    torch.set_num_threads(1)
    app = create_app(models, token=token, max_body=max_body or MAX_BODY, max_images=max_images or MAX_IMAGES,
                     max_pixels=max_pixels or MAX_PIXELS, body_timeout=body_timeout, max_buffered=max_buffered,
                     cors_origins=cors_origins, feedback=feedback)
    sock = bind(host, port)
    url = url_for(sock)
    for model in models.values():
        meta = model.meta
        print(f"model {model.name}: {meta.get('dataset')}, {len(model.classes)} classes, from {model.path}", file=out)
        if feedback is not None:
            print(_feedback_line(feedback, model.name), file=out)
    print(f"serving {len(models)} model(s) at {url} (page: {url}, API: {url}v2){' with token' if token else ''}",
          file=out, flush=True)
    protocol = protocol_class(http, header_timeout=header_timeout, body_timeout=body_timeout,
                              max_connections=max_connections)
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SECONDS, timeout_keep_alive=keep_alive)
    server = _graceful_server_class()(config)
    server.run(sockets=[sock])
    print(f"server stopped{' by ' + server.stopped_by if server.stopped_by else ''}", file=sys.stderr, flush=True)


def _feedback_line(feedback, name: str) -> str:
    folder = feedback.stores[name].folder
    learner = feedback.learners.get(name)
    if learner is None:
        return f"  corrections stored in {folder} (not learnt: --learn learns from them)"
    return (f"  corrections stored in {folder} and learnt: {learner.replay_size:,} training images replayed, "
            f"test accuracy {learner.baseline:.4f} checked every {learner.check_every} corrections "
            f"(rolled back past {learner.max_drop:g} points lower)")
