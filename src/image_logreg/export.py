"""Export a model to run without image-logreg: ONNX (onnxruntime, any language) or TorchScript.

The exported graph takes the images as the dataset stores them (uint8, ``N x H x W``, or
``N x 3 x H x W`` for a colour model; any N, H and W the model's own),
applies the model's own preprocessing inside (deskewing for ``--deskew`` models, then
``x / 255``) and returns ``probabilities`` (``N x K``). It does not bring a user's file into the
dataset's form (a digit cropped, fitted to 20x20 and centred by mass): ``preprocess.prepare_image``
does, before the graph. Both formats trace the very functions
that training and ``evaluate`` run, so what a user feeds the file is what the model was
trained on; the checkpoint's metadata (classes, dataset, input shape, metrics) travels along.

With ``image_input`` (a digit-style model only), the graph takes gray uint8 images of any size
instead (``N x H x W``, a batch of one size) and brings each into the dataset's form itself, as
``prepare_image`` does (``export_digits``), before the same preprocessing; a blank page, which
``predict`` refuses, gets NaN probabilities.
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

from .data import decode_settings_of
from .errors import CheckpointError, UsageError
from .files import atomic_path
from .model import LogisticRegression

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "input", "probabilities", "batch"
# With image_input: the user's gray image, any size, normalised as a digit inside the graph.
IMAGE_INPUT_NAME, IMAGE_AXES = "image", ("height", "width")
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


class ImageInputModel(nn.Module):
    """Gray uint8 images ``N x H x W`` of any size in, probabilities ``N x K`` out: each image made a
    digit in the dataset's form as ``prepare_image`` makes a file (``export_digits``), then ``ExportedModel``.
    A blank image's row is NaN, where ``predict`` says "blank image: no ink found"."""

    def __init__(self, model: LogisticRegression, preprocessing: dict | None):
        super().__init__()
        from .export_digits import DigitNormalization

        self.normalization = DigitNormalization(tuple(model.input_shape))
        self.classify = ExportedModel(model, preprocessing)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        digits, blank = self.normalization(images)
        return torch.where(blank[:, None], torch.nan, self.classify(digits))


def check_image_input(model: LogisticRegression, meta: dict) -> None:
    """Refuse ``image_input`` for a model whose files are not normalised as digits, as ``predict`` tells."""
    dataset = meta.get("dataset", "unknown")
    if decode_settings_of(meta.get("preprocessing")) is not None:
        raise UsageError(
            f"--image-input is for digit-style models, whose files are normalised as MNIST digits; this {dataset} "
            "model resizes files as its dataset's own were, so export it without --image-input"
        )
    if len(model.input_shape) != 2:
        raise UsageError(f"--image-input makes gray digits, but this {dataset} model takes {list(model.input_shape)} images")


def input_spec(meta: dict, image_input: bool = False) -> dict:
    """The exported file's input: name, dtype and shape (named axes for the free ones)."""
    if image_input:
        return {"name": IMAGE_INPUT_NAME, "dtype": "uint8", "shape": [BATCH_AXIS, *IMAGE_AXES]}
    return {"name": INPUT_NAME, "dtype": "uint8", "shape": [BATCH_AXIS, *meta["input_shape"]]}


def export_model(
    model: LogisticRegression, meta: dict, path: str | os.PathLike, format: str = "onnx", image_input: bool = False
) -> Path:
    """Write ``model`` (with its checkpoint ``meta``) to ``path`` as ``format``, atomically;
    with ``image_input``, taking gray images of any size (see ``ImageInputModel``)."""
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    # A copy, so exporting never moves or alters the caller's model; frozen, so a loaded
    # TorchScript module returns plain tensors, as an inference file should.
    copied = copy.deepcopy(model).cpu()
    if image_input:
        check_image_input(model, meta)
        wrapper = ImageInputModel(copied, meta.get("preprocessing"))
        # Not the model's own size, so no shape in the trace can pass for a constant of it.
        example = torch.zeros((2, 3 * model.input_shape[0] + 1, 2 * model.input_shape[1] + 3), dtype=torch.uint8)
    else:
        wrapper = ExportedModel(copied, meta.get("preprocessing"))
        example = torch.zeros((2, *model.input_shape), dtype=torch.uint8)
    wrapper = wrapper.eval().requires_grad_(False)
    spec = input_spec(meta, image_input)
    path = Path(path)
    with atomic_path(path) as tmp:
        if format == "onnx":
            _write_onnx(wrapper, example, tmp, meta, spec)
        else:
            # The file's own input travels with it where it is not the dataset's images.
            _write_torchscript(wrapper, example, tmp, {**meta, "input": spec} if image_input else meta)
    return path


def metadata_props(meta: dict, spec: dict | None = None) -> dict[str, str]:
    """The checkpoint's metadata as ONNX metadata_props: one JSON document per key."""
    props = {key: json.dumps(value) for key, value in meta.items()}
    props["input"] = json.dumps(spec or input_spec(meta))
    props["output"] = json.dumps({"name": OUTPUT_NAME, "shape": [BATCH_AXIS, meta["num_classes"]]})
    return props


def _write_onnx(wrapper: nn.Module, example: torch.Tensor, tmp: Path, meta: dict, spec: dict) -> None:
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
                input_names=[spec["name"]], output_names=[OUTPUT_NAME],
                dynamic_axes={spec["name"]: _free_axes(spec), OUTPUT_NAME: {0: BATCH_AXIS}},
            )
        except Exception as exc:  # a torch without this exporter, or one that cannot write opset 20
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"ONNX export failed with torch {torch.__version__} ({reason})") from None
    graph = onnx.load(str(tmp))
    graph.doc_string = f"image-logreg: {meta.get('dataset', 'unknown dataset')} logistic regression"
    for key, value in metadata_props(meta, spec).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(tmp))


def _free_axes(spec: dict) -> dict[int, str]:
    return {axis: name for axis, name in enumerate(spec["shape"]) if isinstance(name, str)}


def _write_torchscript(wrapper: nn.Module, example: torch.Tensor, tmp: Path, meta: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        # Through memory: saved to a path, the archive's inner folder would take the temporary name.
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta)})
    tmp.write_bytes(buffer.getvalue())
