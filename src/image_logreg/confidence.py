"""Knowing when it does not know: calibrated probabilities, and a score for inputs unlike the
training images, both fitted after training on images the weights were not fitted to.

Calibration: one temperature T divides the logits before the softmax. It is fitted to the
validation split's negative log-likelihood (Newton's method on 1/T); it leaves every
prediction as it was and changes only how sure each one says it is.

Novelty: a linear model is most sure far from its data (a Fashion-MNIST shirt given to an
MNIST model gets a confident digit), so its softmax cannot say "I don't know". Five cheap
scores can, and each catches what the others miss:
- the reconstruction error of an input under the top principal components of the training
  images (a shirt is far from the digits' subspace);
- the Mahalanobis distance within that subspace (a digit given to a Fashion-MNIST model lies
  near its subspace, but in a corner no garment reaches);
- the energy of the logits, -logsumexp (noise and blobs the classes all dislike);
- how far the input's amount of ink (the log of its pixel sum) is from the training images'
  (a dot, kept small by the preprocessing, has a tenth of a digit's ink);
- how far the input's extent (the longer side of the box around its bright pixels) is from
  the training images' (an MNIST digit spans 20 pixels, a garment 28, a speck a few).
Each is put on the scale of its validation values (0 at the median, 1 at the 99.5th
percentile, never counted below -1) and the score is their sum: evidence from several scores adds
up, where their largest alone is set by whichever is noisiest on images like the training ones
(MNIST digits given to a Fashion-MNIST model: AUROC 0.996 summed, 0.958 by the largest). The
threshold is the score's ``keep`` quantile on the validation split, so that share of images like
the training ones is accepted. Checkpoints from before the sum (no ``combine``) keep the largest.
The scores are computed on the CPU, in numpy, whatever the model's device: the extent is a
look-up no faster on a GPU, and one served image is a few dozen calls that cost a microsecond
each in numpy where a torch operation costs several.
"""

from __future__ import annotations

import math

import numpy as np
import torch

COMPONENTS = 100  # principal components kept: enough for digits' strokes, few enough to miss a shirt
FIT_ROWS = 6_000  # rows the components are estimated from: as good as all of MNIST's, in a tenth of a second
HELD_OUT_ROWS = 50_000  # validation rows the temperature and threshold are fitted on: plenty, and bounded
SCALE_QUANTILE = 0.995  # each score's value here on the validation split is its unit
DEFAULT_KEEP = 0.99
TEMPERATURES = (0.25, 4.0)  # the range a fitted temperature is kept in


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 30) -> float:
    """The T > 0 that minimises the mean cross-entropy of ``softmax(logits / T)`` on ``labels``.

    In b = 1/T the loss mean(logsumexp(b z) - b z_y) is convex, with derivative
    mean(E_p[z] - z_y) and second derivative mean(Var_p[z]): Newton's method finds its minimum
    in a few steps of one softmax each, exactly, where a general optimizer would take dozens.

    The temperature is kept within ``TEMPERATURES``: a validation split the model separates
    perfectly would have it sharpen the probabilities without end.
    """
    z = logits.detach().double().cpu()
    true = z.gather(1, labels.detach().long().cpu()[:, None]).squeeze(1)
    b = 1.0
    for _ in range(iterations):
        p = torch.softmax(b * z, dim=1)
        expected = (p * z).sum(1)
        slope = (expected - true).mean().item()
        curvature = ((p * z * z).sum(1) - expected * expected).mean().item()
        if not curvature > 0:
            break
        step = slope / curvature
        b = min(max(b - step, b / 4, 1 / TEMPERATURES[1]), 1 / TEMPERATURES[0])  # never past zero, never past the bounds
        if abs(step) < 1e-9 * b:
            break
    temperature = 1.0 / b
    return temperature if math.isfinite(temperature) else 1.0


def energy(logits: torch.Tensor) -> torch.Tensor:
    """-logsumexp of the logits: low where some class claims the input, high where none does."""
    return -torch.logsumexp(logits.float(), dim=1)


class Novelty:
    """How unlike the training images an input is; above ``threshold`` it is rejected."""

    SCORES = ("residual", "mahalanobis", "energy", "ink", "extent")
    # least spread of each score's unit: the extent is whole pixels, and on a set of photographs
    # that all fill their frame it does not vary at all
    LEAST_SPREAD = {"extent": 1.0}

    FLOOR = -1.0  # a score far below its median (a very confident logit) cannot outvote the others
    COMBINE = ("sum", "max")  # how the scaled scores make one: "max" is read from older checkpoints

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, variances: torch.Tensor, ink: float, extent: float,
                 image_shape: tuple[int, ...], scales: dict, threshold: float, keep: float, combine: str = "sum"):
        self.mean = mean  # D
        self.components = components  # D x k, orthonormal columns
        self.variances = variances  # k: the training images' variance along each component
        self.ink = float(ink)  # the training images' median log pixel sum
        self.extent = float(extent)  # the training images' median extent, in pixels
        self.image_shape = tuple(int(d) for d in image_shape)  # H x W, or 3 x H x W
        self.scales = scales  # each score's [median, 99.5th percentile] on the validation images
        self.threshold = float(threshold)
        self.keep = float(keep)
        self.combine = combine

    @classmethod
    def fit(cls, x_train: torch.Tensor, x_val: torch.Tensor, val_logits: torch.Tensor, image_shape: tuple[int, ...],
            keep: float = DEFAULT_KEEP, components: int = COMPONENTS) -> "Novelty":
        """Components from (up to ``FIT_ROWS`` of) ``x_train``, images of ``image_shape``; scales and
        threshold from the validation inputs."""
        rows = _rows(x_train, limit=FIT_ROWS).cpu()
        mean = rows.mean(0)
        centred = rows - mean
        covariance = centred.T @ centred / max(len(rows) - 1, 1)
        values, vectors = _eigh(covariance)
        k = max(1, min(components, rows.shape[1] - 1, len(rows) - 1))
        floor = max(values[-1].item(), 1e-12) * 1e-6  # a flat direction must not divide by zero
        ink = float(np.median(_log_ink(rows.numpy())))
        extent = float(np.median(_extents(rows.numpy(), image_shape)))
        novelty = cls(mean, vectors[:, -k:].flip(1).contiguous(), values[-k:].flip(0).clamp(min=floor), ink, extent,
                      image_shape, {}, 0.0, keep)
        raw = novelty._raw(x_val, val_logits)
        novelty.scales = {name: _median_and_quantile(raw[:, k], cls.LEAST_SPREAD.get(name, 1e-12))
                          for k, name in enumerate(cls.SCORES)}
        novelty.threshold = torch.quantile(novelty._combined(raw).double(), keep).item()
        return novelty

    def _raw(self, x: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
        """Each input's raw scores, in ``SCORES`` order (N x 5): squared distance to the principal
        subspace (per pixel), squared Mahalanobis distance within it (per component), the logits'
        energy, and the distances of its log ink and its extent from the training images'."""
        mean, components, inverse_variances = self._arrays()
        rows = x.detach().reshape(len(x), -1).cpu().float().numpy()
        centred = rows - mean
        inside = centred @ components
        inside *= inside
        raw = np.empty((len(rows), len(self.SCORES)), dtype=np.float32)
        raw[:, 0] = np.maximum(np.einsum("ij,ij->i", centred, centred) - inside.sum(1), 0) / rows.shape[1]
        raw[:, 1] = (inside @ inverse_variances) / len(inverse_variances)
        z = logits.detach().cpu().float().numpy()
        top = z.max(1)
        raw[:, 2] = -(top + np.log(np.exp(z - top[:, None]).sum(1)))
        raw[:, 3] = np.abs(_log_ink(rows) - self.ink)
        raw[:, 4] = np.abs(_extents(rows, self.image_shape) - self.extent)
        return raw

    def _score_one(self, row: np.ndarray, logits: np.ndarray, proj: np.ndarray | None = None) -> float:
        """``score`` of one flat image, in as few numpy calls as the arithmetic allows: a served
        image pays for each call (about a microsecond), not for the arithmetic. ``proj`` is
        ``projection() @ row``, where the caller has it already."""
        projection, shift, mean_length, inverse_variances, median, inverse_spread = self._one_row_arrays()
        k = len(inverse_variances)
        if proj is None:
            proj = projection @ row  # the k coordinates in the subspace, and row . mean
        inside = proj[:k] - shift
        inside *= inside
        length = float(row @ row)
        squared = float(inside.sum())
        residual = max(length - 2 * float(proj[k]) + mean_length - squared, 0.0) / len(row)
        mahalanobis = float(inside @ inverse_variances) / k
        top = float(logits.max())
        low_energy = -(top + math.log(float(np.exp(logits - top).sum())))
        ink = abs(math.log(max(float(np.abs(row).sum()), 1e-3)) - self.ink)
        extent = abs(float(_extents(row[None], self.image_shape)[0]) - self.extent)
        raw = (residual, mahalanobis, low_energy, ink, extent)
        if self.combine == "max":
            return max((value - m) * i for value, m, i in zip(raw, median, inverse_spread))
        return sum(max((value - m) * i, self.FLOOR) for value, m, i in zip(raw, median, inverse_spread))

    def _one_row_arrays(self):
        if getattr(self, "_one_row", None) is None:
            mean, components, inverse_variances = self._arrays()
            median, spread = self._units()
            self._one_row = (np.ascontiguousarray(np.concatenate([components, mean[:, None]], 1).T), mean @ components,
                             float(mean @ mean), inverse_variances, median.tolist(), (1 / spread).tolist())
        return self._one_row

    def projection(self) -> np.ndarray:
        """The (k + 1) x D matrix whose product with a flat image gives its k coordinates in the
        subspace (before centring) and its dot product with the mean image."""
        return self._one_row_arrays()[0]

    def _units(self) -> tuple[np.ndarray, np.ndarray]:
        """Each score's median and spread (99.5th percentile less median), in ``SCORES`` order."""
        units = np.array([self.scales[name] for name in self.SCORES], dtype=np.float64)
        return units[:, 0], units[:, 1] - units[:, 0]

    def _arrays(self):
        if getattr(self, "_cached", None) is None:
            self._cached = (self.mean.numpy(), self.components.numpy(), (1 / self.variances).numpy())
        return self._cached

    def score(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per input, the largest of the scores in units of their validation spread (on the CPU)."""
        if len(x) == 1 and x.dtype == torch.float32 and logits.dtype == torch.float32:
            row, z = x.detach().cpu().reshape(-1).numpy(), logits.detach().cpu().reshape(-1).numpy()
            return torch.from_numpy(np.array([self._score_one(row, z)], dtype=np.float32))
        return self._combined(self._raw(x, logits))

    def _combined(self, raw: np.ndarray) -> torch.Tensor:
        """``score`` from the raw scores (N x 5)."""
        median, spread = self._units()
        scaled = (raw - median) / spread
        combined = scaled.max(1) if self.combine == "max" else np.maximum(scaled, self.FLOOR).sum(1)
        return torch.from_numpy(combined.astype(np.float32))

    def rejects(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold

    # --- in a checkpoint: three tensors, the rest as metadata ----------------------------------

    TENSORS = ("novelty.mean", "novelty.components", "novelty.variances")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().float().contiguous() for name, t in zip(self.TENSORS, (self.mean, self.components, self.variances))}

    def metadata(self) -> dict:
        return {"scales": self.scales, "threshold": self.threshold, "keep": self.keep, "components": self.components.shape[1],
                "ink": self.ink, "extent": self.extent, "combine": self.combine}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], meta: dict, image_shape: tuple[int, ...]) -> "Novelty":
        mean, components, variances = (tensors[name].float() for name in cls.TENSORS)
        return cls(mean, components, variances, meta["ink"], meta["extent"], image_shape, meta["scales"], meta["threshold"],
                   meta["keep"], meta.get("combine", "max"))


BRIGHT = 0.5  # a pixel at least this bright (0-1) is part of the glyph, for its extent


def _extents(rows: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """The longer side, in pixels, of the box around each image's bright pixels (0 for none)."""
    images = rows.reshape(len(rows), *image_shape)
    if images.ndim == 4:  # colour: the brightness of its channels together
        images = images.mean(1)
    bright = images >= BRIGHT
    if len(rows) == 1:  # one served image: two look-ups instead of the batch's dozen calls
        ys, xs = np.flatnonzero(bright[0].any(1)), np.flatnonzero(bright[0].any(0))
        return np.array([max(ys[-1] - ys[0], xs[-1] - xs[0]) + 1 if ys.size else 0], dtype=np.float32)
    sides = []
    for axis in (2, 1):  # rows that hold a bright pixel, then columns
        lit = bright.any(axis)
        first, last = lit.argmax(1), lit.shape[1] - lit[:, ::-1].argmax(1)
        sides.append(np.where(lit.any(1), last - first, 0))
    return np.maximum(*sides).astype(np.float32)


def _log_ink(rows: np.ndarray) -> np.ndarray:
    """log of each row's pixel sum (a blank row counts as a tiny one, not minus infinity)."""
    return np.log(np.maximum(np.abs(rows).sum(1), 1e-3))


def _eigh(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors, in float32 where that converges (three times
    quicker); a few images of many blank pixels need float64."""
    from .train import one_thread

    # one thread: a 784x784 problem is too small to share, and on a busy machine two threads of
    # it waited on each other for seconds (0.04 s alone)
    with one_thread(covariance.device.type == "cpu"):
        try:
            return torch.linalg.eigh(covariance)
        except torch.linalg.LinAlgError:
            values, vectors = torch.linalg.eigh(covariance.double())
            return values.float(), vectors.float()


def _median_and_quantile(values: np.ndarray, least_spread: float = 1e-12) -> list[float]:
    median, high = np.quantile(values.astype(np.float64), [0.5, SCALE_QUANTILE]).tolist()
    return [median, max(high, median + least_spread)]


def calibrate(model, x_train, x_val, y_val, *, keep: float = DEFAULT_KEEP, temperature: bool = True) -> dict:
    """Fit ``model.temperature`` (unless ``temperature`` is false) and ``model.novelty`` on held-out
    images; return what was fitted, in figures. Without held-out images (``x_val`` empty) the
    temperature stays 1, and the training images are cut in two: the novelty score is fitted on one
    half and its scales and threshold taken on the other. Fitted and measured on the same few hundred
    images, the principal components would hold them exactly and every other image would be rejected."""
    from .metrics import logits_of

    held_out = x_val is not None and len(x_val) > 0
    if held_out:
        x_fit, x_fit_rows = x_train, _rows(x_val, limit=HELD_OUT_ROWS)
    else:
        rows = _rows(x_train, limit=2 * FIT_ROWS)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).to(rows.device)
        half = max(1, len(rows) // 2)
        x_fit, x_fit_rows = rows[order[:half]], rows[order[half:]] if len(rows) > 1 else rows
    logits = logits_of(model, x_fit_rows)
    summary = {"held_out": held_out}
    if temperature and held_out:
        model.temperature = fit_temperature(logits, y_val[: len(x_fit_rows)])
        summary["temperature"] = model.temperature
    model.novelty = Novelty.fit(x_fit, x_fit_rows, logits, model.input_shape, keep=keep)
    summary.update(threshold=model.novelty.threshold, keep=keep)
    return summary


def _rows(x, limit: int | None = None) -> torch.Tensor:
    """``x`` (a tensor, or rows streamed from disk) as a float tensor of at most ``limit`` rows."""
    n = len(x) if limit is None else min(limit, len(x))
    return x[:n].reshape(n, -1).float()
