"""`tuning.method: unrolled`: differentiation through unrolled optimisation (Domke 2012),
Diff-through-Opt and its Long variants.

The last R weight steps of each window are unrolled functionally: from a detached copy of the
weights, each is `algorithms.steps.weight_step` with create_graph, through the weight-update
rule's differentiable `update` (the same rule the fast path and the implicit algorithms use: SGD
or Adam), with the hyperparameters as tensors of the raw values. The hypergradient is the exact
derivative of the validation loss after those R steps with respect to the raw hyperparameters.
Steps before them take the fast path.

With `reset_weights`, every window restarts from the initial weights and optimiser state, so each
hyperparameter step differentiates through a whole short training run (Long Diff-through-Opt).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from onepass.algorithms.base import GradientHyperOptimiser
from onepass.algorithms.hyperparameters import Hyperparameters
from onepass.algorithms.steps import Problem, Step, Weights, unrolled_hypergradient, weight_step
from onepass.schema import ConfigError

if TYPE_CHECKING:
    from onepass.datasets import Batch
    from onepass.schema import TuningConfig


class UnrolledHyperOptimiser(GradientHyperOptimiser):

    @classmethod
    def check_config(cls, tuning: TuningConfig, *, name: str, window_steps: int) -> None:
        steps = tuning.unroll_steps
        if steps is not None and steps > window_steps:
            raise ConfigError(f"tuning.unroll_steps = {steps} exceeds network_weight_steps = {window_steps}")
        if tuning.high_dimensional:
            raise ConfigError(f"{name} tunes scalar hyperparameters only: tuning.high_dimensional "
                              f"must be empty")

    def __init__(self, tuning: TuningConfig, problem: Problem, hyperparameters: Hyperparameters, weights: Weights,
                 rule_state: dict, *, window_steps: int):
        super().__init__(tuning, problem, hyperparameters, weights, rule_state, window_steps=window_steps)
        self.tracked_steps = tuning.unroll_steps or window_steps
        self.reset_weights = tuning.reset_weights
        self._initial = ([w.detach().clone() for w in weights], copy.deepcopy(rule_state))
        self._natural: dict | None = None      # the window's hyperparameters, on the graph

    def start_window(self, window: int) -> tuple[Weights, dict] | None:
        if not (self.reset_weights and window > 0):
            return None
        weights, state = self._initial
        return weights, copy.deepcopy(state)       # (the loop copies the weights' values; it keeps the state)

    def state_dict(self) -> dict:
        return super().state_dict() | {"initial": self._initial}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._initial = state["initial"]

    def track(self, weights: Weights, rule_state: dict, batch: Batch) -> Step:
        if self._natural is None:        # once per window: every unrolled step uses the same values
            self._natural = self.hyperparameters.natural()
        return weight_step(self.problem, weights, rule_state, self._natural, batch, create_graph=True)

    def hyper_step(self, last: Step, batch: Batch) -> dict[str, float]:
        tags = super().hyper_step(last, batch)
        self._natural = None             # the values changed; and no graph outlives its window
        return tags

    def hypergradient(self, last: Step, batch: Batch) -> list[torch.Tensor]:
        return unrolled_hypergradient(self.problem, last, self.hyperparameters.leaves(), batch)
