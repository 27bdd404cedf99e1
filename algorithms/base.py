"""The interface between the training loop and a hyperparameter optimiser."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from algorithms.weight_update import RULES

if TYPE_CHECKING:
    from datasets import Batch
    from schema import Config
    from train import Learner


@dataclass
class Stepper:
    """How weight steps are taken: `step(batch) -> (outputs, this rank's loss)` updates the
    weights of `model`, the module to evaluate at the current weights."""
    model: nn.Module
    step: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]


class HyperOptimiser:
    """Turns each window of T weight steps into a hyperparameter step.

    The loop takes the first T - `tracked_steps` steps of a window on the fast path (no graph),
    then enters `tracking()` for the last `tracked_steps` steps and calls `hyper_step()` inside it.
    This base class keeps the hyperparameters fixed: the Random baselines.
    """

    optimises = False
    tracked_steps = 0

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for settings this algorithm cannot honour (before anything runs)."""

    def __init__(self, cfg: Config, learner: Learner):
        self.cfg = cfg
        self.hyperparameters = learner.hyperparameters
        self.last_hypergradients: dict[str, float] = {}   # of the last hyper step, as log tags

    def start_window(self, learner: Learner, window: int) -> None:
        """Called before each window's first weight step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (the hyperparameters themselves are the Learner's)."""

    @contextlib.contextmanager
    def tracking(self, learner: Learner) -> Iterator[Stepper]:
        yield learner.fast_stepper

    def hyper_step(self, learner: Learner, stepper: Stepper) -> None:
        """Update the hyperparameters from the window just finished (nothing, for Random)."""


class GradientHyperOptimiser(HyperOptimiser):
    """A hyperparameter optimiser that follows hypergradients over the raw hyperparameters with
    plain Adam or SGD (the update rules of algorithms/weight_update.py, with PyTorch's defaults and
    no weight decay), clipping lr into its bounds after every step."""

    optimises = True

    def __init__(self, cfg: Config, learner: Learner):
        super().__init__(cfg, learner)
        self.rule = RULES[cfg.tuning.optimiser]
        self.rule_hyperparameters = {"lr": cfg.tuning.lr, "weight_decay": 0.0, "momentum": 0.0,
                                     "beta1": 0.9, "beta2": 0.999}
        self.rule_state = self.rule.init_state(self.hyperparameters.leaves())

    def state_dict(self) -> dict:
        return {"rule_state": self.rule_state}

    def load_state_dict(self, state: dict) -> None:
        self.rule_state = state["rule_state"]

    def hypergradient(self, learner: Learner, stepper: Stepper) -> list[torch.Tensor]:
        """d(validation loss)/d(raw hyperparameters), one tensor per leaf."""
        raise NotImplementedError

    def hyper_step(self, learner: Learner, stepper: Stepper) -> None:
        grads = self.hypergradient(learner, stepper)
        self.last_hypergradients = self.hyperparameters.summed_by_tag(grads, "Hypergradient")
        self.rule.update_(self.hyperparameters.leaves(), grads, self.rule_state, self.rule_hyperparameters)
        self.hyperparameters.clip_()
