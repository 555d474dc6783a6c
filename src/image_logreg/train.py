"""Training: minibatch gradient descent over preloaded tensors, validated every epoch.

Batches are slices of a shuffled index into tensors that already sit on the device, so an
epoch is a few hundred small matrix products and nothing else: no Dataset, no DataLoader,
no per-sample work in Python. A set too large for memory (``stream.StreamedImages``) gives
each batch's rows from its uint8 file instead, made float as they are taken.

At a few hundred microseconds a step, the cost is the number of operations more than their
size: a step runs on one CPU thread while a second gathers the next batches' rows
(``_step_rows``), and the optimizer updates one vector holding the weight and the bias
(``optim.flat_parameters``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time

import torch
import torch.nn.functional as F

from . import optim
from .distributed import SINGLE, Group
from .errors import DivergedError, UsageError
from .metrics import loss_and_accuracy
from .settings import DEFAULT_LR, OPTIMIZERS, SCHEDULES, TrainConfig  # noqa: F401  (importable from here too)
from .stream import StreamedImages

# A loss this many times that of a model that knows nothing (log of the classes) is no step
# towards a fit: the learning rate throws the weights ever further (found at once, not only at NaN).
DIVERGED = 10
SMALL_STEP = 1 << 20  # input elements per step below which one CPU thread is faster than several
AHEAD_BYTES = 4 << 20  # inputs gathered per hand-off to the second thread: a few batches, inside a cache


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; choose from auto, cpu, cuda")
    return torch.device(name)


def make_optimizer(params, cfg: TrainConfig):
    params = list(params)
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optim.LBFGS(
        params, lr=cfg.lr, max_iter=cfg.lbfgs_iterations, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=cfg.tolerance, tolerance_change=1e-12,
    )


def make_schedule(cfg: TrainConfig, total_steps: int):
    """The learning rate after each minibatch step (L-BFGS keeps its own)."""
    if cfg.schedule == "constant" or cfg.optimizer == "lbfgs":
        return optim.constant(cfg.lr)
    return optim.cosine(cfg.lr, total_steps)


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
    group: Group = SINGLE,
    init=None,
) -> "History":
    """Train ``model`` in place; return one record per epoch (a ``History``: a list that also
    says which epoch's weights the model ends with, and whether training stopped early).
    ``cfg``: how, a ``TrainConfig`` (a run's ``RunConfig`` is one too; None: the defaults).

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

    ``group`` (see ``distributed``): each rank passes the same data and settings and computes
    its share of every batch; the summed gradients make every rank take the step one process
    takes, and the figures in the records are those of the whole sets.

    With a validation set and ``keep_best`` (the default), the model ends with the weights of the
    epoch of least validation loss (a later epoch wins a near tie, within 0.1%), and minibatch
    training stops once that has not improved by 0.1% for ``cfg.patience_for(epochs)`` epochs.
    ``class_weight="balanced"`` weighs each image's loss by n / (classes x its class's count).

    ``init``: a model of the same classes and input shape whose weights ``model`` starts from
    (continued training) instead of its own.
    """
    cfg = (cfg or TrainConfig()).resolved()
    if init is not None:
        start_from(model, init)
    device = model.device
    streamed = isinstance(x_train, StreamedImages)
    if streamed and cfg.optimizer == "lbfgs":
        raise UsageError("L-BFGS takes full-batch steps over inputs held in memory, not streamed ones")
    y_train = y_train.to(device)
    if not streamed:
        x_train = x_train.to(device).reshape(len(x_train), -1)
    validate = x_val is not None and len(x_val) > 0
    if validate:
        y_val = y_val.to(device)
        if not isinstance(x_val, StreamedImages):
            x_val = x_val.to(device)
    group.broadcast_params(model)
    epochs = cfg.epochs_for(len(x_train))
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    schedule = make_schedule(cfg, steps_per_epoch * epochs)
    weights = balanced_weights(y_train, model.num_classes) if cfg.class_weight == "balanced" else None
    # streamed: a batch's one-hot rows are made with it, so nothing the size of the set is kept
    targets = None if streamed else target_rows(y_train, model.num_classes, weights, x_train.dtype)
    shuffler = torch.Generator().manual_seed(cfg.seed)
    show = progress and sys.stderr.isatty()
    minibatch = cfg.optimizer != "lbfgs"
    # a minibatch step's optimizer updates one vector that holds the weight and the bias
    stepped = optim.flat_parameters(model.parameters()) if minibatch else contextlib.nullcontext()

    history = History()
    best = BestEpoch(model) if validate and cfg.keep_best else None
    patience = cfg.patience_for(epochs) if best and minibatch else 0
    rows_per_step = (min(cfg.batch_size, len(x_train)) if minibatch else len(x_train)) // group.world_size
    small_steps = device.type == "cpu" and rows_per_step * x_train.shape[1] < SMALL_STEP
    # one-thread steps leave a core idle: it gathers the batches a few ahead (one rank, in memory)
    ahead = minibatch and small_steps and not streamed and not group.active and torch.get_num_threads() > 1
    per_hand_off = max(1, AHEAD_BYTES // (rows_per_step * x_train.shape[1] * x_train.element_size())) if ahead else 0
    with stepped as flat, one_thread(small_steps):
        optimizer = make_optimizer([flat] if minibatch else model.parameters(), cfg)
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            lr = optimizer.lr if minibatch else cfg.lr
            extra = {}
            if minibatch:
                order = torch.randperm(len(x_train), generator=shuffler).to(device)
                batches = order.split(cfg.batch_size)  # views, made in one call
                if show:
                    from tqdm import tqdm  # only when a bar is drawn: tqdm's import is not free

                    batches = tqdm(batches, desc=f"epoch {epoch}/{epochs}", leave=False, file=sys.stderr)
                train_loss, train_acc = _minibatch_epoch(model, optimizer, schedule, (epoch - 1) * steps_per_epoch, x_train, y_train, targets, batches, group, weights, per_hand_off)
            else:
                grad_max = _lbfgs_epoch(model, optimizer, x_train, y_train, targets, cfg.weight_decay, group, weights is not None)
                extra = {"grad_norm": grad_max, "iterations": optimizer.iterations, "converged": grad_max <= cfg.tolerance}
                train_loss, train_acc = _chunked_loss_and_accuracy(model, x_train, y_train, group)
            record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc}
            if validate:
                record["val_loss"], record["val_accuracy"] = _loss_and_accuracy(model, x_val, y_val, group)
            record.update(lr=lr, seconds=time.perf_counter() - start, **extra)
            worst = max(train_loss, record.get("val_loss", 0.0))
            if not math.isfinite(worst) or worst > DIVERGED * math.log(max(model.num_classes, 2)):
                raise DivergedError(
                    f"training diverged: the loss became {worst:.6g} in epoch {epoch} (a model that knows nothing "
                    f"scores {math.log(max(model.num_classes, 2)):.2f}) with learning rate {cfg.lr} ({cfg.optimizer}); "
                    "try a smaller --lr"
                )
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            stalled = extra and len(history) > 1 and history[-2]["train_loss"] <= train_loss  # float32's floor
            if extra.get("converged") or stalled:
                break
            if best is not None:
                best.update(epoch, record["val_loss"])
                if patience and best.stalled >= patience and epoch < epochs:
                    history.stopped_early = True
                    break
    if best is not None:
        best.restore()
        history.kept_epoch = best.epoch
    return history


@torch.no_grad()
def start_from(model, init) -> None:
    """Copy ``init``'s weights into ``model``; a UsageError unless both take the same inputs and classes."""
    want, have = (tuple(model.input_shape), model.num_classes), (tuple(init.input_shape), init.num_classes)
    if want != have:
        raise UsageError(f"cannot start from a model of {'x'.join(map(str, have[0]))} inputs and {have[1]} classes: "
                         f"this one takes {'x'.join(map(str, want[0]))} inputs and {want[1]} classes")
    model.linear.weight.copy_(init.linear.weight)
    model.linear.bias.copy_(init.linear.bias)


class History(list):
    """The records of ``fit``, one per epoch trained, and how training ended."""

    kept_epoch: int | None = None  # the epoch whose weights the model ends with (None: the last)
    stopped_early: bool = False  # stopped by the patience rule before the planned epochs

    @property
    def kept(self) -> dict:
        """The record of the epoch whose weights the model ends with."""
        return self[self.kept_epoch - 1] if self.kept_epoch else self[-1]


class BestEpoch:
    """The epoch of least validation loss so far, its weights, and how long since it improved."""

    TIE = 1e-3  # relative: a later epoch this close to the best is taken, having trained longer

    def __init__(self, model):
        self.params = list(model.parameters())
        self.loss = math.inf
        self.epoch: int | None = None
        self.weights: list[torch.Tensor] = []
        self.stalled = 0  # epochs since the loss last fell by more than TIE

    def update(self, epoch: int, val_loss: float) -> None:
        if val_loss <= self.loss * (1 + self.TIE):
            self.epoch = epoch
            self.weights = [p.detach().clone() for p in self.params]
        self.stalled = 0 if val_loss < self.loss * (1 - self.TIE) else self.stalled + 1
        self.loss = min(self.loss, val_loss)

    @torch.no_grad()
    def restore(self) -> None:
        for p, w in zip(self.params, self.weights):
            p.copy_(w)


def balanced_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each class's weight n / (classes x count), as scikit-learn's ``class_weight="balanced"``;
    a class with no images weighs 0."""
    counts = torch.bincount(y, minlength=num_classes).double()
    weights = torch.where(counts > 0, len(y) / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float().to(y.device)


def target_rows(y: torch.Tensor, num_classes: int, weights: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """One-hot rows of ``y``, each scaled by its class's weight when there are weights."""
    rows = F.one_hot(y, num_classes).to(dtype)
    return rows if weights is None else rows.mul_(weights.to(dtype).index_select(0, y)[:, None])


@contextlib.contextmanager
def one_thread(enabled: bool = True):
    """The calling thread's products and sums on one CPU thread, for the length of the block.

    A minibatch step multiplies, say, 128x784 inputs by a 784x10 matrix: far too little work
    to share between threads, and on a busy machine their hand-offs cost more than the
    arithmetic. Full-batch steps over the whole training set are big enough to share, and
    share them by pieces (``_each_piece``), each piece on one thread.
    """
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _minibatch_epoch(model, optimizer, schedule, steps_before: int, x, y, targets, batches,
                     group: Group = SINGLE, weights: torch.Tensor | None = None, ahead: int = 0) -> tuple[float, float]:
    """One pass over ``batches`` (the shuffled order's slices, as ``order.split(batch_size)``);
    returns the running mean loss and accuracy. ``schedule(k)`` is the learning rate after ``k``
    steps, of which ``steps_before`` were taken in earlier epochs. ``ahead``: see ``_step_rows``.

    With several ranks, each takes its slice of every batch of the shared shuffle; its gradient
    is divided by the whole batch's size, so the sum over the ranks is the batch's mean gradient.
    Each step writes its loss and predictions into the epoch's buffers, counted once at its end:
    at a few hundred microseconds a step, the three operations saved per step are 4% of an epoch.
    """
    model.train()
    log_likelihoods = torch.empty(len(batches), device=x.device)
    predicted = torch.empty(len(y), dtype=torch.long, device=x.device)
    taken, done = [], 0
    with _step_rows(x, y, targets, batches, group, weights, model.num_classes, ahead) as steps:
        for step, (rows, idx, xb, hot) in enumerate(steps, steps_before + 1):
            _set_gradient(model, xb, hot, rows, weights is not None, log_likelihoods[step - steps_before - 1],
                          predicted[done : done + len(idx)])
            group.all_reduce_grads(optimizer.params)
            optimizer.step()
            optimizer.lr = schedule(step)
            taken.append(idx)
            done += len(idx)
    labels = y.index_select(0, torch.cat(taken)) if taken else y[:0]
    loss_sum, correct = -log_likelihoods.sum(), (predicted[:done] == labels).sum()
    if group.active:
        totals = group.all_reduce(torch.stack([loss_sum.double(), correct.double()]))
        return totals[0].item() / len(x), totals[1].item() / len(x)
    return loss_sum.item() / len(x), correct.item() / len(x)


@contextlib.contextmanager
def _step_rows(x, y, targets, batches, group: Group, weights, num_classes: int, ahead: int = 0):
    """Yield an iterator of each step's (batch size, the row indices this rank takes, their inputs,
    their targets), for the ``batches`` of one epoch.

    ``ahead`` (in-memory inputs, one rank): a second thread gathers the rows, that many batches at
    a hand-off, one hand-off ahead of the steps. Gathering 128 rows from all over the training set
    is a fifth of a one-thread step, and the other core is idle; the gathers are the same calls,
    so the steps see the same tensors.
    """
    def step_rows(idx):
        rows = len(idx)
        if group.active:
            idx = idx[group.shard(rows)]
        if targets is None:  # streamed: a batch's one-hot rows are made with it
            return rows, idx, x.take(idx), target_rows(y.index_select(0, idx), num_classes, weights)
        return rows, idx, x.index_select(0, idx), targets.index_select(0, idx)

    if not ahead:
        yield map(step_rows, batches)
        return

    from concurrent.futures import ThreadPoolExecutor

    pending_batches = iter(batches)

    def hand_off(chunk):
        return [step_rows(idx) for idx in chunk]

    # like _each_piece's workers, the thread's products stay on it (OpenMP and MKL settings are per thread)
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        def next_hand_off():
            chunk = list(itertools.islice(pending_batches, ahead))
            return pool.submit(hand_off, chunk) if chunk else None

        def gathered():
            pending = next_hand_off()
            while pending is not None:
                ready = pending.result()
                pending = next_hand_off()
                yield from ready

        yield gathered()


@torch.no_grad()
def batch_gradient(
    model, xb: torch.Tensor, yb: torch.Tensor, onehot: torch.Tensor, rows: int | None = None, weighted: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the gradient of the mean cross-entropy on a batch; return (summed loss, correct).

    For softmax regression the gradient has a closed form: with p = softmax(x W^T + b),
    dL/dW = (p - onehot)^T x / n and dL/db = mean(p - onehot). Written out, it is the same
    arithmetic autograd would do, without the cost of recording and replaying a graph, which
    at these sizes is most of a step. ``xb`` is flat (n x features). ``rows`` (default: the
    rows of ``xb``) is the n to divide by: a rank's share of a batch divides by the whole batch's.
    ``weighted``: ``onehot``'s rows are scaled by their image's weight w (``target_rows``), which
    makes the loss sum of w * cross-entropy and the residual w * (p - onehot).
    """
    log_likelihood = torch.empty((), device=xb.device)
    predicted = torch.empty(len(xb), dtype=torch.long, device=xb.device)
    _set_gradient(model, xb, onehot, rows, weighted, log_likelihood, predicted)
    return -log_likelihood, (predicted == yb).sum()


def _set_gradient(model, xb, onehot, rows, weighted: bool, log_likelihood: torch.Tensor, predicted: torch.Tensor) -> None:
    """``batch_gradient``'s work, its figures written into ``log_likelihood`` (0-d: the summed
    log-probability of the targets) and ``predicted`` (each row's class)."""
    weight, bias = model.linear.weight, model.linear.bias
    logits = torch.addmm(bias, xb, weight.t())
    log_p = logits.log_softmax(1)
    torch.sum(log_p * onehot, (0, 1), out=log_likelihood)
    torch.argmax(logits, 1, out=predicted)
    residual = _residual(log_p, onehot, weighted).div_(len(xb) if rows is None else rows)
    if weight.grad is None:
        weight.grad, bias.grad = torch.empty_like(weight), torch.empty_like(bias)
    # in place: inside ``fit`` the gradients are views of the optimizer's one vector
    torch.mm(residual.t(), xb, out=weight.grad)
    torch.sum(residual, 0, out=bias.grad)


def _residual(log_p: torch.Tensor, targets: torch.Tensor, weighted: bool) -> torch.Tensor:
    """p - onehot, or with weighted targets w * p - w * onehot (a row of targets sums to its w)."""
    p = log_p.exp_()
    return (p.mul_(targets.sum(1, keepdim=True)) if weighted else p).sub_(targets)


def regularised_loss(model, x, y, weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy plus the penalty SGD's and Adam's weight_decay imply: (wd/2)*||theta||^2."""
    loss = F.cross_entropy(model(x), y)
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum(p.pow(2).sum() for p in model.parameters())
    return loss


def _lbfgs_epoch(model, optimizer, x, y, onehot, weight_decay: float, group: Group = SINGLE, weighted: bool = False) -> float:
    """One full-batch L-BFGS step; returns the largest gradient entry at the new point."""

    def closure():
        return full_objective(model, x, y, onehot, weight_decay, group, weighted)

    optimizer.step(closure)
    closure()  # the gradient where the step ended, to judge convergence
    return max(p.grad.abs().max().item() for p in model.parameters())


# Full-batch sums are cut into this many pieces (fewer for a large model or a tiny set), each
# summed on its own, then added up in a fixed order. The pieces do not depend on the number of
# ranks, so one process and any number of ranks do exactly the same arithmetic: L-BFGS feeds
# every rounding difference back into its curvature estimates and line searches, and after a
# few dozen iterations a reordered sum alone moves the weights by 1e-5 to 1e-3.
CHUNKS = 64
CHUNK_BUFFER = 1 << 22  # floats: the partial gradients summed across ranks at each evaluation


def chunk_bounds(n: int, parameters: int) -> list[tuple[int, int]]:
    """The fixed pieces ``[lo, hi)`` of ``n`` rows that full-batch sums are taken over."""
    k = max(1, min(CHUNKS, n, max(8, CHUNK_BUFFER // max(parameters, 1))))
    return [(n * c // k, n * (c + 1) // k) for c in range(k)]


def _each_piece(piece, chunks: range, device: torch.device) -> None:
    """Run ``piece(c)`` for each chunk, each on one CPU thread, the chunks spread over as many
    threads as torch would use.

    A matrix product split between threads rounds differently from the same product on one (the
    split changes which kernel handles which part of the sum), so a piece must not depend on the
    thread count: then a process with 16 threads and ranks with one each compute the same bits.
    """
    if device.type != "cpu":
        for c in chunks:
            piece(c)
        return
    threads = torch.get_num_threads()
    with one_thread():
        if threads == 1 or len(chunks) == 1:
            for c in chunks:
                piece(c)
        else:
            from concurrent.futures import ThreadPoolExecutor

            def untracked(c):  # grad mode is per thread: a worker starts with autograd on
                with torch.no_grad():
                    piece(c)

            # torch.set_num_threads() on the calling thread does not reach a new thread's OpenMP
            # and MKL settings (both are per thread): MKL would split each product again there.
            with ThreadPoolExecutor(min(threads, len(chunks)), initializer=torch.set_num_threads, initargs=(1,)) as pool:
                list(pool.map(untracked, chunks))  # list(): raises a piece's error here


@torch.no_grad()
def full_objective(model, x, y, onehot, weight_decay: float, group: Group = SINGLE, weighted: bool = False) -> torch.Tensor:
    """Set the gradient of the regularised objective on all of ``(x, y)``; return the objective.

    The objective is mean cross-entropy + ``weight_decay/2 * ||theta||^2``, its gradient in the
    closed form of ``batch_gradient``. Each rank computes the pieces (``chunk_bounds``) in its
    share and leaves the others' rows of the buffer zero: summing the buffers across ranks is
    then exact, and every rank adds the pieces up in the same order.
    """
    weight, bias = model.linear.weight, model.linear.bias
    n, w = len(x), weight.numel()
    bounds = chunk_bounds(n, w + bias.numel())
    parts = torch.zeros(len(bounds), w + bias.numel() + 1, dtype=x.dtype, device=x.device)

    def piece(c):
        lo, hi = bounds[c]
        xb, hot = x[lo:hi], onehot[lo:hi]
        log_p = torch.addmm(bias, xb, weight.t()).log_softmax(1)
        parts[c, -1] = -(log_p * hot).sum()
        residual = _residual(log_p, hot, weighted)
        parts[c, :w] = residual.t().mm(xb).reshape(-1)
        parts[c, w:-1] = residual.sum(0)

    _each_piece(piece, range(len(bounds))[group.shard(len(bounds))], x.device)
    group.all_reduce(parts)
    with one_thread():  # the pieces added up in one fixed order, whatever the thread count
        total = parts[:, :-1].sum(0).div_(n)
        loss = parts[:, -1].double().sum() / n
    weight.grad, bias.grad = total[:w].view_as(weight).clone(), total[w:].clone()
    if weight_decay:
        loss = loss + 0.5 * weight_decay * sum(p.double().pow(2).sum() for p in (weight, bias))
        for p in (weight, bias):
            p.grad.add_(p, alpha=weight_decay)
    return loss


def _loss_and_accuracy(model, x, y, group: Group = SINGLE) -> tuple[float, float]:
    """``loss_and_accuracy`` over all of ``(x, y)``; with several ranks, each takes its share."""
    if not group.active:
        return loss_and_accuracy(model, x, y)
    return _chunked_loss_and_accuracy(model, x, y, group)


@torch.no_grad()
def _chunked_loss_and_accuracy(model, x, y, group: Group = SINGLE) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``(x, y)``, summed piece by piece as ``full_objective``
    sums: the same figures on any number of ranks (L-BFGS stops on them when they stall)."""
    bounds = chunk_bounds(len(x), model.linear.weight.numel() + model.linear.bias.numel())
    parts = torch.zeros(len(bounds), 2, dtype=torch.float64, device=x.device)
    weight, bias = model.linear.weight, model.linear.bias

    def piece(c):
        lo, hi = bounds[c]
        logits = torch.addmm(bias, x[lo:hi].reshape(hi - lo, -1), weight.t())
        parts[c, 0] = F.cross_entropy(logits, y[lo:hi], reduction="sum").double()
        parts[c, 1] = (logits.argmax(1) == y[lo:hi]).sum().double()

    _each_piece(piece, range(len(bounds))[group.shard(len(bounds))], x.device)
    group.all_reduce(parts)
    with one_thread():
        totals = parts.sum(0)
    return totals[0].item() / len(y), totals[1].item() / len(y)


# --- learning after training: a few exact steps from the current weights ---------------------
# A logistic regression is convex and small: a handful of new images is learnt in a few full-batch
# steps of the closed-form gradient, in milliseconds (``LogisticRegression.partial_fit``, the
# server's corrections). The caller mixes in a replay of old images itself, so the model does not
# forget them; ``max_change`` bounds how far one call may move the weights, whatever the labels.

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
        clip_change(weight, bias, start, max_change)
    return first if first is not None else float("nan")


def distance_from(weight, bias, start) -> float:
    """How far ``(weight, bias)`` are from ``start``, their values before: the L2 norm over both."""
    return torch.sqrt((weight - start[0]).pow(2).sum() + (bias - start[1]).pow(2).sum()).item()


def clip_change(weight, bias, start, max_change: float) -> None:
    """Pull ``(weight, bias)`` back along the line to ``start`` until within ``max_change`` of it."""
    norm = distance_from(weight, bias, start)
    if norm > max_change:
        scale = max_change / norm
        weight.copy_(start[0] + (weight - start[0]) * scale)
        bias.copy_(start[1] + (bias - start[1]) * scale)
