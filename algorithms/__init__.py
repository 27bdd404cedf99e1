"""Hyperparameter optimisers: four families, chosen by a config's `tuning.method`.

A named algorithm (configs/<Name>.yaml; its `algorithm` key labels the run's folder, figures and
tables) is one family with its settings, so a new variant is a YAML file: the four Random baselines
are `fixed` and differ in their YAML (validation split, full validation evaluation, lr multiplier);
Ours_*, Lorraine and Baydin_Exact are settings of `implicit`; Diff-through-Opt and its Long variants
settings of `unrolled`. `baydin` is the paper's hypergradient descent, its own family.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from onepass.algorithms.base import HyperOptimiser
from onepass.algorithms.baydin import BaydinHyperOptimiser
from onepass.algorithms.implicit import ImplicitHyperOptimiser
from onepass.algorithms.unrolled import UnrolledHyperOptimiser

if TYPE_CHECKING:
    from onepass.algorithms.hyperparameters import Hyperparameters
    from onepass.algorithms.steps import Problem, Weights
    from onepass.schema import TuningConfig

METHODS: dict[str, type[HyperOptimiser]] = {
    "fixed": HyperOptimiser,
    "implicit": ImplicitHyperOptimiser,
    "unrolled": UnrolledHyperOptimiser,
    "baydin": BaydinHyperOptimiser,
}


def build(tuning: TuningConfig, problem: Problem, hyperparameters: Hyperparameters, weights: Weights,
          rule_state: dict, *, window_steps: int) -> HyperOptimiser:
    """The `tuning.method` optimiser of a run whose windows are `window_steps` (T) weight steps long."""
    return METHODS[tuning.method](tuning, problem, hyperparameters, weights, rule_state, window_steps=window_steps)
