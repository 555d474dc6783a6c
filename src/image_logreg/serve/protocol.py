"""The Open Inference Protocol (v2, REST/JSON), as KServe, Triton and MLServer speak it.

The pydantic models describe the messages for the OpenAPI schema. Requests are decoded by
hand: a batch of 256 images is 200,000 numbers, which numpy takes in one call, while
validating them one by one would cost more than the model itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import torch
from fastapi.responses import Response
from pydantic import BaseModel, Field

from .registry import NOVELTY_OUTPUTS, OUTPUTS, ServedModel

INPUT_NAME = "input"
DATATYPES = {"UINT8": (0, 255), "FP32": (0.0, 1.0)}


class ProtocolError(Exception):
    """A request the protocol cannot answer; ``status`` is the HTTP status to send."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --- messages (for the schema) ---------------------------------------------------------------


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RequestInput(BaseModel):
    name: str = Field(examples=[INPUT_NAME])
    shape: list[int] = Field(examples=[[1, 28, 28]])
    datatype: str = Field(examples=["UINT8"], description="UINT8 (0-255) or FP32 (0-1)")
    data: list[Any] = Field(description="flat in row-major order, or nested lists")
    parameters: dict[str, Any] | None = None


class RequestOutput(BaseModel):
    name: str = Field(examples=[*OUTPUTS, *NOVELTY_OUTPUTS],
                      description="rejected and ood_score: only for models with a novelty score (see the model's outputs)")
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float | int | bool]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(BaseModel):
    error: str


# --- decoding and answering ------------------------------------------------------------------


def decode_request(body: bytes, served: ServedModel, max_images: int) -> tuple[torch.Tensor, list[str], Any]:
    """The request's images as a tensor (uint8, or float32 in [0, 1]), the outputs asked for, its id."""
    request = _json_object(body)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"'inputs' must be a list of one tensor named {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise ProtocolError(f"unknown input {tensor.get('name')!r}; this model takes one input named {INPUT_NAME!r}")
    _refuse_binary(tensor.get("parameters"), "input")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"datatype {datatype!r} is not accepted; send UINT8 (0-255) or FP32 (0-1)")
    shape = _shape(tensor.get("shape"), served, max_images)
    # JSON true/false would pass for 1/0 in the fast path below; a body without them holds none.
    images = _data(tensor.get("data"), shape, datatype, fast=b"true" not in body and b"false" not in body)
    return images, _requested_outputs(request.get("outputs"), served), request.get("id")


def _json_object(body: bytes) -> dict:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"request body is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(request, dict):
        raise ProtocolError("request body must be a JSON object with 'inputs'")
    _refuse_binary(request.get("parameters"), "request")
    return request


def _refuse_binary(parameters, where: str) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{where} 'parameters' must be a JSON object")
    if parameters.get("binary_data_size") is not None or parameters.get("binary_data_output"):
        raise ProtocolError("binary tensor data is not supported; send JSON data (binary_data=False)")


def _shape(shape, served: ServedModel, max_images: int) -> list[int]:
    expected = [-1, *served.input_shape]
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise ProtocolError(f"'shape' must be a list of integers like {expected}")
    if shape[1:] != served.input_shape or len(shape) != len(expected):
        raise ProtocolError(f"shape {shape} does not fit model {served.name!r}, which takes {expected}")
    if shape[0] < 1:
        raise ProtocolError(f"shape {shape} holds no images; the first dimension must be at least 1")
    if shape[0] > max_images:
        raise ProtocolError(f"{shape[0]} images in one request; the limit is {max_images}", status=413)
    return shape


def _data(data, shape: list[int], datatype: str, fast: bool = False) -> torch.Tensor:
    if not isinstance(data, list):
        raise ProtocolError("'data' must be a list of numbers (flat in row-major order, or nested)")
    if fast and datatype == "UINT8" and len(data) == int(np.prod(shape)):
        try:  # the usual request, flat whole numbers 0..255, in one C loop that also checks the range
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)
        except (TypeError, ValueError):
            pass  # nested, fractions, out of range or not numbers: the general path says which
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError("'data' is not a rectangular list of numbers") from None
    if array.dtype.kind not in "iuf":  # strings, booleans, nulls and objects
        raise ProtocolError(f"'data' must hold only numbers for {datatype}")
    if array.size != int(np.prod(shape)):
        raise ProtocolError(f"'data' holds {array.size} values but shape {shape} needs {int(np.prod(shape))}")
    low, high = DATATYPES[datatype]
    floats = array.dtype.kind == "f"  # integers need no check for NaN or fractions
    if floats and not np.isfinite(array).all() or array.min() < low or array.max() > high:
        raise ProtocolError(f"{datatype} values must lie in {low}..{high}")
    if datatype == "UINT8":
        if floats and not np.array_equal(array, np.round(array)):
            raise ProtocolError("UINT8 values must be whole numbers 0..255")
        return torch.from_numpy(array.astype(np.uint8).reshape(shape))
    return torch.from_numpy(array.astype(np.float32).reshape(shape))


def _requested_outputs(outputs, served: ServedModel) -> list[str]:
    if outputs is None:
        # rejected and ood_score are optional outputs, sent when named: scoring an image's novelty
        # costs half again what the single-image request costs without it
        return list(OUTPUTS)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    names = []
    for output in outputs:
        if output.get("name") not in served.outputs:
            raise ProtocolError(_unknown_output(output.get("name"), served))
        params = output.get("parameters")
        if isinstance(params, dict) and params.get("binary_data"):
            raise ProtocolError("binary tensor data is not supported; request outputs with binary_data=False")
        names.append(output["name"])
    return names


def _unknown_output(name, served: ServedModel) -> str:
    message = f"unknown output {name!r}; choose from {', '.join(served.outputs)}"
    if name in NOVELTY_OUTPUTS:
        message += f" (model {served.name!r} has no novelty score)"
    return message


def infer(served: ServedModel, images: torch.Tensor, outputs: list[str], request_id=None) -> dict:
    """The protocol's inference response for ``images`` (N x input shape)."""
    proba, scores, rejected = served.answer(images, novelty=any(name in NOVELTY_OUTPUTS for name in outputs))
    n = proba.shape[0]
    tensors = {
        "probabilities": lambda: {"name": "probabilities", "datatype": "FP32", "shape": list(proba.shape),
                                  "data": proba.reshape(-1).tolist()},
        "class_index": lambda: {"name": "class_index", "datatype": "INT64", "shape": [n],
                                "data": proba.argmax(dim=1).tolist()},
        "rejected": lambda: {"name": "rejected", "datatype": "BOOL", "shape": [n], "data": rejected.tolist()},
        "ood_score": lambda: {"name": "ood_score", "datatype": "FP32", "shape": [n], "data": scores.tolist()},
    }
    response = {"model_name": served.name, "model_version": served.version, "outputs": [tensors[name]() for name in outputs]}
    if request_id is not None:
        response["id"] = request_id
    return response


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content)


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def predict_options(query) -> tuple[str | None, int, bool, bool, str | None]:
    """``/predict``'s query (also the feedback route's): model, top_k, normalize, explain, filename."""
    given = query.get("top_k", "3")
    try:
        top_k = int(given)
    except ValueError:  # str.isdigit() would let '²' through to int()
        top_k = 0
    if top_k < 1:
        raise ProtocolError(f"top_k: must be a whole number of at least 1, got {given!r}")
    flags = []
    for name, default in (("normalize", True), ("explain", False)):
        value = query.get(name, str(default)).strip().lower()
        if value not in _TRUE | _FALSE:
            raise ProtocolError(f"{name}: must be true or false, got {query.get(name)!r}")
        flags.append(value in _TRUE)
    return query.get("model"), top_k, flags[0], flags[1], query.get("filename")
