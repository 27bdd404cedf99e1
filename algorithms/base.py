"""The interface between the training loop and a hyperparameter optimiser."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from algorithms.hyperparameters import Hyperparameters


class HyperOptimiser:
    """Turns each window of T weight steps into a hyperparameter update.

    The training loop asks `differentiable_steps` how many of the last weight steps of each
    window must keep their autograd graph, and calls `hyper_step` once at the end of every window.
    This base class leaves the hyperparameters where they started: the Random baselines.
    """

    differentiable_steps = 0

    def __init__(self, hyperparameters: Hyperparameters):
        self.hyperparameters = hyperparameters

    def hyper_step(self) -> None:
        """Update the hyperparameters from the window just finished (nothing, for Random)."""
