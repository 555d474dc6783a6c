"""Checkpoints: safetensors with metadata, plus the tutorial's plain ``state_dict`` files.

A safetensors file cannot run code when loaded, and it carries everything needed to use the
model later: dataset, class names, input shape, preprocessing, training config and metrics.
A legacy ``.pth``/``.pt`` state_dict is read with ``weights_only=True`` for the same reason.
"""

from __future__ import annotations

import json
import math
import io
import os
import pickle
import pickletools
import re
import unicodedata
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from .confidence import Novelty
from .data import DATASET_DECODE, preprocessing_for
from .errors import CheckpointError
from .files import atomic_path
from .model import LogisticRegression
from .datasets.registry import DATASETS, dataset
from .settings import COLORS, RESIZE_MODES

FORMAT = "image-logreg"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.safetensors"
TENSOR_KEYS = ("linear.weight", "linear.bias")


def save_model(path: str | os.PathLike, model: LogisticRegression, metadata: dict) -> Path:
    """Write weights and ``metadata`` (a JSON-serialisable dict) to ``path`` atomically."""
    from safetensors.torch import save_file

    meta = dict(metadata, input_shape=list(model.input_shape), num_classes=model.num_classes)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.temperature != 1.0:
        meta["temperature"] = model.temperature
    if model.novelty is not None:
        meta["novelty"] = model.novelty.metadata()
        tensors.update(model.novelty.tensors())
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(FORMAT_VERSION), "image_logreg": json.dumps(meta)})
    return path


def resolve_checkpoint(model_path: str | os.PathLike) -> Path:
    """A run directory means its ``model.safetensors``; a file is taken as is."""
    path = Path(model_path)
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            runs = sorted(p.parent.name for p in path.glob(f"*/{CHECKPOINT_NAME}"))[:3]
            hint = f"; it holds runs such as {', '.join(runs)}" if runs else ""
            raise CheckpointError(f"{model_path}: a folder, but not a run directory (no {CHECKPOINT_NAME} in it){hint}")
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
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

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
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: checkpoint metadata is missing or corrupt") from None
    _check_metadata(path, meta)
    return tensors, meta


def _check_metadata(path: Path, meta) -> None:
    """Every field the package reads, checked against ``METADATA_SCHEMA`` before anything is built.

    The metadata is the file's own claim: an input shape of 2^20 x 2^20 would otherwise size a
    4 TiB model before the (small) weights were found not to fit it, and a field of the wrong
    kind would surface later as a crash in whatever reads it (predict, the server's metadata).
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is corrupt (a JSON {type(meta).__name__}, not an object)")
    for name, field in METADATA_SCHEMA.items():
        found, value = _field(meta, name)
        if not found:
            if field.required is True or (callable(field.required) and field.required(meta)):
                raise CheckpointError(f"{path}: checkpoint metadata field {name} is missing")
            continue
        if not field.check(value):
            raise CheckpointError(f"{path}: checkpoint metadata field {name} is {_short(value)}, not {field.wants}")
    for name, agrees in METADATA_AGREEMENTS:
        why = agrees(meta)
        if why:
            raise CheckpointError(f"{path}: checkpoint metadata field {name} {why}")


def _field(meta: dict, name: str) -> tuple[bool, object]:
    """``(found, value)`` of a dotted field; an absent or null parent means the field is absent."""
    value = meta
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def _line(value) -> bool:
    """Text that prints on one line and encodes as UTF-8 (a lone surrogate from JSON would not)."""
    if not (isinstance(value, str) and 0 < len(value) <= 1000):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value)  # controls, line breaks


def _whole(low: int, high: int):
    return lambda value: type(value) is int and low <= value <= high


def _optional(check):
    return lambda value: value is None or check(value)


def _object(value) -> bool:
    return isinstance(value, dict)


MAX_SIDE = 65535  # pixels a side: more than any image format the decoders read


def _side(value) -> bool:
    return type(value) is int and 1 <= value <= MAX_SIDE


def _input_shape(value) -> bool:
    return isinstance(value, list) and (
        (len(value) == 2 and all(map(_side, value))) or (len(value) == 3 and value[0] == 3 and all(map(_side, value[1:])))
    )


def _class_names(value) -> bool:
    return isinstance(value, list) and 0 < len(value) and all(map(_line, value)) and len(set(value)) == len(value)


def _finite(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _temperature(value) -> bool:
    return _finite(value) and 1e-3 <= value <= 1e3


def _scale(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(_finite, value)) and value[1] > value[0]


def _scales(value) -> bool:
    return isinstance(value, dict) and set(value) == set(Novelty.SCORES) and all(map(_scale, value.values()))


def _has_novelty(meta: dict) -> bool:
    return "novelty" in meta


def _metrics(value) -> bool:
    # served as JSON: flat, finite numbers a 64-bit encoder can write
    return isinstance(value, dict) and all(
        _line(k) and (v is None or (type(v) in (int, float) and math.isfinite(v) and abs(v) < 2**53)) for k, v in value.items()
    )


def _deskew(value) -> bool:
    return value is None or type(value) is bool or isinstance(value, dict)


def _image_size(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(_side, value))


def _decodes(meta: dict) -> bool:
    return _field(meta, "preprocessing.image_files.name")[1] == DATASET_DECODE


class Field(NamedTuple):
    check: Callable[[object], bool]
    wants: str  # what a good value is, as the error says it
    required: bool | Callable[[dict], bool] = False


# Each field the package reads, parents before their children. Fields it does not read are not
# checked, so a later version may add its own.
METADATA_SCHEMA = {
    "dataset": Field(_line, "a dataset name", required=True),
    "input_shape": Field(_input_shape, f"[H, W] or [3, H, W] with sides from 1 to {MAX_SIDE}", required=True),
    "num_classes": Field(_whole(1, 2**31), "a positive whole number", required=True),
    "classes": Field(_class_names, "a list of distinct one-line class names", required=True),
    "preprocessing": Field(_optional(_object), "an object"),
    "preprocessing.deskew": Field(_deskew, "false or a deskew description"),
    "preprocessing.image_files": Field(_optional(_object), "an object"),
    "preprocessing.image_files.name": Field(_optional(_line), "a preprocessing name"),
    "preprocessing.image_files.image_size": Field(_image_size, f"[H, W] with sides from 1 to {MAX_SIDE}", required=_decodes),
    "preprocessing.image_files.resize": Field(lambda v: v in RESIZE_MODES, f"one of {', '.join(RESIZE_MODES)}", required=_decodes),
    "preprocessing.image_files.color": Field(lambda v: v in COLORS, f"one of {', '.join(COLORS)}", required=_decodes),
    "config": Field(_optional(_object), "an object"),
    "config.seed": Field(_optional(_whole(-(2**63), 2**63 - 1)), "a whole number"),
    "metrics": Field(_optional(_metrics), "an object of finite numbers"),
    "kept_epoch": Field(_optional(_whole(0, 2**31)), "an epoch number"),
    "temperature": Field(_temperature, "a temperature from 0.001 to 1000"),
    "novelty": Field(_object, "an object"),
    "novelty.scales": Field(_scales, f"{', '.join(Novelty.SCORES)} scales, each [median, high] with high > median", required=_has_novelty),
    "novelty.threshold": Field(_finite, "a finite number", required=_has_novelty),
    "novelty.keep": Field(lambda v: _finite(v) and 0 < v <= 1, "a share from 0 to 1", required=_has_novelty),
    "novelty.components": Field(_whole(1, 2**31), "a positive whole number", required=_has_novelty),
    "novelty.ink": Field(_finite, "a finite number", required=_has_novelty),
    "novelty.extent": Field(_finite, "a finite number", required=_has_novelty),
    "novelty.combine": Field(lambda v: v in Novelty.COMBINE, " or ".join(Novelty.COMBINE)),
}


def _classes_counted(meta: dict) -> str | None:
    if len(meta["classes"]) != meta["num_classes"]:
        return f"names {len(meta['classes'])} classes, but num_classes is {meta['num_classes']}"
    return None


def _decode_makes_input_shape(meta: dict) -> str | None:
    """A dataset-decode model must bring a file to exactly its input shape; any other is fed gray digits."""
    shape = meta["input_shape"]
    if _decodes(meta):
        files = meta["preprocessing"]["image_files"]
        made = [3, *files["image_size"]] if files["color"] == "rgb" else files["image_size"]
    else:
        made = shape[-2:]
    if made != shape:
        return f"disagrees: image_files make {'x'.join(map(str, made))} images, but input_shape is {'x'.join(map(str, shape))}"
    return None


def _deskew_on_gray(meta: dict) -> str | None:
    if _field(meta, "preprocessing.deskew")[1] and len(meta["input_shape"]) != 2:
        return f"is on, but deskewing works on gray images and input_shape is {'x'.join(map(str, meta['input_shape']))}"
    return None


# Fields that must agree with others, checked once each is known to be well formed.
METADATA_AGREEMENTS = (
    ("classes", _classes_counted),
    ("preprocessing.image_files", _decode_makes_input_shape),
    ("preprocessing.deskew", _deskew_on_gray),
)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_state_dict(path: Path) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd pickles would break the one-line error
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals, zip errors and short files
        if _is_torchscript(path):
            raise CheckpointError(f"{path}: a TorchScript module (as `export --format torchscript` writes), not a state_dict") from None
        found = _objects_in_pickle(path)
        if found:
            raise CheckpointError(
                f"{path}: refused: it holds Python objects other than tensors ({found}), and loading it could run code; "
                "save the weights alone, torch.save(model.state_dict(), PATH), or use a .safetensors checkpoint"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint or state_dict ({_load_failure(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = sorted({type(v).__name__ for v in state.values()}) if isinstance(state, dict) else []
        found = f"a dict holding {', '.join(held)}" if held else type(state).__name__
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), found {found}")
    return state


def _objects_in_pickle(path: Path) -> str | None:
    """What a refused pickle would import beyond tensors, if anything: named where it can be; None if nothing.

    torch.load(weights_only=True) refuses such files, but in words meant for their author and
    in the same way as damaged ones. Nothing is unpickled: a ``torch.save`` file is scanned by
    torch's own static scan; another pickle (a plain one, or torch's legacy format of several
    pickles back to back) is read opcode by opcode.
    """
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        return found[0] if found else None
    except Exception:  # not a torch.save zip
        pass
    try:
        with open(path, "rb") as f:
            while f.read(1):
                f.seek(-1, io.SEEK_CUR)
                for op, arg, _ in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):  # protocols 0-3 name what they import
                        return arg.replace(" ", ".")
                    if op.name == "STACK_GLOBAL":  # 4 and 5 take the name from the stack
                        return "an object"
    except Exception:  # the rest is tensor data or damage
        pass
    return None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") for n in archive.namelist())
    except Exception:
        return False


def _load_failure(exc: BaseException) -> str:
    """Why torch.load failed, in a few words rather than its advice to its own users."""
    if isinstance(exc, EOFError):
        return "the file ends early"
    if isinstance(exc, pickle.UnpicklingError):
        return "not written by torch.save, or damaged"
    text = re.sub(r"\x1b\[[0-9;]*m", "", _first_line(exc))
    return text.split(". ")[0].rstrip(".")


def _tutorial_metadata(name: str) -> dict:
    entry = dataset(name)  # an unknown name is a one-line error
    if not entry.classes:
        # a state_dict records no class names; only datasets whose classes the registry names load here
        named = " or ".join(d.name for d in DATASETS.values() if d.classes)
        raise CheckpointError(
            f"a plain state_dict records no class names, so it loads as {named} only, not {name}; "
            "use the run directory or .safetensors checkpoint that image-logreg train wrote"
        )
    return {
        "dataset": name,
        "classes": list(entry.classes),
        "input_shape": [28, 28],
        "num_classes": len(entry.classes),
        "preprocessing": preprocessing_for(deskewed=False),
        "source": "state_dict",
    }


def _build(path: Path, tensors: dict, meta: dict) -> LogisticRegression:
    expected = (*TENSOR_KEYS, *Novelty.TENSORS) if "novelty" in meta else TENSOR_KEYS
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"{path}: expected tensors {', '.join(expected)}, found {', '.join(sorted(tensors)) or 'none'}"
        )
    shape, num_classes = meta["input_shape"], meta["num_classes"]
    features = math.prod(shape)
    # Compared before the model exists, so its size is bounded by weights the file really holds.
    needs = {"linear.weight": (num_classes, features), "linear.bias": (num_classes,)}
    if "novelty" in meta:
        k = meta["novelty"]["components"]
        needs.update({"novelty.mean": (features,), "novelty.components": (features, k), "novelty.variances": (k,)})
    for key, need in needs.items():
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.device.type != "cpu":
            raise CheckpointError(f"{path}: {key} is not a plain tensor")
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{path}: {key} holds {str(tensor.dtype).removeprefix('torch.')} values, not floating-point weights")
        if tuple(tensor.shape) != need:
            raise CheckpointError(
                f"{path}: {key} has shape {list(tensor.shape)}, but a model for {meta['dataset']} "
                f"({'x'.join(map(str, shape))} inputs, {num_classes} classes) needs {list(need)}"
            )
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {key} holds NaN or infinite values")
        if key == "novelty.variances" and not (tensor > 0).all():
            raise CheckpointError(f"{path}: {key} holds values that are not positive")
    model = LogisticRegression(shape, num_classes)
    model.load_state_dict({k: tensors[k].float() for k in TENSOR_KEYS})
    model.temperature = float(meta.get("temperature", 1.0))
    if "novelty" in meta:
        model.novelty = Novelty.from_checkpoint(tensors, meta["novelty"], tuple(shape))
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
