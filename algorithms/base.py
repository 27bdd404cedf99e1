"""What a hyperparameter optimiser is to the training loop.

Each window of T weight steps, the loop takes the first T - `tracked_steps` steps itself (in
place, no graph), then the last `tracked_steps` through the optimiser's `track` (pure: weights and
rule state in, a `Step` out, on the autograd graph as the algorithm needs), starting from detached
copies of the weights. `hyper_step` turns the last of those Steps and a batch of the
hypergradient's data into new hyperparameters. The optimiser sees the run only through its
`Problem` (algorithms/steps.py). This base class keeps the hyperparameters fixed
(`tuning.method: fixed`, the Random baselines).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from onepass.algorithms.hyperparameters import Hyperparameters
from onepass.algorithms.steps import Problem, Step, Weights
from onepass.algorithms.weight_update import RULES

if TYPE_CHECKING:
    from onepass.datasets import Batch
    from onepass.schema import TuningConfig


class HyperOptimiser:

    optimises = False
    tracked_steps = 0

    @classmethod
    def check_config(cls, tuning: TuningConfig, *, name: str, window_steps: int) -> None:
        """Raise ConfigError for settings this family cannot honour (before anything runs); `name`
        is the algorithm's, for the message, and `window_steps` its T."""

    def __init__(self, tuning: TuningConfig, problem: Problem, hyperparameters: Hyperparameters, weights: Weights,
                 rule_state: dict, *, window_steps: int):
        """`weights` and `rule_state`: where training starts (read, not kept, unless needed);
        `window_steps`: T, the weight steps of each window."""
        self.problem = problem
        self.hyperparameters = hyperparameters

    def start_window(self, window: int) -> tuple[Weights, dict] | None:
        """Weights (their values are copied) and rule state (kept) to start `window` from instead of
        where the last one ended."""
        return None

    def track(self, weights: Weights, rule_state: dict, batch: Batch) -> Step:
        """One of the last `tracked_steps` steps of a window."""
        raise NotImplementedError

    def hyper_step(self, last: Step, batch: Batch) -> dict[str, float]:
        """Update the hyperparameters from the window whose last tracked step was `last`; returns
        the hypergradients as log tags (nothing, for Random)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (the hyperparameters are restored on their own)."""


class GradientHyperOptimiser(HyperOptimiser):
    """A hyperparameter optimiser that follows hypergradients over the raw hyperparameters with
    plain Adam or SGD (the update rules of algorithms/weight_update.py, with PyTorch's defaults and
    no weight decay), clipping lr into its bounds after every step."""

    optimises = True

    def __init__(self, tuning: TuningConfig, problem: Problem, hyperparameters: Hyperparameters, weights: Weights,
                 rule_state: dict, *, window_steps: int):
        super().__init__(tuning, problem, hyperparameters, weights, rule_state, window_steps=window_steps)
        self.rule = RULES[tuning.optimiser]
        self.rule_hyperparameters = {"lr": tuning.lr, "weight_decay": 0.0, "momentum": 0.0,
                                     "beta1": 0.9, "beta2": 0.999}
        self.rule_state = self.rule.init_state(self.hyperparameters.leaves())

    def state_dict(self) -> dict:
        return {"rule_state": self.rule_state}

    def load_state_dict(self, state: dict) -> None:
        self.rule_state = state["rule_state"]

    def hypergradient(self, last: Step, batch: Batch) -> list[torch.Tensor]:
        """d(validation loss)/d(raw hyperparameters), one tensor per leaf, summed over ranks."""
        raise NotImplementedError

    def hyper_step(self, last: Step, batch: Batch) -> dict[str, float]:
        grads = self.hypergradient(last, batch)
        tags = self.hyperparameters.summed_by_tag(grads, "Hypergradient")
        self.rule.update_(self.hyperparameters.leaves(), grads, self.rule_state, self.rule_hyperparameters)
        self.hyperparameters.clip_()
        return tags
