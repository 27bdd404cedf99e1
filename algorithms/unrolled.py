"""Differentiation through unrolled optimisation (Domke 2012): Diff-through-Opt and its Long variants.

The last R weight steps of each window are unrolled functionally: from a detached copy of the
weights, each step takes the loss gradient with create_graph and applies the weight-update rule's
differentiable `update` (algorithms/weight_update.py, the same rule the fast path and the implicit
algorithms use: SGD or Adam) with the hyperparameters as tensors of the raw values. The
hypergradient is the exact derivative of the validation loss after those R steps with respect to
the raw hyperparameters. Steps before them take the fast path. The model's parameters follow the
unrolled weights' values after every step (for measurements), and after the hyperparameter step
the rule's state is kept, detached, and the graph dropped.

With `reset_weights`, every window restarts from the initial weights and optimiser state, so each
hyperparameter step differentiates through a whole short training run (Long Diff-through-Opt).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

import distributed
from algorithms.base import GradientHyperOptimiser, Stepper
from algorithms.weight_update import detached

if TYPE_CHECKING:
    from datasets import Batch
    from schema import Config
    from train import Learner


class UnrolledHyperOptimiser(GradientHyperOptimiser):

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        from schema import ConfigError
        steps = cfg.tuning.unroll_steps
        if steps is not None and steps > cfg.network_weight_steps:
            raise ConfigError(f"tuning.unroll_steps = {steps} exceeds network_weight_steps = "
                              f"{cfg.network_weight_steps}")
        if cfg.tuning.high_dimensional:
            raise ConfigError(f"{cfg.algorithm} tunes scalar hyperparameters only: tuning.high_dimensional "
                              f"must be empty")

    def __init__(self, cfg: Config, learner: Learner):
        super().__init__(cfg, learner)
        self.tracked_steps = cfg.tuning.unroll_steps or cfg.network_weight_steps
        self.reset_weights = cfg.tuning.reset_weights
        self._initial = ([p.detach().clone() for p in learner.params], copy.deepcopy(learner.rule_state))
        self.names = [name for name, _ in learner.model.named_parameters()]
        self._weights: list[torch.Tensor] | None = None      # the unrolled weights, on the graph

    def start_window(self, learner: Learner, window: int) -> None:
        if self.reset_weights and window > 0:
            weights, state = self._initial
            with torch.no_grad():
                torch._foreach_copy_(learner.params, weights)
            learner.rule_state = copy.deepcopy(state)

    def state_dict(self) -> dict:
        return super().state_dict() | {"initial": self._initial}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._initial = state["initial"]

    @contextlib.contextmanager
    def tracking(self, learner: Learner) -> Iterator[Stepper]:
        natural = self.hyperparameters.natural()
        state = learner.rule_state
        self._weights = [p.detach().clone().requires_grad_() for p in learner.params]

        def unrolled_step(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal state
            weights = self._weights
            outputs = learner.forward(learner.model, batch, dict(zip(self.names, weights, strict=True)))
            loss = learner.local_loss(outputs, batch)
            gradient = learner.global_gradient(list(torch.autograd.grad(loss, weights, create_graph=True)))
            self._weights, state = learner.rule.update(weights, gradient, state, natural)
            with torch.no_grad():
                torch._foreach_copy_(learner.params, self._weights)
            return outputs, loss

        try:
            yield Stepper(learner.model, unrolled_step)
            learner.rule_state = detached(state)
        finally:
            self._weights = None        # drop the graph

    def hypergradient(self, learner: Learner, stepper: Stepper) -> list[torch.Tensor]:
        batch = next(learner.hyper_batches)
        learner.model.eval()
        weights = dict(zip(self.names, self._weights, strict=True))
        validation_loss = learner.local_loss(learner.forward(learner.model, batch, weights), batch)
        leaves = self.hyperparameters.leaves()
        grads = torch.autograd.grad(validation_loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]
        return distributed.all_reduce_(grads, learner.context)    # each rank held its shard's share
