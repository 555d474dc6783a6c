"""The optimizer updates and the learning-rate schedule, as a few tensor operations each.

``torch.optim``'s classes route their first call through ``torch._dynamo`` (so that
``torch.compile`` can skip them), which imports dynamo and sympy: about a second of every
training process, longer than training MNIST itself. SGD and Adam are written out here with
the arithmetic of ``torch.optim``'s foreach path, in the same order (the tests check them bit
for bit); L-BFGS, whose line search is more than a few operations, stays ``torch.optim``'s, less
the one wrapper that imports dynamo.

A step's cost is its number of operations, not their size: each takes a few microseconds
whether it updates ten numbers or eight thousand. So the updates are plain tensor operations,
one set per parameter (``torch.optim``'s foreach path runs the same kernels one tensor at a
time on a CPU, with more overhead), and ``fit`` hands them one vector that holds the weight and
the bias (``flat_parameters``): a step is then seven operations, not fourteen.
"""

from __future__ import annotations

import contextlib
import math

import torch


class SGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay, foreach=True)``'s step."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [_with_weight_decay(p, self.weight_decay) for p in self.params]
        if self.momentum:
            if self.buffers is None:
                self.buffers = [g.detach().clone() for g in grads]
            else:
                for buffer, grad in zip(self.buffers, grads):
                    buffer.mul_(self.momentum).add_(grad, alpha=1.0)  # no dampening
            grads = self.buffers
        for p, grad in zip(self.params, grads):
            p.add_(grad, alpha=-self.lr)


class Adam:
    """``torch.optim.Adam(params, lr, weight_decay=..., foreach=True)``'s step (betas 0.9, 0.999; eps 1e-8)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        step = float(self.steps)
        step_size = (self.lr / (1 - beta1**step)) * -1
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = _with_weight_decay(p, self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(exp_avg, denominator, value=step_size)


def _with_weight_decay(p: torch.Tensor, weight_decay: float) -> torch.Tensor:
    return p.grad.add(p, alpha=weight_decay) if weight_decay else p.grad


@contextlib.contextmanager
def flat_parameters(params):
    """Hold ``params`` as views of one vector, and their gradients as views of another, for the
    length of the block; yield the vector (its ``grad`` the other), for an optimizer to step.

    A gradient is written into the parameter's ``grad`` in place (``out=``), and so lands in the
    vector's. Afterwards each parameter is its own tensor again, with no gradient: a checkpoint
    stores tensors that share no memory. The same kernels run over the same numbers, so the
    steps are ``torch.optim``'s bit for bit.
    """
    params = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    flat.grad = torch.zeros_like(flat)
    sizes = [p.numel() for p in params]
    for p, value, grad in zip(params, flat.split(sizes), flat.grad.split(sizes)):
        p.data = value.view_as(p)
        p.grad = grad.view_as(p)
    try:
        yield flat
    finally:
        for p in params:
            p.data = p.data.clone()
            p.grad = None


class LBFGS(torch.optim.LBFGS):
    """``torch.optim.LBFGS``, built without the wrapper around ``add_param_group`` that imports dynamo."""

    add_param_group = getattr(torch.optim.Optimizer.add_param_group, "__wrapped__", torch.optim.Optimizer.add_param_group)

    @property
    def iterations(self) -> int:
        """Iterations taken so far, over all steps."""
        return self.state[self.param_groups[0]["params"][0]].get("n_iter", 0)


def constant(lr: float):
    """The learning rate after each step: always ``lr``."""
    return lambda step: lr


def cosine(lr: float, total_steps: int):
    """The learning rate after ``step`` steps: ``lr`` decayed along half a cosine to 0 at
    ``total_steps`` (what ``LambdaLR`` with this factor gives, in the same arithmetic)."""
    return lambda step: lr * (0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
