"""The two routes that carry the load, answered straight from ASGI.

FastAPI's routing, parameter solving and response classes cost about 36 us a request: more
than a one-image inference (the model, the JSON and the checks) costs here. So ``POST
.../infer`` and ``POST /predict`` are matched and answered in this layer, in front of the
FastAPI app, which still declares both routes (the OpenAPI document describes them, and its
routes answer alike through the same ``Inference`` calls) and serves everything else.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl


from ..errors import ImageError, ImageTooLargeError
from .guard import send_json
from .protocol import ProtocolError

# What Starlette's "{name}" and "{version}" match: one path segment, not empty.
_INFER = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
log = logging.getLogger("image_logreg.serve")


class HotRoutes:
    NAMES = ("infer", "versioned_infer", "predict")

    def __init__(self, app, inference, routes: dict[str, object]):
        """``routes``: the FastAPI route objects of ``infer``, ``versioned_infer`` and ``predict``,
        set in the scope as Starlette would, so the metrics name the endpoint alike."""
        self.app = app
        self.inference = inference
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == "/predict":
            scope["route"] = self.routes["predict"]
            answer = self._predict(scope, receive)
        elif path.endswith("/infer") and (match := _INFER.fullmatch(path)):
            scope["route"] = self.routes["versioned_infer" if match["version"] is not None else "infer"]
            answer = self._infer(scope, receive, match["name"], match["version"])
        else:
            return await self.app(scope, receive, send)
        try:
            status, content = 200, await answer
        except ProtocolError as exc:
            status, content = exc.status, {"error": str(exc)}
        except ImageError as exc:
            status, content = 413 if isinstance(exc, ImageTooLargeError) else 400, {"error": str(exc)}
        except Exception:  # a bug, never the client's doing: logged in full, answered in one line
            log.exception("error answering %s %s", scope["method"], path)
            status, content = 500, {"error": "internal error; the server log has the details"}
        await send_json(send, status, content)

    async def _infer(self, scope, receive, name: str, version: str | None):
        headers = scope["headers"]
        if any(key == b"inference-header-content-length" for key, _ in headers):
            raise ProtocolError("binary tensor data is not supported; send JSON data (binary_data=False)")
        return self.inference.infer(name, version, await read_body(receive))

    async def _predict(self, scope, receive):
        content_type = b""
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
                break
        # what Starlette's QueryParams holds (the last of repeated names), without its multi-dict
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        return await self.inference.predict(query, content_type.decode("latin-1"), scope, receive)


async def read_body(receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body
