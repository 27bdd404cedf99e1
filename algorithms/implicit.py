"""`tuning.method: implicit`: implicit differentiation through the weight update (Ours, Lorraine;
Baydin_Exact as its i = 1 case).

Near a fixed point of the update w_t = w_{t-1} - u(lambda, w_{t-1}), the implicit function theorem
gives dw*/dlambda = -(du/dw)^{-1} du/dlambda. Truncating the Neumann series of the inverse after i
terms, with J = dw_t/dw_{t-1} = I - du/dw and the validation gradient v = dL_V/dw at w_t:

    p = sum_{j=0}^{i-1} v^T J^j          (i - 1 vector-Jacobian products through the last step)
    dL_V/dlambda ~= -p^T du/dlambda = p^T dw_t/dlambda      (one more, into the raw lambda)

Only the last weight step of each window keeps a graph (`algorithms.steps.weight_step` from a
detached copy of the weights); the series is `algorithms.steps.neumann_hypergradient`. With
i = 1 no second derivatives are needed and the step's gradient is built without create_graph: with
the training data as validation data and T = 1 this is the exact derivative of Baydin et al.'s
hypergradient descent (Baydin_Exact; the paper's Baydin is algorithms/baydin.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from onepass.algorithms.base import GradientHyperOptimiser
from onepass.algorithms.hyperparameters import Hyperparameters
from onepass.algorithms.steps import Problem, Step, Weights, loss_gradient, neumann_hypergradient, weight_step

if TYPE_CHECKING:
    from onepass.datasets import Batch
    from onepass.schema import TuningConfig


class ImplicitHyperOptimiser(GradientHyperOptimiser):
    tracked_steps = 1

    def __init__(self, tuning: TuningConfig, problem: Problem, hyperparameters: Hyperparameters, weights: Weights,
                 rule_state: dict, *, window_steps: int):
        super().__init__(tuning, problem, hyperparameters, weights, rule_state, window_steps=window_steps)
        self.rollback_distance = tuning.rollback_distance

    def track(self, weights: Weights, rule_state: dict, batch: Batch) -> Step:
        # Ranks coupled in the forward pass (synchronised BatchNorm) need exact adjoints, with each
        # product averaged over the N copies; otherwise one all-reduce per product suffices.
        return weight_step(self.problem, weights, rule_state, self.hyperparameters.natural(), batch,
                           create_graph=self.rollback_distance > 1, exact_adjoint=self.problem.couples_ranks)

    def hypergradient(self, last: Step, batch: Batch) -> list[torch.Tensor]:
        validation_gradient = loss_gradient(self.problem, last.weights, batch)
        return neumann_hypergradient(self.problem, last, self.hyperparameters.leaves(), validation_gradient,
                                     self.rollback_distance)
