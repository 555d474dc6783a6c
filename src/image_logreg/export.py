"""Export a model to run without image-logreg: ONNX (onnxruntime, any language) or TorchScript.

The exported graph takes the images as the dataset stores them (uint8, ``N x H x W``, or
``N x 3 x H x W`` for a colour model; any N, H and W the model's own),
applies the model's own preprocessing inside (deskewing for ``--deskew`` models, then
``x / 255``) and returns ``probabilities`` (``N x K``). It does not bring a user's file into the
dataset's form (a digit cropped, fitted to 20x20 and centred by mass): ``preprocess.prepare_image``
does, before the graph. Both formats trace the very functions
that training and ``evaluate`` run, so what a user feeds the file is what the model was
trained on; the checkpoint's metadata (classes, dataset, input shape, metrics) travels along.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, UsageError
from .files import atomic_path
from .model import LogisticRegression

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "input", "probabilities", "batch"
# GridSample, which deskewing needs, entered ONNX in opset 16, but onnxruntime runs it in
# float64 (as deskew does for uint8 images) only from opset 20. In float32 its sampler and
# torch's differ in the last bits, enough to round a few pixels the other way.
OPSET = 20
# The TorchScript file's copy of the metadata, read back with torch.jit.load(_extra_files=...).
TORCHSCRIPT_METADATA = "image_logreg.json"


class ExportedModel(nn.Module):
    """uint8 images ``N x *input_shape`` in, probabilities ``N x K`` out, preprocessing included."""

    def __init__(self, model: LogisticRegression, preprocessing: dict | None):
        super().__init__()
        self.model = model
        self.temperature = float(model.temperature)  # calibrated probabilities, as predict gives them
        self.deskew = bool(preprocessing and preprocessing.get("deskew"))
        if self.deskew and len(model.input_shape) != 2:
            raise CheckpointError(f"deskewing needs H x W images, but the model takes {list(model.input_shape)}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.deskew:
            from .deskew import deskew_float

            # As data.prepare_inputs does: deskewed in float64, rounded back to pixel values.
            x = deskew_float(images.double()).round().clamp(0, 255).float()
        else:
            x = images.float()
        return F.softmax(self.model(x / 255.0) / self.temperature, dim=1)


def export_model(model: LogisticRegression, meta: dict, path: str | os.PathLike, format: str = "onnx") -> Path:
    """Write ``model`` (with its checkpoint ``meta``) to ``path`` as ``format``, atomically."""
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    # A copy, so exporting never moves or alters the caller's model; frozen, so a loaded
    # TorchScript module returns plain tensors, as an inference file should.
    wrapper = ExportedModel(copy.deepcopy(model).cpu(), meta.get("preprocessing")).eval().requires_grad_(False)
    example = torch.zeros((2, *model.input_shape), dtype=torch.uint8)
    path = Path(path)
    with atomic_path(path) as tmp:
        if format == "onnx":
            _write_onnx(wrapper, example, tmp, meta)
        else:
            _write_torchscript(wrapper, example, tmp, meta)
    return path


def metadata_props(meta: dict) -> dict[str, str]:
    """The checkpoint's metadata as ONNX metadata_props: one JSON document per key."""
    props = {key: json.dumps(value) for key, value in meta.items()}
    props["input"] = json.dumps({"name": INPUT_NAME, "dtype": "uint8", "shape": [BATCH_AXIS, *meta["input_shape"]]})
    props["output"] = json.dumps({"name": OUTPUT_NAME, "shape": [BATCH_AXIS, meta["num_classes"]]})
    return props


def _write_onnx(wrapper: ExportedModel, example: torch.Tensor, tmp: Path, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise UsageError("ONNX export needs the onnx package: pip install 'image-logreg[export]'") from None

    # The TorchScript-based exporter: it needs nothing beyond torch and onnx, works offline,
    # and traces this small graph exactly. Its deprecation notice is not the user's concern.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            )
        except Exception as exc:  # a torch without this exporter, or one that cannot write opset 20
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"ONNX export failed with torch {torch.__version__} ({reason})") from None
    graph = onnx.load(str(tmp))
    graph.doc_string = f"image-logreg: {meta.get('dataset', 'unknown dataset')} logistic regression"
    for key, value in metadata_props(meta).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(tmp))


def _write_torchscript(wrapper: ExportedModel, example: torch.Tensor, tmp: Path, meta: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        # Through memory: saved to a path, the archive's inner folder would take the temporary name.
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta)})
    tmp.write_bytes(buffer.getvalue())
