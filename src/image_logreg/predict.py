"""Prediction on dataset samples and image files, with top-k probabilities."""

from __future__ import annotations

import numpy as np
import torch

from .data import decode_settings_of, prepare_inputs, to_uint8
from .model import LogisticRegression


def top_k(model: LogisticRegression, x: torch.Tensor, classes: list[str], k: int = 3) -> list[list[dict]]:
    """For each row of ``x`` (float images in [0, 1]), the ``k`` most probable classes."""
    return _ranked(model.predict_proba(x.to(model.device)).cpu(), classes, k)


def _ranked(proba: torch.Tensor, classes: list[str], k: int) -> list[list[dict]]:
    values, indices = proba.topk(min(k, len(classes)), dim=1)
    return [
        [{"label": classes[i], "index": i, "probability": p} for p, i in zip(row_p, row_i)]
        for row_p, row_i in zip(values.tolist(), indices.tolist())
    ]


def predict_file(
    model, meta: dict, source, k: int = 3, normalize: bool = True, name: str | None = None, max_pixels: int | None = None
) -> tuple[dict, np.ndarray]:
    """One image file (a path, or uploaded bytes called ``name``): its ``{source, label, top_k}``
    and the uint8 image the model was given. The command line, the HTTP API and the page
    all predict files through here, so they answer alike. ``max_pixels``: see ``prepare_file``.
    """
    image = prepare_file(model, meta, source, normalize, name, max_pixels)
    result = predict_images(model, torch.from_numpy(image)[None], meta, [name or str(source)], k)[0]
    return result, image


def prepare_file(
    model, meta: dict, source, normalize: bool = True, name: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """A file as the model's dataset made its images, as its recorded preprocessing says.

    A digit-style model (MNIST and its kin) gets the file normalised as an MNIST digit
    (``normalize=False``: only made gray and resized); a model of a folder, a CSV or CIFAR
    gets it decoded as its dataset's own files were: the recorded size, resize mode and
    colour (uint8 H x W, or 3 x H x W). ``normalize`` has no say there: nothing is centred.
    A file of more than ``max_pixels`` (None: ``preprocess.MAX_PIXELS``) is refused unread.
    """
    from .preprocess import MAX_PIXELS

    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    decode = decode_settings_of(meta.get("preprocessing"))
    if decode is not None:
        from .datasets.decode import DecodeSettings, read_image

        settings = DecodeSettings(tuple(decode["image_size"]), decode["resize"], decode["color"], max_pixels)
        return read_image(source, settings, name=name)
    from .preprocess import prepare_image

    return prepare_image(source, normalize=normalize, size=tuple(model.input_shape), name=name, max_pixels=max_pixels)


def predict_images(
    model, images_uint8: torch.Tensor, meta: dict, sources: list[str], k: int = 3
) -> list[dict]:
    """Predictions for uint8 images (N x H x W, or N x 3 x H x W), one ``{source, label, top_k}`` dict each,
    with ``rejected`` and ``ood_score`` where the model has a novelty score (``confidence``).

    ``meta`` is the checkpoint's metadata: its class names and recorded preprocessing.
    """
    x = prepare_inputs(images_uint8, meta.get("preprocessing"), model.device)  # on the model's device
    proba, scores = model.proba_and_novelty(x)
    ranked = _ranked(proba.cpu(), meta["classes"], k)
    results = [{"source": s, "label": r[0]["label"], "top_k": r} for s, r in zip(sources, ranked)]
    add_novelty(model, scores, results)
    return results


def add_novelty(model, scores: torch.Tensor | None, results: list[dict]) -> None:
    """``rejected`` and ``ood_score`` in each result, where the model can tell (old checkpoints cannot)."""
    if scores is None:
        return
    threshold = model.novelty.threshold
    for result, score in zip(results, scores.tolist()):
        result["rejected"] = score > threshold  # as model.rejects decides, without a tensor operation per image
        result["ood_score"] = score


@torch.no_grad()
def explain(model: LogisticRegression, images_uint8: torch.Tensor, meta: dict) -> list[dict]:
    """Why the model decided as it did, per image: what it saw and each pixel's evidence.

    ``seen`` is the image after the model's own preprocessing (0-255), H x W, or H x W x 3 for
    colour as images are shown; ``evidence`` is each pixel's contribution to the top class's
    logit (input x weight, its channels added up: H x W), which with ``bias`` sums to that
    logit. ``probabilities`` covers every class, in class order.
    """
    x = prepare_inputs(images_uint8, meta.get("preprocessing"), model.device)
    proba = model.predict_proba(x).cpu()
    top = proba.argmax(dim=1)
    flat = x.reshape(len(x), -1).cpu()
    weights = model.linear.weight.detach().cpu()[top]
    evidence = (flat * weights).reshape(x.shape)
    seen = to_uint8(x.cpu())
    if x.dim() == 4:  # N x C x H x W colour
        evidence, seen = evidence.sum(dim=1), seen.permute(0, 2, 3, 1)
    bias = model.linear.bias.detach().cpu()[top]
    explained = [
        {"probabilities": p.tolist(), "seen": s.tolist(), "evidence": e.tolist(), "bias": float(b)}
        for p, s, e, b in zip(proba, seen, evidence, bias)
    ]
    add_novelty(model, model.novelty_scores(x), explained)
    return explained
