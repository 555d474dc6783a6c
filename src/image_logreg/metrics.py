"""Loss, accuracy and the confusion matrix, computed over whole tensors without autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EVAL_CHUNK = 16384  # rows per forward pass: bounds memory, large enough to amortise overhead


@torch.inference_mode()
def logits_of(model, x: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    model.train(was_training)
    return out


@torch.inference_mode()
def loss_and_accuracy(model, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all of ``(x, y)``."""
    logits = logits_of(model, x)
    loss = F.cross_entropy(logits, y, reduction="sum") / len(y)
    correct = (logits.argmax(1) == y).sum()
    return loss.item(), correct.item() / len(y)


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[i, j]`` counts samples of true class ``i`` predicted as ``j``."""
    flat = y_true.long().cpu() * num_classes + y_pred.long().cpu()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_scores(cm: torch.Tensor) -> dict[str, list[float | None]]:
    """Accuracy (= recall), precision and F1 of each class from a confusion matrix."""
    cm = cm.double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    recall = tp / support
    precision = tp / predicted
    f1 = 2 * precision * recall / (precision + recall)
    as_list = lambda t: [None if v != v else round(v, 6) for v in t.tolist()]  # NaN -> None for JSON
    return {"recall": as_list(recall), "precision": as_list(precision), "f1": as_list(f1), "support": [int(s) for s in support]}


@torch.inference_mode()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    """Loss, accuracy, per-class recall (also as ``per_class``), precision and F1, and the
    confusion matrix of ``model`` on ``(x, y)``."""
    return scores_of_logits(logits_of(model, x), y, classes)


@torch.inference_mode()
def scores_of_logits(logits: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    """``evaluate``'s figures from logits already computed (callers that need them too)."""
    y = y.to(logits.device)
    pred = logits.argmax(1)
    cm = confusion_matrix(y, pred, len(classes))
    scores = per_class_scores(cm)
    return {
        "n": len(y),
        "loss": (F.cross_entropy(logits, y, reduction="sum") / len(y)).item(),
        "accuracy": (pred == y).sum().item() / len(y),
        "per_class": {c: acc for c, acc in zip(classes, scores["recall"])},  # = recall, under the name scripts already read
        "recall": dict(zip(classes, scores["recall"])),
        "precision": dict(zip(classes, scores["precision"])),
        "f1": dict(zip(classes, scores["f1"])),
        "confusion": cm.tolist(),
    }


@torch.no_grad()
def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Expected calibration error of the top-class probability, with its per-bin breakdown.

    Confidences (each row's largest probability) fall into ``bins`` equal-width bins
    ``(lo, hi]``; ECE = sum over bins of |accuracy - mean confidence| * (fraction of samples).
    Empty bins get ``None`` for confidence and accuracy and contribute nothing.
    """
    if probs.ndim != 2 or len(probs) == 0 or len(probs) != len(labels):
        raise ValueError(f"need N x C probabilities and N labels, got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    # float64: sums over tens of thousands of samples, and the edges compared exactly as written
    confidence, predicted = probs.detach().cpu().double().max(dim=1)
    correct = (predicted == labels.detach().cpu().long()).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1])  # bin i holds edges[i] < c <= edges[i + 1]
    count = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    mean_conf, mean_acc = conf_sum / count.clamp(min=1), acc_sum / count.clamp(min=1)
    ece = ((mean_acc - mean_conf).abs() * count / len(probs)).sum().item()
    empty = lambda values: [None if n == 0 else v for v, n in zip(values.tolist(), count.tolist())]
    return {
        "ece": ece,
        "n": len(probs),
        "bins": bins,
        "edges": edges.tolist(),
        "confidence": empty(mean_conf),
        "accuracy": empty(mean_acc),
        "count": count.tolist(),
        "mean_confidence": confidence.mean().item(),
        "overall_accuracy": correct.mean().item(),
    }
