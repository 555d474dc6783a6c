"""image-logreg: image classification with logistic regression in PyTorch.

The workflow, as functions::

    from image_logreg import load_split, split_indices, to_float, LogisticRegression, TrainConfig, fit

    data = load_split("mnist", "data", "train")
    train_idx, val_idx = split_indices(len(data), val_fraction=0.2, seed=0)
    x, y = to_float(data.images), data.labels
    model = LogisticRegression(data.input_shape, len(data.classes))
    history = fit(model, x[train_idx], y[train_idx], x[val_idx], y[val_idx], TrainConfig(epochs=10))
    model.predict_proba(x[:5]); model.predict(x[:5]); model.score(x[val_idx], y[val_idx])
"""

__version__ = "0.1.0"

from .errors import ImageLogregError  # noqa: E402

# The rest imports torch (seconds): each name is imported on first use, so that the command
# line, which imports this package, starts at once and loads only what a command needs.
_LAZY = {
    "load_model": "checkpoint", "save_model": "checkpoint",
    "ImageSet": "datasets", "load_split": "datasets", "split_indices": "datasets", "subset_indices": "datasets",
    "to_float": "data",
    "evaluate": "metrics",
    "LogisticRegression": "model",
    "train_run": "run",
    "TrainConfig": "settings", "RunConfig": "settings",
    "fit": "train",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

__all__ = [
    "ImageLogregError",
    "ImageSet",
    "LogisticRegression",
    "RunConfig",
    "TrainConfig",
    "evaluate",
    "fit",
    "load_model",
    "load_split",
    "save_model",
    "split_indices",
    "subset_indices",
    "to_float",
    "train_run",
]
