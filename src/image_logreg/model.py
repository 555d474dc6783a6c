"""The model: flatten, one linear layer, softmax. Multinomial logistic regression."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LogisticRegression(nn.Module):
    """``logits = x.flatten() @ W.T + b``; probabilities are the softmax of the logits.

    Parameter names (``linear.weight``, ``linear.bias``) match the tutorial's ``MnistModel``,
    so its saved ``state_dict`` loads as is.

    After training (``confidence``), ``temperature`` divides the logits before every softmax that
    leaves the model, and ``novelty`` (when fitted) scores how unlike the training images an
    input is: ``novelty_scores`` and ``rejects``.
    """

    temperature: float = 1.0
    novelty = None  # a confidence.Novelty, or None: nothing is rejected

    def __init__(self, input_shape: tuple[int, ...] = (28, 28), num_classes: int = 10):
        super().__init__()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.linear = nn.Linear(math.prod(self.input_shape), self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        # forward's arithmetic, without the module call and decorator machinery: for one image
        # served over HTTP that machinery costs as much as the arithmetic
        linear = self.linear
        with torch.no_grad():
            logits = F.linear(x.reshape(x.shape[0], -1), linear.weight, linear.bias)
            return F.softmax(logits if self.temperature == 1.0 else logits / self.temperature, dim=1)

    def proba_and_novelty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``predict_proba`` and ``novelty_scores`` together, from one product of the weights."""
        if self.novelty is not None and len(x) == 1 and x.dtype == torch.float32 and x.device.type == "cpu":
            return self._one_image(x)
        linear = self.linear
        with torch.no_grad():
            logits = F.linear(x.reshape(x.shape[0], -1), linear.weight, linear.bias)
            proba = F.softmax(logits if self.temperature == 1.0 else logits / self.temperature, dim=1)
            return proba, (None if self.novelty is None else self.novelty.score(x, logits))

    def _one_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``proba_and_novelty`` of one image on the CPU, in numpy: the logits and the novelty's
        projection come from one product of a stacked matrix, and each numpy call costs about a
        microsecond where a torch operation costs several; one served image takes a few dozen."""
        stacked, bias = self._stacked()
        row = x.detach().reshape(-1).numpy()
        out = stacked @ row
        k = len(bias)
        logits = out[:k] + bias
        scaled = logits if self.temperature == 1.0 else logits / self.temperature
        e = np.exp(scaled - scaled.max())
        proba = torch.from_numpy((e / e.sum())[None])
        score = self.novelty._score_one(row, logits, proj=out[k:])
        return proba, torch.from_numpy(np.array([score], dtype=np.float32))

    def _stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """The weights stacked over the novelty's projection, as numpy, kept while neither changes."""
        weight, bias = self.linear.weight, self.linear.bias
        key = (weight._version, bias._version, id(weight), id(self.novelty), self.novelty.projection().ctypes.data)
        if getattr(self, "_stacked_key", None) != key:
            w = weight.detach().cpu().float().numpy()
            self._stacked_arrays = (np.ascontiguousarray(np.concatenate([w, self.novelty.projection()])),
                                    bias.detach().cpu().float().numpy().copy())
            self._stacked_key = key
        return self._stacked_arrays

    @torch.no_grad()
    def novelty_scores(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor | None:
        """How unlike the training images each input is (None without a fitted novelty score)."""
        if self.novelty is None:
            return None
        if logits is None:
            logits = F.linear(x.reshape(x.shape[0], -1), self.linear.weight, self.linear.bias)
        return self.novelty.score(x, logits)

    def rejects(self, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Which of ``novelty_scores``' inputs are too unlike the training images to answer for."""
        return None if scores is None else self.novelty.rejects(scores)

    def partial_fit(self, x: torch.Tensor, y: torch.Tensor, **steps) -> "LogisticRegression":
        """Learn from ``(x, y)`` starting from the current weights, as scikit-learn's ``partial_fit``:
        the classes are the model's own, so any subset of them may appear. ``steps``: the keywords of
        ``train.gradient_steps`` (``steps``, ``lr``, ``sample_weight``, ``max_change``)."""
        from .errors import UsageError
        from .train import gradient_steps

        if len(x) != len(y) or len(y) == 0:
            raise UsageError(f"partial_fit needs as many labels as images, and at least one ({len(x)} images, {len(y)} labels)")
        if tuple(x.shape[1:]) != self.input_shape and x[0].numel() != math.prod(self.input_shape):
            raise UsageError(f"images of shape {tuple(x.shape[1:])} do not fit the model's input {self.input_shape}")
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise UsageError(f"labels must be class indices 0..{self.num_classes - 1}; got {int(y.min())}..{int(y.max())}")
        gradient_steps(self, x, y, **steps)
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(dim=1)

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy on ``(x, y)``, as scikit-learn's ``score``."""
        return (self.predict(x) == y.to(x.device)).sum().item() / len(y)

    @property
    def device(self) -> torch.device:
        return self.linear.weight.device
