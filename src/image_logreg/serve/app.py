"""The HTTP API: the Open Inference Protocol for programs, /predict for image files, the page.

Every answer a client can cause is a 2xx, or a 4xx with ``{"error": "..."}``.
"""

from __future__ import annotations

import ctypes
import functools
from importlib import resources
from urllib.parse import quote

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from .. import __version__
from ..errors import ImageError, ImageTooLargeError
from ..predict import explain, predict_file
from ..images import header_size, too_many_pixels
from ..settings import MAX_PIXELS
from . import protocol
from .feedback import Feedback, register_feedback_routes
from .guard import Guard
from .hot import HotRoutes, read_body
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (ErrorResponse, InferenceRequest, InferenceResponse, JSONResponse, ModelMetadata, ProtocolError, ServerMetadata,
                       predict_options)
from .registry import VERSION, ServedModel

MAX_BODY = 8 * 1024 * 1024
MAX_IMAGES = 1024
# Decoding a large photo takes a lot of memory for a moment; as many at once as there are cores.
DECODE_SLOTS = 2
# A few images this small (a drawing, a dataset sample) decode in well under a millisecond.
INLINE_PIXELS = 512 * 512
INLINE_IMAGES = 4
# The images of one request may hold this many times --max-pixels together (header sizes): a few
# photos, or every one of --max-images drawings, but never so much that one request holds a
# decode slot for more than a few seconds while other uploads wait for it.
REQUEST_PIXELS_FACTOR = 4
# glibc keeps what a decoding thread frees in that thread's arena, so after a large decode the
# server's memory would stay high for good; past this many pixels a request hands it back.
TRIM_AFTER_PIXELS = 4_000_000
STATIC = resources.files("image_logreg.serve") / "static"
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415)}


def create_app(
    models: dict[str, ServedModel],
    *,
    token: str | None = None,
    max_body: int = MAX_BODY,
    max_images: int = MAX_IMAGES,
    max_pixels: int = MAX_PIXELS,
    body_timeout: float | None = None,
    max_buffered: int | None = None,
    cors_origins: list[str] | None = None,
    feedback: Feedback | None = None,
    log=None,
) -> Guard:
    """The ASGI application serving ``models``. ``token`` set: every API request needs it.
    ``max_pixels``: the largest image decoded; a request's images may hold ``REQUEST_PIXELS_FACTOR``
    times that together. ``body_timeout`` and ``max_buffered``: see ``Guard`` (None: no limit).
    ``feedback``: where corrections go and which models learn from them (None: none are taken)."""
    metrics = Metrics()
    app = FastAPI(
        # a redirect for a trailing slash would build its URL from the client's Host header
        title="image-logreg", version=__version__, docs_url=None, redoc_url=None, redirect_slashes=False,
        default_response_class=JSONResponse,
        description="Image classification with logistic regression: the Open Inference Protocol (v2) and image files.",
    )
    inference = Inference(models, metrics, max_images, max_pixels)
    _add_error_handlers(app)
    register_upload_routes(app, inference)
    register_oip_routes(app, inference)
    register_operations_routes(app, metrics)
    register_feedback_routes(app, inference, feedback, token=bool(token))
    register_page_routes(app)  # last: it mounts /static
    _document_request_schema(app)

    routes = {route.name: route for route in app.routes if getattr(route, "name", None) in HotRoutes.NAMES}
    guarded = Guard(HotRoutes(app, inference, routes), metrics=metrics, token=token, max_body=max_body,
                    body_timeout=body_timeout, max_buffered=max_buffered, log=log)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        return CORSMiddleware(guarded, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                              allow_headers=["Authorization", "Content-Type"])
    return guarded


# --- the routes, one function per protocol ------------------------------------------------


def register_upload_routes(app: FastAPI, inference: "Inference") -> None:
    """``POST /predict``: image files in, what ``predict --json`` prints out."""

    @app.post("/predict", responses=ERRORS, tags=["images"], openapi_extra={"parameters": PREDICT_PARAMETERS})
    async def predict(request: Request) -> list[dict]:
        """Image files as multipart field ``files``, or one image as the raw body: what ``predict --json`` prints."""
        content_type = request.headers.get("content-type", "")
        return JSONResponse(await inference.predict(request.query_params, content_type, request.scope, request.receive))


def register_oip_routes(app: FastAPI, inference: "Inference") -> None:
    """The Open Inference Protocol (v2): infer, health, server and model metadata, readiness."""
    infer_doc = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}}},
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
    }
    versioned_infer_doc = dict(infer_doc, parameters=[
        *infer_doc["parameters"], {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}])

    @app.post("/v2/models/{name}/infer", response_model=InferenceResponse, responses=ERRORS, openapi_extra=infer_doc,
              tags=["inference"], name="infer")
    @app.post("/v2/models/{name}/versions/{version}/infer", response_model=InferenceResponse, responses=ERRORS,
              openapi_extra=versioned_infer_doc, tags=["inference"], name="versioned_infer")
    async def infer(request: Request):
        """One tensor named ``input``: ``[N, *input_shape]``, UINT8 (0-255) or FP32 (0-1)."""
        if "inference-header-content-length" in request.headers:  # the binary tensor extension's JSON + bytes body
            raise ProtocolError("binary tensor data is not supported; send JSON data (binary_data=False)")
        name, version = request.path_params["name"], request.path_params.get("version")
        return JSONResponse(inference.infer(name, version, await request.body()))

    @app.get("/v2/health/live", tags=["health"])
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"])
    async def ready() -> dict:
        return {"ready": True}  # models are loaded before the server accepts connections

    @app.get("/v2", response_model=ServerMetadata, tags=["metadata"])
    async def server_metadata():
        return {"name": "image-logreg", "version": __version__, "extensions": []}

    @app.get("/v2/models", tags=["metadata"])
    async def list_models() -> dict:
        """Every served model's metadata, in the order given to ``serve``."""
        return {"models": [inference.metadata(name) for name in inference.models]}

    @app.get("/v2/models/{name}", response_model=ModelMetadata, responses=ERRORS, tags=["metadata"])
    @app.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS, tags=["metadata"])
    async def model_metadata(name: str, version: str | None = None):
        return inference.metadata(name, version)

    @app.get("/v2/models/{name}/ready", responses=ERRORS, tags=["health"])
    @app.get("/v2/models/{name}/versions/{version}/ready", responses=ERRORS, tags=["health"])
    async def model_ready(name: str, version: str | None = None) -> dict:
        inference.model(name, version)
        return {"name": name, "ready": True}


def register_operations_routes(app: FastAPI, metrics: Metrics) -> None:
    """``GET /metrics`` for Prometheus."""

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def register_page_routes(app: FastAPI) -> None:
    """The page for people (``/``), its icon and its static files."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # every browser asks for it, whatever the page links
        return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")


class Inference:
    """What ``infer`` and ``/predict`` do, apart from the web framework: both the FastAPI routes
    and ``HotRoutes`` (which answers them in front of FastAPI, for speed) call these."""

    def __init__(self, models: dict[str, ServedModel], metrics: Metrics, max_images: int, max_pixels: int = MAX_PIXELS):
        self.models = models
        self.metrics = metrics
        self.max_images = max_images
        self.max_pixels = max_pixels
        self.decode_slots = anyio.CapacityLimiter(DECODE_SLOTS)
        self.feedback = None  # set with the feedback route (``feedback``)
        self.learners = {}  # name: OnlineLearner, for the models that learn from corrections

    def model(self, name: str, version: str | None = None) -> ServedModel:
        if name not in self.models:
            raise ProtocolError(f"unknown model {name!r}; this server has {', '.join(self.models)}", 404)
        if self.learners and name in self.learners:
            learner = self.learners[name]
            served = learner.served(version)
            if served is None:
                raise ProtocolError(f"model {name!r} has versions {', '.join(learner.versions())}, not {version!r}", 404)
            return served
        if version not in (None, "", VERSION):
            raise ProtocolError(f"model {name!r} has version {VERSION} only, not {version!r}", 404)
        return self.models[name]

    def metadata(self, name: str, version: str | None = None) -> dict:
        """The model's protocol metadata: every version it answers for, and whether it takes corrections."""
        metadata = self.model(name, version).metadata()
        if name in self.learners:
            metadata["versions"] = self.learners[name].versions()
        if self.feedback is not None:
            metadata["parameters"]["feedback"] = self.feedback.describe(name)
        return metadata

    def infer(self, name: str, version: str | None, body: bytes) -> dict:
        model = self.model(name, version)
        images, outputs, request_id = protocol.decode_request(body, model, self.max_images)
        # Small and quick: answered on the event loop, where a thread hand-off would cost more.
        response = protocol.infer(model, images, outputs, request_id)
        self.metrics.predicted(name, len(images))
        return response

    async def predict(self, query, content_type: str, scope, receive) -> list[dict]:
        """One entry per file, as ``predict --json`` prints them: a prediction, or ``{source, error}``.

        Sizes are read from the headers first: a file over ``max_pixels`` is refused unread, and a
        request whose other files hold too many pixels together is refused whole (413). With no file
        predicted the answer is the error alone: 413 if every file was too large, else 422.
        """
        model, top_k, normalize, explain_, filename = predict_options(query)
        chosen = self.model(model if model is not None else next(iter(self.models)))
        uploads = await _uploads(content_type, scope, receive, filename, self.max_images)
        sizes = [header_size(data) for _, data in uploads]
        refused = self._oversized(uploads, sizes)
        pixels = self._request_pixels(sizes, refused)
        too_large = set(refused)  # positions of the files refused for their size, decoded or not

        def run() -> list[dict]:
            answers = []
            for i, (name, data) in enumerate(uploads):
                if i in refused:
                    answers.append(refused[i])
                    continue
                try:
                    result, image = predict_file(chosen.model, chosen.meta, data, top_k, normalize=normalize, name=name,
                                                 max_pixels=self.max_pixels)
                except ImageError as exc:
                    answers.append({"source": name, "error": str(exc)})
                    if isinstance(exc, ImageTooLargeError):
                        too_large.add(i)
                    continue
                if explain_:
                    result.update(explain(chosen.model, torch.from_numpy(image)[None], chosen.meta)[0])
                answers.append(result)
            if pixels > TRIM_AFTER_PIXELS:
                release_memory()
            return answers

        if len(refused) == len(uploads):  # nothing to decode: no need to wait for a decode slot
            raise _nothing_predicted(list(refused.values()), all_too_large=True)
        if len(uploads) <= INLINE_IMAGES and all(_is_small(size) for i, size in enumerate(sizes) if i not in refused):
            answers = run()  # quicker than a thread hand-off, and too short to hold other requests up
        else:
            answers = await anyio.to_thread.run_sync(run, limiter=self.decode_slots)
        predicted = sum(1 for answer in answers if "error" not in answer)
        if not predicted:
            raise _nothing_predicted(answers, all_too_large=len(too_large) == len(answers))
        self.metrics.predicted(chosen.name, predicted)
        return answers

    def _oversized(self, uploads: list[tuple[str, bytes]], sizes: list) -> dict[int, dict]:
        """The error entry of each file whose header states more than ``max_pixels``, by position."""
        return {
            i: {"source": name, "error": too_many_pixels(name, size, self.max_pixels)}
            for i, ((name, _), size) in enumerate(zip(uploads, sizes))
            if size is not None and size[0] * size[1] > self.max_pixels
        }

    def _request_pixels(self, sizes: list, refused: dict[int, dict]) -> int:
        """The pixels the files to decode hold together, as their headers state; 413 over the budget."""
        total = sum(size[0] * size[1] for i, size in enumerate(sizes) if size is not None and i not in refused)
        budget = REQUEST_PIXELS_FACTOR * self.max_pixels
        if total > budget:
            raise ProtocolError(f"the images in this request hold {total:,} pixels together; the limit is {budget:,} "
                                f"({REQUEST_PIXELS_FACTOR} x --max-pixels): send them in several requests", 413)
        return total


def _nothing_predicted(answers: list[dict], all_too_large: bool) -> ProtocolError:
    first = answers[0]["error"]
    message = first if len(answers) == 1 else f"none of the {len(answers)} images could be used; the first: {first}"
    return ProtocolError(message, 413 if all_too_large else 422)


def release_memory() -> None:
    """Hand the memory that decoding freed back to the system (glibc only; elsewhere nothing to do)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: musl, macOS and Windows have no malloc_trim
        return None


# The query parameters of /predict, read by hand like the infer route's (see there), documented here.
PREDICT_PARAMETERS = [
    {"name": "model", "in": "query", "schema": {"type": "string"}, "description": "served model name (default: the first)"},
    {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 3},
     "description": "probabilities to return per image"},
    {"name": "normalize", "in": "query", "schema": {"type": "boolean", "default": True},
     "description": "MNIST-style normalisation of the image, as `predict` does"},
    {"name": "explain", "in": "query", "schema": {"type": "boolean", "default": False},
     "description": "add all probabilities, what the model saw and each pixel's evidence"},
    {"name": "filename", "in": "query", "schema": {"type": "string"}, "description": "the name to report as `source` for a raw body"},
]
async def _uploads(content_type: str, scope, receive, filename: str | None, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded image: multipart ``files``, or the raw body as one image."""
    content_type = content_type.split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await Request(scope, receive).form(max_files=max_images + 1, max_fields=max_images + 16, max_part_size=MAX_BODY)
        except MultiPartException as exc:
            status = 413 if "Too many" in str(exc) or "exceeded" in str(exc) else 400
            raise ProtocolError(f"multipart body refused: {exc}", status) from None
        files = [f for f in form.getlist("files") if not isinstance(f, str)]
        if not files:
            raise ProtocolError("no image files: send them as multipart form field 'files'")
        if len(files) > max_images:
            raise ProtocolError(f"{len(files)} images in one request; the limit is {max_images}", 413)
        return [(f.filename or f"files[{i}]", await f.read()) for i, f in enumerate(files)]
    if content_type.startswith(("image/", "application/octet-stream")) or not content_type:
        body = await read_body(receive)
        if not body:
            raise ProtocolError("empty body: send an image file as the body, or files as multipart field 'files'")
        return [(filename or "upload", body)]
    raise ProtocolError(
        f"content type {content_type!r} is not an image; send image/*, application/octet-stream or multipart/form-data", 415
    )


def _is_small(size: tuple[int, int] | None) -> bool:
    """Whether the image's header promises a small image (no header: it fails fast anyway)."""
    return size is None or size[0] * size[1] <= INLINE_PIXELS


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": "one line"}`` with its status."""

    @app.exception_handler(ProtocolError)
    async def protocol_error(request, exc: ProtocolError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(ImageError)
    async def image_error(request, exc: ImageError):
        return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, ImageTooLargeError) else 400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid value')}"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = {404: f"not found: {quote(request.url.path)}", 405: f"method {request.method} not allowed here"}
        return JSONResponse({"error": message.get(exc.status_code, str(exc.detail))}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):  # a bug, never the client's doing: logged in full
        return JSONResponse({"error": "internal error; the server log has the details"}, status_code=500)


def _document_request_schema(app: FastAPI) -> None:
    """The infer body is decoded by hand (for speed); its schema still belongs in the OpenAPI document."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            defs = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.pop("$defs", {}))
            components["InferenceRequest"] = defs
        return app.openapi_schema

    app.openapi = openapi


