"""Checkpoints: safetensors with metadata, plus the tutorial's plain ``state_dict`` files.

A safetensors file cannot run code when loaded, and it carries everything needed to use the
model later: dataset, class names, input shape, preprocessing, training config and metrics.
A legacy ``.pth``/``.pt`` state_dict is read with ``weights_only=True`` for the same reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import dataset_class, preprocessing_for
from .errors import CheckpointError
from .files import atomic_path
from .model import LogisticRegression

FORMAT = "image-logreg"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.safetensors"
TENSOR_KEYS = ("linear.weight", "linear.bias")


def save_model(path: str | os.PathLike, model: LogisticRegression, metadata: dict) -> Path:
    """Write weights and ``metadata`` (a JSON-serialisable dict) to ``path`` atomically."""
    meta = dict(metadata, input_shape=list(model.input_shape), num_classes=model.num_classes)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION), "image_logreg": json.dumps(meta)})
    return path


def resolve_checkpoint(model_path: str | os.PathLike) -> Path:
    """A run directory means its ``model.safetensors``; a file is taken as is."""
    path = Path(model_path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{model_path}: no such checkpoint file or run directory")
    return path


def load_model(
    model_path: str | os.PathLike, dataset: str | None = None, device: torch.device | str = "cpu"
) -> tuple[LogisticRegression, dict]:
    """Load a model from a run directory, a ``.safetensors`` file or a tutorial ``state_dict``.

    Returns ``(model, metadata)``. For a tutorial ``state_dict`` (which records nothing),
    ``dataset`` names what it was trained on; for a safetensors checkpoint it must agree.
    """
    path = resolve_checkpoint(model_path)
    if _is_safetensors(path):
        tensors, meta = _read_safetensors(path)
        if dataset is not None and meta.get("dataset") not in (None, dataset):
            raise CheckpointError(f"{path} was trained on {meta.get('dataset')}, not {dataset}")
    else:
        tensors = _read_state_dict(path)
        meta = _tutorial_metadata(dataset or "mnist")
    model = _build(path, tensors, meta)
    return model.to(device).eval(), meta


def _is_safetensors(path: Path) -> bool:
    # safetensors starts with an 8-byte header length then '{'; torch.save files are zip or pickle.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({_first_line(exc)})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file, but not an image-logreg checkpoint (no metadata)")
    try:
        meta = json.loads(header["image_logreg"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: checkpoint metadata is missing or corrupt") from None
    return tensors, meta


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, zip errors and short files all mean the same here
        raise CheckpointError(f"{path}: not a readable checkpoint or state_dict ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), found {type(state).__name__}")
    return state


def _tutorial_metadata(dataset: str) -> dict:
    cls = dataset_class(dataset)
    return {
        "dataset": dataset,
        "classes": list(cls.classes),
        "input_shape": [28, 28],
        "num_classes": len(cls.classes),
        "preprocessing": preprocessing_for(deskewed=False),
        "source": "state_dict",
    }


def _build(path: Path, tensors: dict, meta: dict) -> LogisticRegression:
    if set(tensors) != set(TENSOR_KEYS):
        raise CheckpointError(
            f"{path}: expected tensors {', '.join(TENSOR_KEYS)}, found {', '.join(sorted(tensors)) or 'none'}"
        )
    model = LogisticRegression(meta["input_shape"], meta["num_classes"])
    for key, param in model.state_dict().items():
        got = tuple(tensors[key].shape)
        if got != tuple(param.shape):
            raise CheckpointError(
                f"{path}: {key} has shape {list(got)}, but a model for {meta['dataset']} "
                f"({'x'.join(map(str, model.input_shape))} inputs, {model.num_classes} classes) needs {list(param.shape)}"
            )
        if not torch.isfinite(tensors[key]).all():
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
