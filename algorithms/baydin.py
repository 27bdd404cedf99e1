"""`tuning.method: baydin`: hypergradient descent as Baydin et al. (2018) and the paper ran it
(configs/Baydin.yaml).

After every weight step w_t = w_{t-1} - u(lr, w_{t-1}), the learning rate moves along

    h = -grad L(w_t) . grad L(w_{t-1})

the negated dot product of two consecutive loss gradients: the one the step just used (at w_{t-1},
on its training batch) and a fresh one at the new weights (on the next batch of the hypergradient
stream, training data in the config). Both are plain loss gradients, summed over ranks: no weight
decay, no momentum buffer, no clipping. For plain SGD, h is dL(w_t)/d lr; the paper applied it
unchanged as the gradient of log10 lr, the raw value its SGD hyper-optimiser steps, so

    log10 lr <- log10 lr + step * grad L(w_t) . grad L(w_{t-1}).

The exact derivative with respect to log10 lr (through the momentum buffer, times ln(10) lr) is
the implicit optimiser with i = 1 and T = 1: configs/Baydin_Exact.yaml. Its steps are hundreds of
times smaller at lr ~ 1e-3, so it is a different algorithm in practice.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from onepass.algorithms.base import GradientHyperOptimiser
from onepass.algorithms.steps import Step, loss_gradient
from onepass.schema import ConfigError

if TYPE_CHECKING:
    from onepass.datasets import Batch
    from onepass.schema import TuningConfig


class BaydinHyperOptimiser(GradientHyperOptimiser):
    # Nothing is differentiated through a step: the loop's fast steps return the gradient each
    # used, and the last one's is the old gradient of the product.
    tracked_steps = 0

    @classmethod
    def check_config(cls, tuning: TuningConfig, *, name: str, window_steps: int) -> None:
        if tuple(tuning.hyperparameters) != ("lr",) or tuning.high_dimensional:
            raise ConfigError(f"{name} tunes one scalar learning rate: tuning.hyperparameters must be [lr] "
                              f"and tuning.high_dimensional empty")

    def hypergradient(self, last: Step, batch: Batch) -> list[torch.Tensor]:
        new_gradient = loss_gradient(self.problem, last.weights, batch)
        product = sum(torch.sum(new * old) for new, old in zip(new_gradient, last.gradient, strict=True))
        (leaf,) = self.hyperparameters.leaves()
        return [(-product).reshape(leaf.shape).to(leaf.dtype)]
