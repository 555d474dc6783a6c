"""Checkpoints: safetensors with metadata, plus the tutorial's plain ``state_dict`` files.

A safetensors file cannot run code when loaded, and it carries everything needed to use the
model later: dataset, class names, input shape, preprocessing, training config and metrics.
A legacy ``.pth``/``.pt`` state_dict is read with ``weights_only=True`` for the same reason.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .data import DATASET_DECODE, preprocessing_for
from .errors import CheckpointError
from .files import atomic_path
from .model import LogisticRegression
from .settings import CLASSES, DATASET_NAMES, dataset_folder

FORMAT = "image-logreg"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.safetensors"
TENSOR_KEYS = ("linear.weight", "linear.bias")


def save_model(path: str | os.PathLike, model: LogisticRegression, metadata: dict) -> Path:
    """Write weights and ``metadata`` (a JSON-serialisable dict) to ``path`` atomically."""
    from safetensors.torch import save_file

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
    """The fields the package builds on, checked before anything is built from them.

    The metadata is the file's own claim: an input shape of 2^20 x 2^20 would otherwise size a
    4 TiB model before the (small) weights were found not to fit it.
    """

    def corrupt(why: str):
        raise CheckpointError(f"{path}: checkpoint metadata is corrupt ({why})")

    if not isinstance(meta, dict):
        corrupt(f"a JSON {type(meta).__name__}, not an object")
    if not isinstance(meta.get("dataset"), str):
        corrupt("no dataset name")
    shape = meta.get("input_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 3 and all(type(d) is int and d > 0 for d in shape)):
        corrupt(f"input_shape {_short(shape)} is not a list of 1 to 3 positive whole numbers")
    classes, num_classes = meta.get("classes"), meta.get("num_classes")
    if not (type(num_classes) is int and num_classes > 0):
        corrupt(f"num_classes {_short(num_classes)} is not a positive whole number")
    if not (isinstance(classes, list) and len(classes) == num_classes and all(isinstance(c, str) for c in classes)):
        corrupt(f"classes is not a list of {num_classes} names")
    if not isinstance(meta.get("preprocessing", {}), dict):
        corrupt("preprocessing is not an object")
    files = meta.get("preprocessing", {}).get("image_files")
    if isinstance(files, dict) and files.get("name") == DATASET_DECODE:
        _check_decode(files, shape, corrupt)


def _check_decode(files: dict, shape: list, corrupt) -> None:
    """A dataset-decode record must say how to bring a file to exactly the model's input shape."""
    from .sources.images import COLORS, RESIZE_MODES

    size, color = files.get("image_size"), files.get("color")
    if not (isinstance(size, list) and len(size) == 2 and all(type(d) is int and d > 0 for d in size)):
        corrupt(f"image_files image_size {_short(size)} is not two positive whole numbers")
    if files.get("resize") not in RESIZE_MODES or color not in COLORS:
        corrupt(f"image_files resize {_short(files.get('resize'))} or color {_short(color)} is unknown")
    made = [3, *size] if color == "rgb" else size
    if made != shape:
        corrupt(f"image_files make {'x'.join(map(str, made))} images, but input_shape is {'x'.join(map(str, shape))}")


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


# A pickle is scanned, never run, for the globals it would import: more than this is not read.
_PICKLE_SCAN_LIMIT = 16 << 20


def _objects_in_pickle(path: Path) -> str | None:
    """The first global a refused pickle names that torch's tensor loader would not accept, if any.

    torch.load(weights_only=True) refuses such files, but in words meant for their author and
    in the same way as damaged ones; this says which it was without unpickling anything.
    """
    try:
        payload = _pickle_payload(path)
    except Exception:  # not even a readable container: damaged, not refused
        return None
    allowed = _tensor_globals()
    for name in _pickle_globals(payload):
        if name not in allowed and not re.fullmatch(r"torch\.(cuda\.)?\w*Storage", name):
            return name
    return None


def _pickle_payload(path: Path) -> bytes:
    if zipfile.is_zipfile(path):  # torch.save's format since 1.6: the pickle is <archive>/data.pkl
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return b""
            with archive.open(name) as f:
                return f.read(_PICKLE_SCAN_LIMIT)
    with open(path, "rb") as f:  # the legacy format and plain pickles: pickles back to back
        return f.read(_PICKLE_SCAN_LIMIT)


def _pickle_globals(payload: bytes):
    """Names ('module.attr') of the globals in ``payload``'s pickles, read by opcode only."""
    stream, strings = io.BytesIO(payload), []
    while stream.tell() < len(payload):
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    yield arg.replace(" ", ".")
                elif op.name == "STACK_GLOBAL":
                    # module and name are the two strings pushed last; fetched from the memo, unknown
                    known = len(strings) >= 2 and None not in strings[-2:]
                    yield ".".join(strings[-2:]) if known else "an object of unknown class"
                elif isinstance(arg, str) and ("UNICODE" in op.name or op.name.endswith("STRING")):
                    strings.append(arg)
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(None)
        except Exception:  # the rest is tensor data or damage: what was read so far is the answer
            return


def _tensor_globals() -> set[str]:
    try:  # torch's own list of what weights_only accepts, where this torch exposes it
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "_codecs.encode"}


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


def _tutorial_metadata(dataset: str) -> dict:
    if dataset in DATASET_NAMES and dataset not in CLASSES:
        # a state_dict records no class names; only the tutorial's own datasets name theirs here
        raise CheckpointError(
            f"a plain state_dict records no class names, so it loads as {' or '.join(CLASSES)} only, not {dataset}; "
            "use the run directory or .safetensors checkpoint that image-logreg train wrote"
        )
    dataset_folder(dataset)  # an unknown name is a one-line error
    return {
        "dataset": dataset,
        "classes": list(CLASSES[dataset]),
        "input_shape": [28, 28],
        "num_classes": len(CLASSES[dataset]),
        "preprocessing": preprocessing_for(deskewed=False),
        "source": "state_dict",
    }


def _build(path: Path, tensors: dict, meta: dict) -> LogisticRegression:
    if set(tensors) != set(TENSOR_KEYS):
        raise CheckpointError(
            f"{path}: expected tensors {', '.join(TENSOR_KEYS)}, found {', '.join(sorted(tensors)) or 'none'}"
        )
    shape, num_classes = meta["input_shape"], meta["num_classes"]
    # Compared before the model exists, so its size is bounded by weights the file really holds.
    needs = {"linear.weight": (num_classes, math.prod(shape)), "linear.bias": (num_classes,)}
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
    model = LogisticRegression(shape, num_classes)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
