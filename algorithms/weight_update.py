"""Weight-update rules u(lambda, w): w_t = w_{t-1} - u, as pure functions of the hyperparameters.

Each rule comes in two forms that compute the same numbers:
- `update(params, grads, state, hp)` is out of place and differentiable: with hyperparameter
  tensors that require grad (and grads built with create_graph=True), autograd reaches lambda and
  w_{t-1} through the new weights. Hyperparameters may be 0-d tensors or, per weight element
  (high-dimensional), lists of tensors shaped like the parameters.
- `update_(params, grads, state, hp)` works in place with foreach kernels and no graph: the fast
  path for every untracked step.
State is a dict of per-parameter tensor lists (and Adam's step count); `update` never modifies it.
"""
from __future__ import annotations

import contextlib

import torch

from onepass.algorithms.peers import PEERS

Tensors = list[torch.Tensor]
Hyper = float | torch.Tensor | Tensors      # scalar, or one tensor per parameter


def clip_gradient_norm(grads: Tensors, max_norm: float | None) -> Tensors:
    """`grads` scaled by min(1, max_norm / (norm + 1e-6)), the norm taken over all of them together,
    as torch.nn.utils.clip_grad_norm_ does, but out of place and differentiable (the scale is part
    of the update that hypergradients differentiate). `max_norm=None` returns them unchanged."""
    if max_norm is None:
        return grads
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * scale for g in grads]


def detached(state: dict) -> dict:
    """A rule's state cut from the graph of the differentiable `update` that made it."""
    return {key: [v.detach() for v in value] if isinstance(value, list) else value for key, value in state.items()}


def _per_param(value: Hyper, count: int) -> list:
    return value if isinstance(value, list) else [value] * count


class Rule:
    """What every rule of this module shares: a differentiable form, a state of plain tensors (which
    a checkpoint holds), nothing of its own to log, and the same weights for training and for
    measuring (unlike algorithms/peers.py's)."""
    differentiable = True
    checkpointable = True

    @staticmethod
    def logged(state: dict) -> dict[str, float]:
        return {}

    @staticmethod
    def measuring(state: dict) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class SGD(Rule):
    """PyTorch's SGD with momentum and L2 weight decay (no dampening, no Nesterov):

        g <- g + weight_decay * w
        b <- momentum * b + g          (b <- g at the first step)
        w <- w - lr * b
    """

    hyperparameters = ("lr", "weight_decay", "momentum")

    @staticmethod
    def init_state(params: Tensors) -> dict[str, Tensors]:
        return {"momentum_buffer": []}            # empty until the first step

    @staticmethod
    def update(params: Tensors, grads: Tensors, state: dict, hp: dict) -> tuple[Tensors, dict]:
        lrs = _per_param(hp["lr"], len(params))
        buffers = state["momentum_buffer"] or [None] * len(params)
        new_params, new_buffers = [], []
        for w, g, b, lr in zip(params, grads, buffers, lrs, strict=True):
            g = g + hp["weight_decay"] * w
            b = g if b is None else hp["momentum"] * b + g
            new_params.append(w - lr * b)
            new_buffers.append(b)
        return new_params, {"momentum_buffer": new_buffers}

    @staticmethod
    @torch.no_grad()
    def update_(params: Tensors, grads: Tensors, state: dict, hp: dict) -> None:
        grads = torch._foreach_add(grads, params, alpha=hp["weight_decay"])
        buffers = state["momentum_buffer"]
        if buffers:
            torch._foreach_mul_(buffers, hp["momentum"])
            torch._foreach_add_(buffers, grads)
        else:
            state["momentum_buffer"] = buffers = grads
        if isinstance(hp["lr"], list):
            torch._foreach_addcmul_(params, hp["lr"], buffers, value=-1.0)
        else:
            torch._foreach_add_(params, buffers, alpha=-hp["lr"])


class Adam(Rule):
    """PyTorch's Adam with L2 weight decay (no AMSGrad), step count t starting at 1:

        g <- g + weight_decay * w
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        w <- w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    hyperparameters = ("lr", "weight_decay", "beta1", "beta2")
    eps = 1e-8

    @staticmethod
    def init_state(params: Tensors) -> dict[str, Tensors]:
        return {"exp_avg": [torch.zeros_like(p) for p in params],
                "exp_avg_sq": [torch.zeros_like(p) for p in params],
                "step": 0}

    @classmethod
    def update(cls, params: Tensors, grads: Tensors, state: dict, hp: dict) -> tuple[Tensors, dict]:
        lrs = _per_param(hp["lr"], len(params))
        beta1, beta2 = hp["beta1"], hp["beta2"]
        step = state["step"] + 1
        correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
        new_params, means, squares = [], [], []
        for w, g, m, v, lr in zip(params, grads, state["exp_avg"], state["exp_avg_sq"], lrs, strict=True):
            g = g + hp["weight_decay"] * w
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            denominator = v.sqrt() / correction2 ** 0.5 + cls.eps
            new_params.append(w - lr / correction1 * m / denominator)
            means.append(m)
            squares.append(v)
        return new_params, {"exp_avg": means, "exp_avg_sq": squares, "step": step}

    @classmethod
    @torch.no_grad()
    def update_(cls, params: Tensors, grads: Tensors, state: dict, hp: dict) -> None:
        beta1, beta2 = hp["beta1"], hp["beta2"]
        state["step"] += 1
        step = state["step"]
        correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
        grads = torch._foreach_add(grads, params, alpha=hp["weight_decay"])
        torch._foreach_lerp_(state["exp_avg"], grads, 1 - beta1)
        torch._foreach_mul_(state["exp_avg_sq"], beta2)
        torch._foreach_addcmul_(state["exp_avg_sq"], grads, grads, value=1 - beta2)
        denominator = torch._foreach_sqrt(state["exp_avg_sq"])
        torch._foreach_div_(denominator, correction2 ** 0.5)
        torch._foreach_add_(denominator, cls.eps)
        if isinstance(hp["lr"], list):
            steps = torch._foreach_div(state["exp_avg"], denominator)
            torch._foreach_mul_(steps, hp["lr"])
            torch._foreach_add_(params, steps, alpha=-1 / correction1)
        else:
            torch._foreach_addcdiv_(params, state["exp_avg"], denominator, value=-hp["lr"] / correction1)


RULES = {"sgd": SGD, "adam": Adam, **PEERS}
