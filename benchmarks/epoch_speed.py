"""One epoch (training pass + validation pass) with the tutorial's settings, side by side.

The tutorial's pipeline is reproduced as it is written: torchvision MNIST with ``ToTensor``,
``split_indices``, ``SubsetRandomSampler`` + ``DataLoader(batch_size=100)``, ``MnistModel``,
``loss_batch``/``evaluate``/``fit`` with SGD at lr 0.001. image-logreg runs the same model,
loss, optimizer and split through ``image_logreg.fit``. Both run in this one process, one
after the other, repeated; the ratio of the medians is the figure to quote.

    python benchmarks/epoch_speed.py --data-dir ../shared/data [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own start/stop chatter on stderr
import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data.dataloader import DataLoader
from torch.utils.data.sampler import SubsetRandomSampler
from torchvision.datasets import MNIST
from torchvision.transforms import ToTensor

from image_logreg import LogisticRegression, TrainConfig, fit, load_split, to_float

# --- the tutorial, as written ---------------------------------------------------------------


def split_indices(n, val_pct):
    n_val = int(val_pct * n)
    idxs = np.random.permutation(n)
    return idxs[n_val:], idxs[:n_val]


class MnistModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, xb):
        xb = xb.reshape(-1, 784)
        return self.linear(xb)


def accuracy(outputs, labels):
    _, preds = torch.max(outputs, dim=1)
    return torch.sum(preds == labels).item() / len(preds)


def loss_batch(model, loss_func, xb, yb, opt=None, metric=None):
    preds = model(xb)
    loss = loss_func(preds, yb)
    if opt is not None:
        loss.backward()
        opt.step()
        opt.zero_grad()
    metric_result = None
    if metric is not None:
        metric_result = metric(preds, yb)
    return loss.item(), len(xb), metric_result


def evaluate(model, loss_fn, valid_dl, metric=None):
    with torch.no_grad():
        results = [loss_batch(model, loss_fn, xb, yb, metric=metric) for xb, yb in valid_dl]
        losses, nums, metrics = zip(*results)
        total = np.sum(nums)
        avg_loss = np.sum(np.multiply(losses, nums)) / total
        avg_metric = None
        if metric is not None:
            avg_metric = np.sum(np.multiply(metrics, nums)) / total
    return avg_loss, total, avg_metric


def tutorial_fit(epochs, model, loss_fn, opt, train_dl, valid_dl, metric=None):
    for epoch in range(epochs):
        for xb, yb in train_dl:
            loss, _, _ = loss_batch(model, loss_fn, xb, yb, opt)
        result = evaluate(model, loss_fn, valid_dl, metric)
        val_loss, total, val_metric = result
    return val_loss, val_metric


def tutorial_setup(data_dir):
    dataset = MNIST(root=data_dir, download=False, transform=ToTensor())
    train_indices, val_indices = split_indices(len(dataset), val_pct=0.2)
    batch_size = 100
    train_dl = DataLoader(dataset, batch_size, sampler=SubsetRandomSampler(train_indices))
    valid_dl = DataLoader(dataset, batch_size, sampler=SubsetRandomSampler(val_indices))
    return train_dl, valid_dl


def time_tutorial_epoch(train_dl, valid_dl) -> tuple[float, float]:
    model = MnistModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    start = time.perf_counter()
    _, val_acc = tutorial_fit(1, model, F.cross_entropy, opt, train_dl, valid_dl, accuracy)
    return time.perf_counter() - start, val_acc


# --- image-logreg ---------------------------------------------------------------------------


def ours_setup(data_dir, device):
    data = load_split("mnist", data_dir, "train", download=False)
    x, y = to_float(data.images, device), data.labels.to(device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    n_val = int(0.2 * len(x))
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def time_ours_epoch(tensors, device) -> tuple[float, float]:
    model = LogisticRegression().to(device)
    cfg = TrainConfig(optimizer="sgd", lr=0.001, batch_size=100, epochs=1, schedule="constant")
    start = time.perf_counter()
    history = fit(model, *tensors, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, history[-1]["val_accuracy"]


def where_time_goes(tensors, device, top: int = 6) -> list[dict]:
    """Profile one image-logreg epoch: the operators that take the most time, as shares, on
    every thread (the steps' own and the one gathering their batches)."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
        time_ours_epoch(tensors, device)
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ranked]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="print nothing; return the figures")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    train_dl, valid_dl = tutorial_setup(args.data_dir)
    tensors = ours_setup(args.data_dir, device)
    time_ours_epoch(tensors, device)  # warm-up: first calls pay for lazy initialisation
    tutorial_times, ours_times = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        t, tutorial_acc = time_tutorial_epoch(train_dl, valid_dl)
        tutorial_times.append(t)
        t, ours_acc = time_ours_epoch(tensors, device)
        ours_times.append(t)

    result = {
        "tutorial_seconds": statistics.median(tutorial_times),
        "image_logreg_seconds": statistics.median(ours_times),
        "ratio": statistics.median(tutorial_times) / statistics.median(ours_times),
        "tutorial_val_accuracy_after_1_epoch": tutorial_acc,
        "image_logreg_val_accuracy_after_1_epoch": ours_acc,
        "repeats": args.repeats,
        "device": str(device),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "profile": where_time_goes(tensors, device),
    }
    if args.quiet:
        pass
    elif args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"tutorial pipeline : {result['tutorial_seconds']:.3f} s/epoch (median of {args.repeats})")
        print(f"image-logreg      : {result['image_logreg_seconds']:.3f} s/epoch (median of {args.repeats})")
        print(f"speed-up          : {result['ratio']:.1f}x   (target: >= 10x)")
        print("where image-logreg's epoch spends its time (self CPU time by operator):")
        for row in result["profile"]:
            print(f"  {row['share']:6.1%}  {row['op']} ({row['calls']} calls)")
    return result


if __name__ == "__main__":
    main()
