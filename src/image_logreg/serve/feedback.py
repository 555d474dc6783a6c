"""Corrections: ``POST /v2/models/NAME/feedback`` (``serve --feedback-dir DIR`` or ``--learn``).

A correction is an image and its right class. It is stored as a dataset sample, the image as
the model saw it, in ``FOLDER/<class>/<time>-<hash>.png`` (``learn.class_folder`` names the
class folders; ``image-logreg learn`` reads them back), with the file that was uploaded, if
any, in ``FOLDER/.uploads/<class>/`` (hidden, so the folder still reads as a dataset). Files
are written whole under a temporary name and linked into place: nothing is ever replaced.
With ``--learn`` the served model then learns the image (``learning``).

Writes are bounded: ``--max-feedback`` samples in all, ``--feedback-rate`` per client and
minute, and a client on another machine needs the server's token (a server without one
takes corrections from this machine only).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import orjson
import torch
from fastapi import FastAPI, Request
from PIL import Image
from pydantic import BaseModel, Field

from ..errors import UsageError
from ..files import write_new
from ..images import image_format
from ..lineage import class_folder, class_of_folder
from ..data import to_uint8
from ..predict import explain, predict_images, prepare_file
from . import protocol
from .guard import is_loopback
from .protocol import ErrorResponse, JSONResponse, ProtocolError, RequestInput, predict_options
from .registry import ServedModel

MAX_FEEDBACK = 10_000
FEEDBACK_RATE = 30.0  # corrections per client and minute; as many at once
# An uploaded file is kept beside its sample up to this size: a drawing from the page is a few
# KB, a phone photo several MB, and the folder should stay within --max-feedback x this.
MAX_ORIGINAL = 1024 * 1024
UPLOADS = ".uploads"
FOLDER_NAME = "feedback"
# Rate buckets kept at once; past this the longest-idle client's is dropped (it starts afresh,
# and --max-feedback still bounds what all clients store together).
MAX_CLIENTS = 4096
_FORMAT_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 429, 507)}


class FeedbackRequest(BaseModel):
    inputs: list[RequestInput] = Field(description="one tensor named 'input' holding one image, as for infer")
    label: int | str = Field(examples=[3], description="the right class: its index, or its name")


class FeedbackResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the version serving now (it goes up with each correction learnt)")
    versions: list[str]
    label: str
    class_index: int
    stored: str = Field(description="the sample, relative to the feedback folder")
    original: str | None = Field(description="the uploaded file, relative to the feedback folder (None: none kept)")
    stored_count: int
    max_feedback: int
    learning: bool = Field(description="whether this server learns (serve --learn) or only stores")
    steps: int = Field(description="gradient steps this correction took (0: already answered so, or not learning)")
    answered: bool = Field(description="whether the model serving now answers the image as corrected")
    rolled_back: dict[str, Any] | None = Field(description="set when the check after this correction rolled the model back")
    result: dict[str, Any] = Field(description="the image's prediction now, as /predict gives it")


class RateLimit:
    """A token bucket per client address: ``per_minute`` a minute, at most that many at once."""

    def __init__(self, per_minute: float, clock=time.monotonic):
        self.capacity = max(1.0, per_minute)
        self.per_second = per_minute / 60
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client: (tokens, when)
        self._lock = threading.Lock()

    def wait(self, client: str) -> float:
        """0 and one correction taken from ``client``'s allowance, or the seconds until it has one."""
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.pop(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - then) * self.per_second)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.per_second
            self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)
            return wait


class FeedbackStore:
    """One model's corrections, a folder laid out as a dataset."""

    def __init__(self, folder: Path, classes: list[str], clock=None):
        self.folder = Path(folder)
        self.classes = classes
        self.clock = clock or (lambda: datetime.now(timezone.utc))

    def count(self) -> int:
        """The samples in the folder now: files in its class folders."""
        if not self.folder.is_dir():
            return 0
        total = 0
        for entry in os.scandir(self.folder):
            if entry.is_dir() and not entry.name.startswith(".") and class_of_folder(self.classes, entry.name) is not None:
                total += sum(1 for e in os.scandir(entry.path) if e.is_file() and not e.name.startswith("."))
        return total

    def save(self, image: np.ndarray, label: int, original: bytes | None) -> tuple[Path, Path | None]:
        """Write the sample (``image``: uint8 H x W or 3 x H x W) and the ``original`` file, if any;
        their paths. Neither replaces a file: a name taken gets ``-2``, ``-3``... added."""
        png = _png(image)
        digest = hashlib.sha256(png + (original or b"")).hexdigest()[:12]
        now = self.clock()
        stem = f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{digest}"
        folder = class_folder(self.classes, label)
        sample = write_new(self.folder / folder / f"{stem}.png", png)
        kept = None
        if original is not None and len(original) <= MAX_ORIGINAL:
            kept = write_new(self.folder / UPLOADS / folder / f"{sample.stem}{_suffix(original)}", original)
        return sample, kept


def _png(image: np.ndarray) -> bytes:
    pixels = np.ascontiguousarray(image.transpose(1, 2, 0) if image.ndim == 3 else image)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L").save(buf, format="PNG")
    return buf.getvalue()


def _suffix(data: bytes) -> str:
    # decoded already by then; whatever its header says now, the bytes are kept
    return _FORMAT_SUFFIXES.get(image_format(data), ".bin")


class Feedback:
    """A server's corrections: each model's store and (with --learn) its learner, and the limits."""

    def __init__(self, stores: dict[str, FeedbackStore], learners: dict[str, Any] | None = None, *,
                 max_feedback: int = MAX_FEEDBACK, rate: float = FEEDBACK_RATE, clock=time.monotonic):
        self.stores = stores
        self.learners = learners or {}
        self.max_feedback = max_feedback
        self.rate = RateLimit(rate, clock)
        self.stored = sum(store.count() for store in stores.values())
        self._lock = threading.Lock()
        # a correction waits for the one before it on the event loop, not in a blocked thread
        self.learning_slots = {name: anyio.CapacityLimiter(1) for name in self.learners}

    def describe(self, name: str) -> dict | None:
        """What the model's metadata says about its corrections (None: it takes none)."""
        return {"learn": name in self.learners} if name in self.stores else None

    def reserve(self) -> bool:
        with self._lock:
            if self.stored >= self.max_feedback:
                return False
            self.stored += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.stored -= 1


def folders_for(models: dict[str, ServedModel], feedback_dir: str | None) -> dict[str, Path]:
    """Each model's feedback folder: ``--feedback-dir`` (``DIR/NAME`` for several models), else beside
    its checkpoint: ``RUN/feedback`` for a run, ``<stem>-feedback`` beside a lone file."""
    folders = {}
    for name, served in models.items():
        if feedback_dir:
            folder = Path(feedback_dir) / name if len(models) > 1 else Path(feedback_dir)
        elif (served.path.parent / "config.json").is_file():
            folder = served.path.parent / FOLDER_NAME
        else:
            folder = served.path.with_name(f"{served.path.stem}-{FOLDER_NAME}")
        folders[name] = folder
    return folders


def check_folder(folder: Path, name: str) -> None:
    """The folder can take files, and is nowhere inside the installed package."""
    package = Path(__file__).resolve().parents[1]
    resolved = folder.resolve()
    if resolved == package or package in resolved.parents:
        raise UsageError(f"model {name}: its feedback folder {folder} would be inside the image_logreg package; "
                         "give --feedback-dir DIR elsewhere")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"model {name}: cannot make its feedback folder {folder} ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"model {name}: cannot write to its feedback folder {folder}")


def setup_feedback(models: dict[str, ServedModel], *, learn: bool = False, feedback_dir: str | None = None,
                   max_feedback: int | None = None, rate: float | None = None, max_drop: float | None = None,
                   data_dir=None, log=None) -> Feedback | None:
    """The server's feedback, from the ``serve`` flags; None when neither --learn nor --feedback-dir."""
    if not learn and not feedback_dir:
        for flag, value in (("--max-feedback", max_feedback), ("--feedback-rate", rate), ("--max-drop", max_drop),
                            ("--data-dir", data_dir)):
            if value is not None:
                raise UsageError(f"{flag} is about corrections, which this server does not take: add --feedback-dir DIR "
                                 "or --learn")
        return None
    if not learn and (max_drop is not None or data_dir is not None):
        raise UsageError(f"{'--max-drop' if max_drop is not None else '--data-dir'} is for --learn, which this server "
                         "is not given: corrections are only stored")
    if max_feedback is not None and max_feedback < 1:
        raise UsageError(f"--max-feedback must be at least 1, got {max_feedback}")
    if rate is not None and not rate > 0:
        raise UsageError(f"--feedback-rate must be a number of corrections per minute above 0, got {rate}")
    if max_drop is not None and not max_drop >= 0:
        raise UsageError(f"--max-drop must be a number of accuracy points of at least 0, got {max_drop}")
    folders = folders_for(models, feedback_dir)
    for name, folder in folders.items():
        check_folder(folder, name)
    learners = {}
    if learn:
        from ..errors import ImageLogregError
        from .learning import CHECK_EVERY, MAX_DROP, OnlineLearner

        for name, served in models.items():
            try:
                learners[name] = OnlineLearner.from_run(served, data_dir=data_dir,
                                                        max_drop=MAX_DROP if max_drop is None else max_drop, log=log)
            except ImageLogregError as exc:
                raise UsageError(f"--learn: model {name} needs its run's training split (to replay) and test split "
                                 f"(to check each {CHECK_EVERY} corrections), and cannot read them: {exc}; "
                                 "serve it with --feedback-dir alone to store corrections without learning") from None
    stores = {name: FeedbackStore(folder, served.classes) for (name, served), folder in zip(models.items(), folders.values())}
    return Feedback(stores, learners, max_feedback=MAX_FEEDBACK if max_feedback is None else max_feedback,
                    rate=FEEDBACK_RATE if rate is None else rate)


# --- the route --------------------------------------------------------------------------------

FEEDBACK_PARAMETERS = [
    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "label", "in": "query", "schema": {"type": "string"},
     "description": "with an image file as the body: the right class, its index or its name"},
    {"name": "normalize", "in": "query", "schema": {"type": "boolean", "default": True},
     "description": "with an image file: MNIST-style normalisation, as /predict does"},
    {"name": "filename", "in": "query", "schema": {"type": "string"}, "description": "the image file's name"},
    {"name": "top_k", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 3},
     "description": "probabilities in the result"},
    {"name": "explain", "in": "query", "schema": {"type": "boolean", "default": False},
     "description": "add all probabilities, what the model saw and each pixel's evidence to the result"},
]


def register_feedback_routes(app: FastAPI, inference, feedback: Feedback | None, *, token: bool = False) -> None:
    """``POST /v2/models/{name}/feedback`` on ``app``; with ``feedback`` None it answers 404, saying
    how to turn corrections on. ``token``: whether the server has one (then the Guard checked it)."""

    inference.feedback = feedback
    if feedback is not None:
        inference.learners = feedback.learners
    doc = {
        "parameters": FEEDBACK_PARAMETERS,
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        }},
    }

    @app.post("/v2/models/{name}/feedback", response_model=FeedbackResponse, responses=_ERRORS, openapi_extra=doc,
              tags=["feedback"], name="feedback")
    async def post_feedback(request: Request):
        """A correction: an image and its right class. JSON (an ``input`` tensor of one image, as
        for infer, and ``label``) or an image file as the body (``?label=``). Stored; with
        ``serve --learn`` also learnt, and ``result`` is the image's answer from the new version."""
        if feedback is None:
            raise ProtocolError("this server takes no corrections: start it with --feedback-dir DIR to store them, "
                                "or --learn to learn from them too", 404)
        name = request.path_params["name"]
        served = inference.model(name)
        client = request.scope.get("client")
        host = client[0] if client else ""
        if not token and not is_loopback(host):
            return JSONResponse({"error": "corrections from another machine need a token: start the server with "
                                          "--token-file FILE (or $IMAGE_LOGREG_TOKEN)"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        wait = feedback.rate.wait(host)
        if wait > 0:
            return JSONResponse({"error": f"too many corrections from {host or 'this client'}: "
                                          f"{feedback.rate.capacity:g} a minute at most; retry in {wait:.0f} s"},
                                status_code=429, headers={"Retry-After": str(max(1, round(wait)))})
        _, top_k, normalize, explain_, filename = predict_options(request.query_params)
        image, original, label = await _correction(request, served, normalize, filename, inference)
        if not feedback.reserve():
            raise ProtocolError(f"the feedback folder holds {feedback.max_feedback} corrections, the most this server "
                                "stores (--max-feedback); move them into a run (image-logreg learn) and restart it", 429)
        stored_image = to_uint8(image).numpy()
        store = feedback.stores[name]
        try:
            sample, kept = await anyio.to_thread.run_sync(store.save, stored_image, label, original)
        except OSError as exc:
            feedback.release()
            raise ProtocolError(f"cannot store the correction: {exc.strerror or exc}", 507) from None
        learner = feedback.learners.get(name)
        update = None
        if learner is not None:
            update = await anyio.to_thread.run_sync(learner.learn, image, label, limiter=feedback.learning_slots[name])
        now = inference.model(name)
        batch = image[None]
        result = predict_images(now.model, batch, now.meta, [filename or "upload"], top_k)[0]
        if explain_:
            result.update(explain(now.model, batch, now.meta)[0])
        return JSONResponse({
            "model_name": name,
            "model_version": now.version,
            "versions": learner.versions() if learner is not None else [now.version],
            "label": served.classes[label],
            "class_index": label,
            "stored": sample.relative_to(store.folder).as_posix(),
            "original": kept.relative_to(store.folder).as_posix() if kept is not None else None,
            "stored_count": feedback.stored,
            "max_feedback": feedback.max_feedback,
            "learning": learner is not None,
            "steps": update.steps if update else 0,
            "answered": int(result["top_k"][0]["index"]) == label,
            "rolled_back": update.rolled_back if update else None,
            "result": result,
        })

    _document_feedback_schema(app)


def _document_feedback_schema(app: FastAPI) -> None:
    """The body is read by hand, as infer's is; its schema still belongs in the OpenAPI document."""
    build = app.openapi

    def openapi():
        schema = build()
        defs = FeedbackRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.pop("$defs", {}))
        components["FeedbackRequest"] = defs
        return schema

    app.openapi = openapi


async def _correction(request: Request, served: ServedModel, normalize: bool, filename: str | None, inference):
    """(the image as the model takes it, the uploaded file or None, the class index) from the request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    # Only types a browser sends cross-site after asking (CORS) are taken: a page elsewhere
    # cannot post a correction as a form, as text, or as a body without a type.
    if kind == "application/json":
        images, _, _ = protocol.decode_request(body, served, 1)
        label = _label(orjson.loads(body).get("label"), served.classes)  # decode_request parsed it already
        if bool((images[0] == images[0].flatten()[0]).all()):  # as a file with no ink is refused by prepare_file
            raise ProtocolError("blank image: all its pixels have the same value, so it holds nothing to learn")
        return images[0], None, label
    if kind.startswith("image/") or kind == "application/octet-stream":
        label = _label(request.query_params.get("label"), served.classes)
        if not body:
            raise ProtocolError("empty body: send the image file as the body, its class as ?label=")
        name = filename or "upload"
        image = await anyio.to_thread.run_sync(
            lambda: prepare_file(served.model, served.meta, body, normalize, name, inference.max_pixels),
            limiter=inference.decode_slots)
        return torch.from_numpy(np.array(image)), body, label  # a copy: the decoder's pixels may be read-only
    raise ProtocolError(f"content type {kind or '(none)'!r} is not taken here: send JSON (an input tensor and a label) "
                        "or an image file as the body (image/* or application/octet-stream) with ?label=", 415)


def _label(given, classes: list[str]) -> int:
    """A class index from an index (number or digits) or a class name, as folders name classes."""
    if isinstance(given, int) and not isinstance(given, bool):
        if 0 <= given < len(classes):
            return given
    elif isinstance(given, str) and given:
        index = class_of_folder(classes, given)
        if index is not None:
            return index
    shown = "none" if given is None else repr(given)[:60]
    raise ProtocolError(f"label: {shown} is no class of this model; give the index 0..{len(classes) - 1} or a class "
                        f"name ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})")
