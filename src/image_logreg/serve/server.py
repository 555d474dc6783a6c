"""``image-logreg serve``: load the models, bind, run uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import UsageError

TOKEN_ENV = "IMAGE_LOGREG_TOKEN"
# Requests in flight get this long to finish once a shutdown signal arrives.
GRACEFUL_SECONDS = 10


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str | None:
    """The token from ``--token-file``, else ``$IMAGE_LOGREG_TOKEN``, else None."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--token-file {token_file}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        if not token:
            raise UsageError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


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
    dataset: str | None = None,
    device: str = "auto",
    http: str = "auto",
    out=sys.stdout,
) -> None:
    """Serve ``specs`` (``NAME=PATH`` or ``PATH``) until interrupted; requests in flight finish."""
    import torch
    import uvicorn

    from ..train import resolve_device
    from .app import MAX_BODY, MAX_IMAGES, create_app
    from .registry import load_models

    token = read_token(token_file)
    check_exposure(host, token, no_auth)
    if max_body is not None and max_body < 1 or max_images is not None and max_images < 1:
        raise UsageError("--max-body and --max-images must be at least 1")
    models = load_models(specs, dataset=dataset, device=resolve_device(device))
    # Requests are small: one thread each answers faster than several sharing one product.
    torch.set_num_threads(1)
    app = create_app(models, token=token, max_body=max_body or MAX_BODY, max_images=max_images or MAX_IMAGES,
                     cors_origins=cors_origins)
    sock = bind(host, port)
    url = url_for(sock)
    for model in models.values():
        meta = model.meta
        print(f"model {model.name}: {meta.get('dataset')}, {len(model.classes)} classes, from {model.path}", file=out)
    print(f"serving {len(models)} model(s) at {url} (page: {url}, API: {url}v2){' with token' if token else ''}",
          file=out, flush=True)
    config = uvicorn.Config(app, http=http, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACEFUL_SECONDS)
    server = _graceful_server_class()(config)
    server.run(sockets=[sock])
    print(f"server stopped{' by ' + server.stopped_by if server.stopped_by else ''}", file=sys.stderr, flush=True)
