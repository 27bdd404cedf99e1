"""Implicit differentiation through the weight update (Ours, Lorraine; Baydin_Exact as its i = 1 case).

Near a fixed point of the update w_t = w_{t-1} - u(lambda, w_{t-1}), the implicit function theorem
gives dw*/dlambda = -(du/dw)^{-1} du/dlambda. Truncating the Neumann series of the inverse after i
terms, with J = dw_t/dw_{t-1} = I - du/dw and the validation gradient v = dL_V/dw at w_t:

    p = sum_{j=0}^{i-1} v^T J^j          (i - 1 vector-Jacobian products through the last step)
    dL_V/dlambda ~= -p^T du/dlambda = p^T dw_t/dlambda      (one more, into the raw lambda)

Only the last weight step of each window keeps a graph: it is taken from a detached copy of the
weights, so the update can be written into the model at once while the graph stays valid. With
i = 1 no second derivatives are needed and the step's gradient is built without create_graph: with
the training data as validation data and T = 1 this is the exact derivative of Baydin et al.'s
hypergradient descent (Baydin_Exact; the paper's Baydin is algorithms/baydin.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

import distributed
from algorithms.base import GradientHyperOptimiser, Stepper
from algorithms.weight_update import clip_gradient_norm, detached

if TYPE_CHECKING:
    from datasets import Batch
    from schema import Config
    from train import Learner


class ImplicitHyperOptimiser(GradientHyperOptimiser):
    tracked_steps = 1

    def __init__(self, cfg: Config, learner: Learner):
        super().__init__(cfg, learner)
        self.rollback_distance = cfg.tuning.rollback_distance
        self.names = [name for name, _ in learner.model.named_parameters()]
        # Ranks coupled in the forward pass (synchronised BatchNorm) need exact adjoints, with each
        # product averaged over the N copies; otherwise one all-reduce per product suffices.
        self.exact_products = distributed.couples_ranks(learner.model)
        self._last_step: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @contextlib.contextmanager
    def tracking(self, learner: Learner) -> Iterator[Stepper]:
        context = learner.context

        def tracked_step(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            before = [p.detach().clone().requires_grad_() for p in learner.params]
            outputs = learner.forward(learner.model, batch, dict(zip(self.names, before, strict=True)))
            loss = learner.local_loss(outputs, batch)
            grads = list(torch.autograd.grad(loss, before, create_graph=self.rollback_distance > 1))
            if self.exact_products:
                weights, gradient = before, distributed.all_reduce_differentiable(grads, context)
            else:
                weights = distributed.share_direct_path(before, context)
                gradient = distributed.sum_gradients(grads, context)
            gradient = clip_gradient_norm(gradient, learner.cfg.optimiser.gradient_clip)
            after, state = learner.rule.update(weights, gradient, learner.rule_state, self.hyperparameters.natural())
            with torch.no_grad():
                torch._foreach_copy_(learner.params, after)
            learner.rule_state = detached(state)
            self._last_step = (before, after)
            return outputs, loss

        try:
            yield Stepper(learner.model, tracked_step)
        finally:
            self._last_step = None        # drop the graph

    def hypergradient(self, learner: Learner, stepper: Stepper) -> list[torch.Tensor]:
        before, after = self._last_step
        context = learner.context
        batch = next(learner.hyper_batches)
        learner.model.eval()     # the model's parameters hold the weights `after`
        validation_loss = learner.local_loss(learner.forward(learner.model, batch), batch)
        term = distributed.all_reduce_(list(torch.autograd.grad(validation_loss, learner.params)), context)
        total = list(term)
        copies = context.world_size if self.exact_products else 1
        for _ in range(self.rollback_distance - 1):
            term = list(torch.autograd.grad(after, before, grad_outputs=term, retain_graph=True))
            distributed.all_reduce_(term, context)      # global product: see distributed.py
            if copies > 1:
                torch._foreach_div_(term, copies)
            torch._foreach_add_(total, term)
        leaves = self.hyperparameters.leaves()
        grads = torch.autograd.grad(after, leaves, grad_outputs=total, allow_unused=True)
        return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]

