"""The models a server holds: loaded once at start, each under its name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_model, resolve_checkpoint
from ..data import DATASET_DECODE, prepare_inputs
from ..errors import UsageError
from ..model import LogisticRegression
from ..preprocess import PREPROCESSING, digit_box

VERSION = "1"  # the checkpoint as loaded; with serve --learn each correction makes the next (``learning``)
OUTPUTS = ("probabilities", "class_index")
# Only a model with a fitted novelty score (``confidence``) can say an input is unlike its data.
NOVELTY_OUTPUTS = ("rejected", "ood_score")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ServedModel:
    name: str
    model: LogisticRegression
    meta: dict
    path: Path
    version: str = VERSION
    classes: list[str] = field(init=False)
    outputs: tuple[str, ...] = field(init=False)  # the output tensors this model answers with

    def __post_init__(self):
        self.classes = list(self.meta["classes"])
        self.outputs = OUTPUTS + (NOVELTY_OUTPUTS if self.model.novelty is not None else ())

    @property
    def input_shape(self) -> list[int]:
        return list(self.model.input_shape)

    @property
    def deskew(self) -> bool:
        return bool((self.meta.get("preprocessing") or {}).get("deskew"))

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the model sees: uint8 0-255 or float 0-1 images, through its own preprocessing."""
        return prepare_inputs(images, self.meta.get("preprocessing"), self.model.device)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict_proba(self.inputs(images)).cpu()

    @torch.inference_mode()
    def answer(self, images: torch.Tensor, novelty: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Probabilities, and with ``novelty`` (where the model has it) each image's OOD score and
        whether it is rejected. The score costs more than the probabilities do for one image, so
        it is only computed when asked for."""
        x = self.inputs(images)
        if not novelty or self.model.novelty is None:
            return self.model.predict_proba(x).cpu(), None, None
        proba, scores = self.model.proba_and_novelty(x)
        return proba.cpu(), scores.cpu(), self.model.rejects(scores).cpu()

    def metadata(self) -> dict:
        """Open Inference Protocol model metadata, with the model's own facts as parameters.

        ``image_files`` says what an image file becomes before the model sees it, so the page
        can say so: ``name`` "dataset-decode" (resized as the dataset's own files were, with
        ``image_size`` [H, W], ``resize`` and ``color``) or a digit-style name (normalised as an
        MNIST digit: centred in ``image_size`` within a ``box`` pixels square, gray).
        """
        # Checkpoints from before image_files was recorded are all digit models.
        files = (self.meta.get("preprocessing") or {}).get("image_files") or {}
        if files.get("name") == DATASET_DECODE:
            image_files = {key: files[key] for key in ("name", "image_size", "resize", "color")}
        else:
            size = self.input_shape[-2:]
            name = files.get("name") or PREPROCESSING["name"]
            image_files = {"name": name, "image_size": size, "box": digit_box(size), "resize": None, "color": "gray"}
        k = len(self.classes)
        outputs = [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
        ]
        novelty = self.model.novelty
        if novelty is not None:
            outputs += [{"name": "rejected", "datatype": "BOOL", "shape": [-1]},
                        {"name": "ood_score", "datatype": "FP32", "shape": [-1]}]
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "image-logreg",
            "inputs": [{"name": "input", "datatype": "UINT8", "shape": [-1, *self.input_shape]}],
            "outputs": outputs,
            "parameters": {
                "dataset": self.meta.get("dataset"),
                "classes": self.classes,
                "input_shape": self.input_shape,
                "deskew": self.deskew,
                "metrics": self.meta.get("metrics"),
                "image_files": image_files,
                # probabilities are softmax(logits / temperature); an input scoring above the
                # threshold is rejected, and ``keep`` is the share of held-out images accepted
                "temperature": float(self.model.temperature),
                "novelty": None if novelty is None else {"threshold": novelty.threshold, "keep": novelty.keep},
            },
        }


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH``; without a name, the run directory's name or the file's stem."""
    name, sep, path = spec.partition("=")
    if not sep or not _NAME.match(name) or Path(spec).exists():
        path = spec
        resolved = Path(spec).resolve()
        name = resolved.name if resolved.is_dir() else resolved.stem
    if not _NAME.match(name):
        raise UsageError(f"model name {name!r} (from {spec}) must be letters, digits, '.', '_' or '-'; write NAME=PATH")
    return name, path


def load_models(specs: list[str], dataset: str | None = None, device: str = "cpu") -> dict[str, ServedModel]:
    """Load every ``NAME=PATH`` (or ``PATH``) once; two models under one name is an error."""
    models: dict[str, ServedModel] = {}
    for spec in specs:
        name, path = parse_model_spec(spec)
        if name in models:
            raise UsageError(f"two models are named {name!r}; give each its own name with NAME=PATH")
        checkpoint = resolve_checkpoint(path)
        model, meta = load_model(checkpoint, dataset=dataset, device=device)
        models[name] = ServedModel(name, model, meta, checkpoint)
    if not models:
        raise UsageError("give at least one MODEL to serve")
    return models
