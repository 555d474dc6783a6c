"""Learning after training: exact gradient steps from a model's current weights.

A logistic regression is convex and small, so a handful of new images can be learnt in a few
full-batch steps of the closed-form gradient (``train.batch_gradient``), in milliseconds. The
caller mixes a replay of the old training images into ``x``/``y`` so the model does not forget
them; ``max_change`` bounds how far one call may move the weights, whatever labels it is given.
"""

from __future__ import annotations

import torch

from .train import batch_gradient, target_rows

STEPS = 10  # full-batch steps per call
LR = 0.05  # a safe step for [0, 1] inputs: the objective's curvature is at most ~||x||^2 / 2


@torch.no_grad()
def gradient_steps(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = STEPS,
    lr: float = LR,
    sample_weight: torch.Tensor | None = None,
    max_change: float | None = None,
) -> float:
    """Take ``steps`` plain gradient steps on the mean cross-entropy of ``(x, y)`` (each image's
    loss weighted by ``sample_weight`` when given); return the loss before the first step.

    With ``max_change``, the parameters end at most that far (L2 norm over weight and bias
    together) from where they started: a burst of wrong labels moves the model a bounded step.
    """
    weight, bias = model.linear.weight, model.linear.bias
    x = x.to(weight.device, weight.dtype).reshape(len(x), -1)
    y = y.to(weight.device)
    hot = target_rows(y, model.num_classes, None, x.dtype)
    weighted = sample_weight is not None
    if weighted:
        hot.mul_(sample_weight.to(hot)[:, None])
    rows = hot.sum() if weighted else len(x)  # the weighted mean divides by the total weight
    start = [weight.detach().clone(), bias.detach().clone()]
    first = None
    for _ in range(steps):
        loss_sum, _ = batch_gradient(model, x, y, hot, rows=rows, weighted=weighted)
        if first is None:
            first = float(loss_sum) / float(rows)
        weight.sub_(weight.grad, alpha=lr)
        bias.sub_(bias.grad, alpha=lr)
    weight.grad = bias.grad = None
    if max_change is not None:
        _clip_change(weight, bias, start, max_change)
    return first if first is not None else float("nan")


def _clip_change(weight, bias, start, max_change: float) -> None:
    """Pull ``(weight, bias)`` back along the line to ``start`` until within ``max_change`` of it."""
    dw, db = weight - start[0], bias - start[1]
    norm = torch.sqrt(dw.pow(2).sum() + db.pow(2).sum()).item()
    if norm > max_change:
        scale = max_change / norm
        weight.copy_(start[0] + dw * scale)
        bias.copy_(start[1] + db * scale)


# Folders of labelled images (``learn``'s input, the server's stored corrections) are named after
# the model's classes, as ``--dataset folder`` names classes after folders.
def class_folder(classes: list[str], index: int) -> str:
    """The folder for class ``index``: its name when that is a safe folder name, else the index."""
    name = classes[index]
    safe = name and name.strip() == name and name not in (".", "..") and not any(c in name for c in '/\\\0:*?"<>|')
    return name if safe else str(index)


def class_of_folder(classes: list[str], folder: str) -> int | None:
    """The class a folder holds: named as ``class_folder`` names it, by the class's index, or by the
    first word of a name such as MNIST's ``7 - seven``; None when it names no class."""
    if folder in classes:
        return classes.index(folder)
    if folder.isdigit() and int(folder) < len(classes):
        return int(folder)
    heads = [c.split(" - ")[0] for c in classes]
    return heads.index(folder) if heads.count(folder) == 1 else None
