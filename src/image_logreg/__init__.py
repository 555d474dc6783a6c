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

from .checkpoint import load_model, save_model  # noqa: E402
from .data import ImageSet, load_split, split_indices, subset_indices, to_float  # noqa: E402
from .errors import ImageLogregError  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .model import LogisticRegression  # noqa: E402
from .run import train_run  # noqa: E402
from .train import TrainConfig, fit  # noqa: E402

__all__ = [
    "ImageLogregError",
    "ImageSet",
    "LogisticRegression",
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
