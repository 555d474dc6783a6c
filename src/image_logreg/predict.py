"""Prediction on dataset samples and image files, with top-k probabilities."""

from __future__ import annotations

import torch

from .data import prepare_inputs
from .model import LogisticRegression


def top_k(model: LogisticRegression, x: torch.Tensor, classes: list[str], k: int = 3) -> list[list[dict]]:
    """For each row of ``x`` (float images in [0, 1]), the ``k`` most probable classes."""
    proba = model.predict_proba(x.to(model.device)).cpu()
    values, indices = proba.topk(min(k, len(classes)), dim=1)
    return [
        [{"label": classes[i], "index": int(i), "probability": float(p)} for p, i in zip(row_p.tolist(), row_i.tolist())]
        for row_p, row_i in zip(values, indices)
    ]


def predict_images(
    model, images_uint8: torch.Tensor, meta: dict, sources: list[str], k: int = 3
) -> list[dict]:
    """Predictions for uint8 images (N x H x W), one ``{source, label, top_k}`` dict each.

    ``meta`` is the checkpoint's metadata: its class names and recorded preprocessing.
    """
    x = prepare_inputs(images_uint8, meta.get("preprocessing"), model.device)
    ranked = top_k(model, x, meta["classes"], k)
    return [{"source": s, "label": r[0]["label"], "top_k": r} for s, r in zip(sources, ranked)]
