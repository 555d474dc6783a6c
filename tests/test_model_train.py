import contextlib
import itertools
import math

import pytest
import torch

from image_logreg import LogisticRegression, TrainConfig, fit, load_split, split_indices, to_float
from image_logreg.errors import DivergedError, UsageError
from image_logreg.metrics import confusion_matrix, evaluate


def toy_tensors(toy_data):
    data = load_split("mnist", toy_data, "train", download=False)
    train_idx, val_idx = split_indices(len(data), 0.2, seed=0)
    x, y = to_float(data.images), data.labels
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def test_model_shapes_and_probabilities():
    model = LogisticRegression((28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 7850
    x = torch.rand(5, 28, 28)
    assert model(x).shape == (5, 10)
    assert model(x.reshape(5, 1, 28, 28)).shape == (5, 10)  # ToTensor's 1x28x28 works too
    proba = model.predict_proba(x)
    assert torch.allclose(proba.sum(1), torch.ones(5)) and (proba >= 0).all()
    assert torch.equal(model.predict(x), proba.argmax(1))
    assert LogisticRegression((8, 6), 3).linear.weight.shape == (3, 48)


@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(),
        TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=32, epochs=6, schedule="constant"),
        TrainConfig(optimizer="lbfgs", lr=1.0, epochs=3, weight_decay=1e-4),
    ],
    ids=["default-adam", "sgd-momentum", "lbfgs"],
)
def test_fit_lowers_loss_and_learns(toy_data, cfg):
    x, y, xv, yv = toy_tensors(toy_data)
    torch.manual_seed(0)
    model = LogisticRegression()
    before = torch.nn.functional.cross_entropy(model(xv), yv).item()
    history = fit(model, x, y, xv, yv, cfg)
    assert len(history) == cfg.epochs_for(len(x)) or history[-1].get("converged") or history.stopped_early
    assert history[-1]["val_loss"] < before * 0.5
    assert history[-1]["val_accuracy"] > 0.9
    assert set(history[0]) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "lr"}
    assert all(h["seconds"] > 0 for h in history)


def test_fit_is_reproducible(toy_data):
    tensors = toy_tensors(toy_data)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LogisticRegression()
        fit(model, *tensors, TrainConfig(epochs=2))
        runs.append(model.linear.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_cosine_schedule_decays_lr(toy_data):
    history = fit(LogisticRegression(), *toy_tensors(toy_data), TrainConfig(epochs=4, lr=0.01))
    lrs = [h["lr"] for h in history]
    assert lrs[0] == 0.01 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01


def test_divergence_names_the_learning_rate(toy_data):
    cfg = TrainConfig(optimizer="sgd", lr=1e38, epochs=3, schedule="constant")
    with pytest.raises(DivergedError, match=r"learning rate 1e\+38.*--lr"):
        fit(LogisticRegression(), *toy_tensors(toy_data), cfg)


def test_default_epochs_make_at_least_mnists_step_count():
    """3 epochs where an epoch is hundreds of steps (MNIST's settings are unchanged); on a small set,
    as many epochs as make MNIST's 1,125 steps. An explicit --epochs always wins."""
    auto = TrainConfig()
    assert auto.epochs_for(48_000) == 3 and auto.epochs_for(60_000) == 3  # MNIST and all of it
    assert auto.epochs_for(1_150) == 125  # scikit-learn's digits: 9 steps per epoch
    assert auto.epochs_for(6) == 1125  # one step per epoch
    assert all(math.ceil(n / 128) * auto.epochs_for(n) >= 1125 for n in range(1, 50_000, 97))
    assert TrainConfig(epochs=4).epochs_for(1_150) == 4
    assert TrainConfig(optimizer="lbfgs").epochs_for(1_150) == 5  # a full-batch step is not a minibatch step
    history = fit(LogisticRegression((2, 2), 2), torch.rand(300, 2, 2), torch.randint(0, 2, (300,)), None, None)
    assert len(history) == auto.epochs_for(300) == 375


@pytest.mark.parametrize(
    "bad", [dict(lr=0), dict(lr=math.nan), dict(batch_size=0), dict(epochs=-1), dict(momentum=-1), dict(optimizer="rmsprop")]
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(UsageError):
        TrainConfig(**bad)


def test_evaluate_reports_confusion_and_per_class():
    model = LogisticRegression((2, 2), 3)
    with torch.no_grad():
        model.linear.weight.copy_(torch.eye(3, 4) * 10)
        model.linear.bias.zero_()
    x = torch.eye(4)[:3].reshape(3, 2, 2).repeat(2, 1, 1)  # one-hot pixel k -> class k
    y = torch.tensor([0, 1, 2, 0, 1, 1])  # the last one is wrong: pixel 2 but label 1
    result = evaluate(model, x, y, ["a", "b", "c"])
    assert result["n"] == 6 and result["accuracy"] == pytest.approx(5 / 6)
    assert result["confusion"] == [[2, 0, 0], [0, 2, 1], [0, 0, 1]]
    assert result["per_class"] == {"a": 1.0, "b": pytest.approx(2 / 3, abs=1e-6), "c": 1.0}
    assert result["precision"]["c"] == 0.5


def test_confusion_matrix_counts():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_lbfgs_reaches_the_regularised_optimum():
    """Compared with Newton's method in float64 on a small problem, an independent solver."""
    torch.manual_seed(0)
    x = torch.rand(300, 4, 4)
    y = (x[:, 0, :2].sum(1) * 1.5 + torch.randn(300) * 0.3).long().clamp(0, 2)
    wd = 0.05
    model = LogisticRegression((4, 4), 3)
    history = fit(model, x, y, x[:50], y[:50], TrainConfig(optimizer="lbfgs", epochs=20, weight_decay=wd, tolerance=1e-5))
    assert history[-1]["converged"] and history[-1]["grad_norm"] <= 1e-5
    assert history[-1]["iterations"] > 0 and len(history) < 20

    xf, onehot = torch.cat([x.reshape(300, -1), torch.ones(300, 1)], 1).double(), torch.nn.functional.one_hot(y, 3).double()

    theta = torch.zeros(3, 17, dtype=torch.float64)  # weights and bias, the same penalty on both
    for _ in range(15):  # Newton's method with the closed-form gradient and Hessian
        p = (xf @ theta.T).softmax(1)
        grad = (p - onehot).T @ xf / 300 + wd * theta
        curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        hessian = torch.einsum("nkl,ni,nj->kilj", curvature, xf, xf).reshape(51, 51) / 300 + wd * torch.eye(51, dtype=torch.float64)
        theta = theta - torch.linalg.solve(hessian, grad.reshape(51)).reshape(3, 17)
    newton = theta.reshape(3, 17)
    assert grad.abs().max() < 1e-9  # Newton itself converged, so it is a fair reference
    ours = torch.cat([model.linear.weight, model.linear.bias[:, None]], 1).double().detach()
    assert torch.allclose(ours, newton, atol=1e-4)


def test_batch_gradient_equals_autograd():
    from image_logreg.train import batch_gradient

    torch.manual_seed(0)
    model = LogisticRegression((5, 4), 6)
    x, y = torch.rand(33, 5, 4), torch.randint(0, 6, (33,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    expected = (model.linear.weight.grad.clone(), model.linear.bias.grad.clone())
    with torch.no_grad():
        loss_sum, correct = batch_gradient(model, x.reshape(33, -1), y, torch.nn.functional.one_hot(y, 6).float())
    assert torch.allclose(model.linear.weight.grad, expected[0], atol=1e-6)
    assert torch.allclose(model.linear.bias.grad, expected[1], atol=1e-6)
    assert loss_sum.item() / 33 == pytest.approx(loss.item(), rel=1e-5)
    assert correct.item() == (model(x).argmax(1) == y).sum().item()


# --- the optimizer updates: torch.optim's arithmetic, without its first-call import of dynamo ----


def _steps(make, params, grads_per_step):
    """Apply ``make(params)``'s step once per list of gradients; return the parameters after each step."""
    optimizer = make(params)
    seen = []
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        seen.append([p.detach().clone() for p in params])
    return seen


@pytest.mark.parametrize("kind, settings", [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("sgd", {"lr": 0.01, "momentum": 0.5, "weight_decay": 1e-3}),
    ("adam", {"lr": 1e-3}),
    ("adam", {"lr": 0.02, "weight_decay": 1e-2}),
])
def test_updates_match_torch_optim_bit_for_bit(kind, settings):
    from image_logreg import optim

    torch.manual_seed(0)
    start = [torch.randn(10, 784), torch.randn(10)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(12)]
    ours = {"sgd": optim.SGD, "adam": optim.Adam}[kind]
    theirs = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[kind]
    got = _steps(lambda ps: ours(ps, **settings), [p.clone() for p in start], grads)
    want = _steps(lambda ps: theirs(ps, foreach=True, **settings), [torch.nn.Parameter(p.clone()) for p in start], grads)
    for step, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"step {step + 1}: max difference {(x - y).abs().max().item():.3g}"


@pytest.mark.parametrize("shapes", [[(10, 784), (10,)], [(7, 13), (7,)]], ids=["mnist", "odd"])
@pytest.mark.parametrize("kind, settings", [
    ("sgd", {"lr": 0.01, "momentum": 0.5, "weight_decay": 1e-3}),
    ("adam", {"lr": 0.02, "weight_decay": 1e-2}),
])
def test_updates_of_one_flat_vector_match_torch_optim_on_each_parameter(kind, settings, shapes):
    """``fit`` steps one vector that holds the weight and the bias (``optim.flat_parameters``):
    still torch.optim's steps on the two tensors, bit for bit, whatever the shapes."""
    from image_logreg import optim

    torch.manual_seed(1)
    start = [torch.randn(shape) for shape in shapes]
    grads = [[torch.randn_like(p) for p in start] for _ in range(12)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    got = []
    with optim.flat_parameters(ours) as flat:
        optimizer = {"sgd": optim.SGD, "adam": optim.Adam}[kind]([flat], **settings)
        for step_grads in grads:
            for p, g in zip(ours, step_grads):
                p.grad.copy_(g)  # in place, as training writes them: into the vector's gradient
            optimizer.step()
            got.append([p.detach().clone() for p in ours])
    theirs = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[kind]
    want = _steps(lambda ps: theirs(ps, foreach=True, **settings), [torch.nn.Parameter(p.clone()) for p in start], grads)
    for step, (a, b) in enumerate(zip(got, want)):
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"step {step + 1}: max difference {(x - y).abs().max().item():.3g}"


@pytest.mark.parametrize("fails", [False, True], ids=["ends", "raises"])
def test_flat_parameters_are_tensors_of_their_own_again_after_the_block(fails):
    from image_logreg import optim

    model = LogisticRegression((4, 5), 3)
    weight, bias = model.linear.weight, model.linear.bias
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with optim.flat_parameters(model.parameters()) as flat:
            assert flat.shape == (63,) and flat.grad.shape == (63,)  # 3 x 20 weights, 3 biases
            assert weight.data_ptr() == flat.data_ptr() and bias.grad.data_ptr() == flat.grad[60:].data_ptr()
            flat.add_(1.0)
            if fails:
                raise RuntimeError("stopped")
    assert weight.grad is None and bias.grad is None
    assert weight.untyped_storage().data_ptr() != bias.untyped_storage().data_ptr()
    assert weight.untyped_storage().nbytes() == 60 * 4  # not a view of the vector: a checkpoint can store it
    assert torch.equal(torch.cat([weight.detach().reshape(-1), bias.detach()]), flat)  # the steps are kept


def test_fit_gathers_batches_on_a_spare_thread_and_trains_the_same_weights(toy_data, monkeypatch):
    """With a thread to spare, a second thread gathers the batches a few hand-offs ahead; the
    weights are those of the steps gathering their own, bit for bit."""
    from image_logreg import train

    x, y, xv, yv = toy_tensors(toy_data)
    monkeypatch.setattr(train, "AHEAD_BYTES", 3 * 14 * 784 * 4)  # 3 batches a hand-off: several, the last one short
    seen = []
    step_rows = train._step_rows
    monkeypatch.setattr(train, "_step_rows", lambda *args: seen.append(args[-1]) or step_rows(*args))
    cfg = TrainConfig(batch_size=14, epochs=2, class_weight="balanced")
    weights = []
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = LogisticRegression()
            history = fit(model, x, y, xv, yv, cfg)
            weights.append(torch.cat([model.linear.weight.detach().reshape(-1), model.linear.bias.detach()]))
    finally:
        torch.set_num_threads(before)
    assert seen == [3, 3, 0, 0]  # two epochs gathered ahead, then two gathering their own
    assert len(x) % 14 and math.ceil(len(x) / 14) % 3  # a short batch and a short hand-off were exercised
    assert torch.equal(weights[0], weights[1])
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_gathering_ahead_raises_the_threads_error_and_stops_with_the_steps():
    import threading

    from image_logreg import train
    from image_logreg.distributed import SINGLE

    x, y = torch.rand(40, 6), torch.randint(0, 3, (40,))
    targets = train.target_rows(y, 3, None)
    threads = threading.active_count()
    batches = torch.arange(40).split(4)
    with train._step_rows(x, y, targets, batches, SINGLE, None, 3, 2) as steps:
        rows, idx, xb, hot = next(steps)  # a step that ends early leaves no thread behind
        assert rows == 4 and torch.equal(xb, x[:4]) and torch.equal(hot, targets[:4])
    bad = [*batches[:3], torch.tensor([1, 99])]
    with pytest.raises(IndexError):
        with train._step_rows(x, y, targets, bad, SINGLE, None, 3, 2) as steps:
            assert [len(step[1]) for step in itertools.islice(steps, 2)] == [4, 4]
            list(steps)
    assert threading.active_count() == threads


def test_cosine_schedule_is_lambdalr_bit_for_bit():
    from image_logreg import optim

    total = 37
    p = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([p], lr=0.003)
    schedule = torch.optim.lr_scheduler.LambdaLR(reference, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    ours = optim.cosine(0.003, total)
    for step in range(1, total + 5):
        reference.step()
        schedule.step()
        assert ours(step) == reference.param_groups[0]["lr"]


NO_DYNAMO_PROBE = r"""
import sys, torch
from image_logreg import LogisticRegression, TrainConfig, fit
torch.manual_seed(0)
x, y = torch.rand(300, 28, 28), torch.randint(0, 10, (300,))
fit(LogisticRegression(), x[:250], y[:250], x[250:], y[250:], TrainConfig(optimizer=sys.argv[1], epochs=2, batch_size=50))
print(" ".join(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules)) or "none")
"""


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "lbfgs"])
def test_training_imports_neither_dynamo_nor_sympy(optimizer):
    """Those imports take about a second, more than training MNIST: they must not hide inside a fit."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NO_DYNAMO_PROBE, optimizer], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["none"]


# --- small data: the best epoch kept, early stopping, balanced classes, readable curves -------


def _wrong_validation(toy_data):
    """Validation labels shifted by one class: the better the model fits, the worse its validation loss."""
    x, y, xv, yv = toy_tensors(toy_data)
    return x, y, xv, (yv + 1) % 10


def test_the_epoch_of_least_validation_loss_is_kept_and_training_stops_after_the_patience(toy_data):
    x, y, xv, yv = _wrong_validation(toy_data)
    torch.manual_seed(0)
    model = LogisticRegression()
    weights = {}
    on_epoch = lambda h: weights.__setitem__(h["epoch"], model.linear.weight.detach().clone())  # noqa: E731
    history = fit(model, x, y, xv, yv, TrainConfig(epochs=60, patience=5), on_epoch=on_epoch)
    losses = [h["val_loss"] for h in history]
    assert history.stopped_early and len(history) < 60
    assert history.kept_epoch == 1 + losses.index(min(losses)) < len(history)
    assert len(history) == history.kept_epoch + 5  # five epochs without a better validation loss, then stop
    assert torch.equal(model.linear.weight, weights[history.kept_epoch])
    assert history.kept is history[history.kept_epoch - 1]


def test_without_keep_best_the_last_epoch_stays_and_all_epochs_run(toy_data):
    x, y, xv, yv = _wrong_validation(toy_data)
    torch.manual_seed(0)
    model = LogisticRegression()
    history = fit(model, x, y, xv, yv, TrainConfig(epochs=30, keep_best=False))
    assert len(history) == 30 and history.kept_epoch is None and not history.stopped_early
    assert history.kept is history[-1]


def test_a_near_tie_goes_to_the_later_epoch():
    from image_logreg.train import BestEpoch

    model = LogisticRegression((2,), 2)
    best = BestEpoch(model)
    for epoch, loss in enumerate([0.5, 0.30, 0.3002, 0.31, 0.2999], 1):
        best.update(epoch, loss)
    assert best.epoch == 5 and best.stalled == 3  # 0.3002 and 0.2999 within 0.1% of 0.30: no improvement, but kept


def test_patience_defaults_to_a_tenth_of_the_epochs_and_zero_never_stops():
    assert TrainConfig().patience_for(5) == 10 and TrainConfig().patience_for(938) == 94
    assert TrainConfig(patience=0).patience_for(938) == 0
    with pytest.raises(UsageError, match="--patience"):
        TrainConfig(patience=-1)
    with pytest.raises(UsageError, match="class weight"):
        TrainConfig(class_weight="heavy")


def test_balanced_class_weights_give_the_gradient_of_the_weighted_loss():
    from image_logreg.train import balanced_weights, batch_gradient, full_objective, target_rows

    torch.manual_seed(0)
    x, y = torch.rand(200, 12), torch.cat([torch.zeros(150), torch.ones(40), torch.full((10,), 2)]).long()
    weights = balanced_weights(y, 3)
    assert torch.allclose(weights, torch.tensor([200 / 450, 200 / 120, 200 / 30]))
    model = LogisticRegression((12,), 3)
    loss = (torch.nn.functional.cross_entropy(model(x), y, reduction="none") * weights[y]).mean()
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    hot = target_rows(y, 3, weights)
    loss_sum, _ = batch_gradient(model, x, y, hot, weighted=True)
    assert loss_sum.item() / 200 == pytest.approx(loss.item(), rel=1e-6)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    full_objective(model, x, y, hot, 0.0, weighted=True)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_balanced_class_weights_lift_a_small_class(toy_data):
    """Class 0 kept at 8 of its training images: weighed equally, it is found more often."""
    x, y, xv, yv = toy_tensors(toy_data)
    rare = (y == 0).nonzero().flatten()[8:]
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[rare] = False
    x, y = x[keep], y[keep]
    recall = {}
    for weighting in ("none", "balanced"):
        torch.manual_seed(0)
        model = LogisticRegression()
        fit(model, x, y, xv, yv, TrainConfig(epochs=3, class_weight=weighting, lr=0.003, keep_best=False))
        found = model.predict(xv[yv == 0]) == 0
        recall[weighting] = found.float().mean().item()
    assert recall["balanced"] > recall["none"]


def test_long_curves_are_plain_lines_with_the_loss_on_a_log_scale(monkeypatch, tmp_path):
    from image_logreg import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    long = [{"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.9, "val_loss": 0.3 + e / 1000, "val_accuracy": 0.8}
            for e in range(1, 201)]
    plots.plot_curves(long, tmp_path / "c.png", kept_epoch=50)
    plots.plot_curves(long[:5], tmp_path / "c.png")
    ax_acc, ax_loss = figures[0].axes
    assert all(line.get_marker() in ("None", None, "") for line in ax_loss.lines)
    assert ax_loss.get_yscale() == "log" and ax_acc.get_yscale() == "linear"
    assert any("kept (epoch 50)" in str(line.get_label()) for line in ax_loss.lines)
    assert all(line.get_marker() not in ("None", None, "") for line in figures[1].axes[1].lines)
    assert figures[1].axes[1].get_yscale() == "linear"
