"""The functional core: a weight step as a pure function of tensors, and the hypergradient solvers.

A hyperparameter optimiser sees a training run only through a `Problem`: the loss at given
weights (torch.func.functional_call on the model), the weight-update rule, and the cross-rank sums
that data parallelism needs (identities on one process). It never holds the training loop, and
the functions here return values instead of changing shared state.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from onepass import distributed
from onepass.algorithms.weight_update import Hyper, clip_gradient_norm

if TYPE_CHECKING:
    from onepass.datasets import Batch

Weights = list[torch.Tensor]
# (weights, batch) -> (outputs, this rank's share of the batch's mean loss): the sum over ranks of
# the shares is the global batch's loss (see distributed.py).
LossFunction = Callable[[Weights, "Batch"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Problem:
    """What a hyperparameter optimiser may use of a training run."""
    training_loss: LossFunction          # in training mode
    validation_loss: LossFunction        # in evaluation mode
    rule: type                           # a weight-update rule of algorithms/weight_update.py
    gradient_clip: float | None
    context: distributed.Context = distributed.SINGLE
    couples_ranks: bool = False          # the forward pass itself communicates (global BatchNorm)

    def sum_(self, tensors: Weights) -> Weights:
        """Sum over ranks, in place (no graph)."""
        return distributed.all_reduce_(tensors, self.context)

    def sum_products_(self, products: Weights) -> Weights:
        """The global vector-Jacobian product from this rank's, in place (see distributed.py): a
        sum, averaged over the copies when every rank differentiated the whole coupled graph."""
        distributed.all_reduce_(products, self.context)
        if self.couples_ranks and self.context.active:
            torch._foreach_div_(products, self.context.world_size)
        return products


@dataclass
class Step:
    """One weight step: the weights it `start`ed from, the new `weights` and `rule_state` (on the
    autograd graph when the inputs were), the `outputs` and this rank's `loss` on its batch, and
    the global loss `gradient` it followed (before weight decay and clipping)."""
    start: Weights
    weights: Weights
    rule_state: dict
    outputs: torch.Tensor
    loss: torch.Tensor
    gradient: Weights


def weight_step(problem: Problem, weights: Weights, rule_state: dict, hyperparameters: dict[str, Hyper],
                batch: Batch, *, create_graph: bool, exact_adjoint: bool = True) -> Step:
    """w' = w - u(hyperparameters, w), from the loss gradient of the global batch, differentiably.

    `create_graph` keeps the gradient on the graph (second derivatives: unrolled steps, Neumann
    products); without it, autograd still reaches the hyperparameters and the direct path of `w`.
    Across ranks the gradient is summed with the exact adjoint, or, with `exact_adjoint=False`, so
    that vector-Jacobian products of the step need one all-reduce each (see distributed.py)."""
    outputs, loss = problem.training_loss(weights, batch)
    grads = list(torch.autograd.grad(loss, weights, create_graph=create_graph))
    if exact_adjoint:
        inputs, gradient = weights, distributed.all_reduce_differentiable(grads, problem.context)
    else:
        inputs = distributed.share_direct_path(weights, problem.context)
        gradient = distributed.sum_gradients(grads, problem.context)
    new_weights, new_state = problem.rule.update(inputs, clip_gradient_norm(gradient, problem.gradient_clip),
                                                 rule_state, hyperparameters)
    return Step(weights, new_weights, new_state, outputs, loss, gradient)


def weight_step_(problem: Problem, params: Weights, rule_state: dict, hyperparameters: dict, batch: Batch) -> Step:
    """An untracked weight step, in place and without a graph (the fast path of every step no
    hypergradient differentiates): the global loss gradient, clipped when configured, then the
    rule's foreach update of `params` and `rule_state`."""
    outputs, loss = problem.training_loss(params, batch)
    gradient = problem.sum_(list(torch.autograd.grad(loss, params)))
    problem.rule.update_(params, clip_gradient_norm(gradient, problem.gradient_clip), rule_state, hyperparameters)
    return Step(params, params, rule_state, outputs, loss, gradient)   # (one list: in place)


def gradient_or_zeros(output: torch.Tensor | Weights, inputs: Weights, grad_outputs: Weights | None = None
                      ) -> Weights:
    """d output / d inputs, zeros where an input does not reach the output."""
    grads = torch.autograd.grad(output, inputs, grad_outputs=grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def loss_gradient(problem: Problem, weights: Weights, batch: Batch) -> Weights:
    """The global batch's validation-mode loss gradient at `weights`' values (no graph)."""
    # Leaves (the model's own parameters, after a fast step) are used as they are: no copy.
    leaves = all(w.is_leaf and w.requires_grad for w in weights)
    at = weights if leaves else [w.detach().requires_grad_() for w in weights]
    _, loss = problem.validation_loss(at, batch)
    return problem.sum_(list(torch.autograd.grad(loss, at)))


def neumann_hypergradient(problem: Problem, step: Step, leaves: Weights, validation_gradient: Weights,
                          terms: int) -> Weights:
    """The implicit hypergradient through one tracked `step`: p^T dw_t/dlambda with
    p = sum_{j<terms} v^T J^j, J = dw_t/dw_{t-1}, v the (global) validation gradient."""
    total, term = [v.clone() for v in validation_gradient], validation_gradient
    for _ in range(terms - 1):
        term = list(torch.autograd.grad(step.weights, step.start, grad_outputs=term, retain_graph=True))
        problem.sum_products_(term)
        torch._foreach_add_(total, term)
    return gradient_or_zeros(step.weights, leaves, grad_outputs=total)


def unrolled_hypergradient(problem: Problem, step: Step, leaves: Weights, batch: Batch) -> Weights:
    """The exact hypergradient of the validation loss after the unrolled steps that ended in `step`
    (each rank back-propagates its share of the loss; the shares' hypergradients are summed)."""
    _, loss = problem.validation_loss(step.weights, batch)
    return problem.sum_(gradient_or_zeros(loss, leaves))
