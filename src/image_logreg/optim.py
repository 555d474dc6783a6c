"""The optimizer updates and the learning-rate schedule, as a few tensor operations each.

``torch.optim``'s classes route their first call through ``torch._dynamo`` (so that
``torch.compile`` can skip them), which imports dynamo and sympy: about a second of every
training process, longer than training MNIST itself. SGD and Adam are written out here with
the arithmetic of ``torch.optim``'s foreach path, in the same order (the tests check them bit
for bit); L-BFGS, whose line search is more than a few operations, stays ``torch.optim``'s, less
the one wrapper that imports dynamo.
"""

from __future__ import annotations

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
        grads = _with_weight_decay(self.params, self.weight_decay)
        if self.momentum:
            if self.buffers is None:
                self.buffers = [g.detach().clone() for g in grads]
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, grads, alpha=1.0)  # no dampening
            grads = self.buffers
        torch._foreach_add_(self.params, grads, alpha=-self.lr)


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
        grads = _with_weight_decay(self.params, self.weight_decay)
        torch._foreach_lerp_(self.exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(self.exp_avg_sq, beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - beta2)
        step = float(self.steps)
        step_size = [(self.lr / (1 - beta1**step)) * -1] * len(self.params)
        denominator = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denominator, [(1 - beta2**step) ** 0.5] * len(self.params))
        torch._foreach_add_(denominator, self.eps)
        torch._foreach_addcdiv_(self.params, self.exp_avg, denominator, step_size)


def _with_weight_decay(params: list[torch.Tensor], weight_decay: float) -> list[torch.Tensor]:
    grads = [p.grad for p in params]
    return torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads


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
