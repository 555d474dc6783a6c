"""Training: minibatch gradient descent over preloaded tensors, validated every epoch.

Batches are slices of a shuffled index into tensors that already sit on the device, so an
epoch is a few hundred small matrix products and nothing else: no Dataset, no DataLoader,
no per-sample work in Python.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch
import torch.nn.functional as F

from .errors import DivergedError, UsageError
from .metrics import loss_and_accuracy
from .settings import DEFAULT_LR, OPTIMIZERS, SCHEDULES, TrainConfig  # noqa: F401  (importable from here too)

SMALL_STEP = 1 << 20  # input elements per step below which one CPU thread is faster than several


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; choose from auto, cpu, cuda")
    return torch.device(name)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    return torch.optim.LBFGS(
        params, lr=cfg.lr, max_iter=cfg.lbfgs_iterations, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=cfg.tolerance, tolerance_change=1e-12,
    )


def make_schedule(optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "constant" or cfg.optimizer == "lbfgs":
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


def fit(
    model,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    cfg: TrainConfig | None = None,
    *,
    progress: bool = False,
    on_epoch=None,
) -> list[dict]:
    """Train ``model`` in place; return one record per epoch.

    Each record holds ``train_loss``/``train_accuracy`` (averaged over the epoch's batches as
    they were trained, like the tutorial's running loss), ``val_loss``/``val_accuracy`` (the
    whole validation set after the epoch), ``lr`` and ``seconds`` (wall time of the epoch,
    training and validation). ``on_epoch(record)`` is called after each epoch. Without a
    validation set (``x_val`` None or empty: the final fit on all training data) records
    have no ``val_*`` entries.

    With L-BFGS each epoch is one full-batch step of ``lbfgs_iterations`` iterations; records
    add ``grad_norm`` (largest gradient entry of the regularised objective), ``iterations`` (so
    far) and ``converged``, and training stops early once converged, or once a step makes no
    progress (float32 precision reached before ``tolerance``; ``converged`` is then false).
    """
    cfg = (cfg or TrainConfig()).check()
    device = model.device
    x_train, y_train = x_train.to(device), y_train.to(device)
    x_train = x_train.reshape(len(x_train), -1)
    validate = x_val is not None and len(x_val) > 0
    if validate:
        x_val, y_val = x_val.to(device), y_val.to(device)
    optimizer = make_optimizer(model, cfg)
    epochs = cfg.epochs_for(len(x_train))
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    schedule = make_schedule(optimizer, cfg, steps_per_epoch * epochs)
    targets = F.one_hot(y_train, model.num_classes).to(x_train.dtype)
    shuffler = torch.Generator().manual_seed(cfg.seed)
    show = progress and sys.stderr.isatty()
    minibatch = cfg.optimizer != "lbfgs"

    history = []
    rows_per_step = min(cfg.batch_size, len(x_train)) if minibatch else len(x_train)
    with _single_thread(device.type == "cpu" and rows_per_step * x_train.shape[1] < SMALL_STEP):
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            extra = {}
            if minibatch:
                order = torch.randperm(len(x_train), generator=shuffler).to(device)
                batches = range(0, len(x_train), cfg.batch_size)
                if show:
                    from tqdm import tqdm  # only when a bar is drawn: tqdm's import is not free

                    batches = tqdm(batches, desc=f"epoch {epoch}/{epochs}", leave=False, file=sys.stderr)
                train_loss, train_acc = _minibatch_epoch(model, optimizer, schedule, x_train, y_train, targets, order, cfg.batch_size, batches)
            else:
                grad_max = _lbfgs_epoch(model, optimizer, x_train, y_train, cfg.weight_decay)
                iterations = optimizer.state[optimizer.param_groups[0]["params"][0]]["n_iter"]
                extra = {"grad_norm": grad_max, "iterations": iterations, "converged": grad_max <= cfg.tolerance}
                train_loss, train_acc = loss_and_accuracy(model, x_train, y_train)
            record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc}
            if validate:
                record["val_loss"], record["val_accuracy"] = loss_and_accuracy(model, x_val, y_val)
            record.update(lr=lr, seconds=time.perf_counter() - start, **extra)
            if not (math.isfinite(train_loss) and math.isfinite(record.get("val_loss", 0.0))):
                raise DivergedError(
                    f"training diverged: the loss became {train_loss} in epoch {epoch} with learning rate "
                    f"{cfg.lr} ({cfg.optimizer}); try a smaller --lr"
                )
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            stalled = extra and len(history) > 1 and history[-2]["train_loss"] <= train_loss  # float32's floor
            if extra.get("converged") or stalled:
                break
    return history


@contextlib.contextmanager
def _single_thread(enabled: bool):
    """Run small steps on one CPU thread.

    A minibatch step multiplies, say, 128x784 inputs by a 784x10 matrix: far too little work
    to share between threads, and on a busy machine their hand-offs cost more than the
    arithmetic. Full-batch steps over the whole training set are big enough to share.
    """
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _minibatch_epoch(model, optimizer, schedule, x, y, targets, order, batch_size, batches) -> tuple[float, float]:
    """One pass over shuffled batches; returns the running mean loss and accuracy."""
    model.train()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for i in batches:
        idx = order[i : i + batch_size]
        batch_loss, batch_correct = batch_gradient(model, x.index_select(0, idx), y.index_select(0, idx), targets.index_select(0, idx))
        optimizer.step()
        if schedule is not None:
            schedule.step()
        loss_sum += batch_loss
        correct += batch_correct
    return loss_sum.item() / len(x), correct.item() / len(x)


def batch_gradient(model, xb: torch.Tensor, yb: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the gradient of the mean cross-entropy on a batch; return (summed loss, correct).

    For softmax regression the gradient has a closed form: with p = softmax(x W^T + b),
    dL/dW = (p - onehot)^T x / n and dL/db = mean(p - onehot). Written out, it is the same
    arithmetic autograd would do, without the cost of recording and replaying a graph, which
    at these sizes is most of a step. ``xb`` is flat (n x features).
    """
    weight, bias = model.linear.weight, model.linear.bias
    logits = torch.addmm(bias, xb, weight.t())
    log_p = logits.log_softmax(1)
    loss_sum = -(log_p * onehot).sum()
    correct = (logits.argmax(1) == yb).sum()
    residual = log_p.exp_().sub_(onehot).div_(len(xb))
    weight.grad = residual.t().mm(xb)
    bias.grad = residual.sum(0)
    return loss_sum, correct


def regularised_loss(model, x, y, weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy plus the penalty SGD's and Adam's weight_decay imply: (wd/2)*||theta||^2."""
    loss = F.cross_entropy(model(x), y)
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum(p.pow(2).sum() for p in model.parameters())
    return loss


def _lbfgs_epoch(model, optimizer, x, y, weight_decay: float) -> float:
    """One full-batch L-BFGS step; returns the largest gradient entry at the new point."""

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = regularised_loss(model, x, y, weight_decay)
        loss.backward()
        return loss

    optimizer.step(closure)
    closure()  # the gradient where the step ended, to judge convergence
    return max(p.grad.abs().max().item() for p in model.parameters())
