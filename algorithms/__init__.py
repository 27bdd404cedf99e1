"""Hyperparameter optimisers, by the algorithm names used in configs/ and in the paper's figures.

Names differ by configuration as well as by code: the four Random baselines share one class and
differ in their YAML (validation split, full validation evaluation, lr multiplier); Ours_*,
Lorraine and Baydin_Exact are settings of the implicit optimiser; Diff-through-Opt and its Long
variants settings of the unrolled one. Baydin is the paper's hypergradient descent, its own class.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from algorithms.base import HyperOptimiser
from algorithms.baydin import BaydinHyperOptimiser
from algorithms.implicit import ImplicitHyperOptimiser
from algorithms.unrolled import UnrolledHyperOptimiser

if TYPE_CHECKING:
    from algorithms.hyperparameters import Hyperparameters
    from algorithms.steps import Problem, Weights
    from schema import Config

ALGORITHMS: dict[str, type[HyperOptimiser]] = {
    "Random": HyperOptimiser,
    "Random_SteppedLR": HyperOptimiser,
    "Random_Validation": HyperOptimiser,
    "Random_TrainingSetOnly": HyperOptimiser,
    "Lorraine": ImplicitHyperOptimiser,
    "Baydin": BaydinHyperOptimiser,
    "Baydin_Exact": ImplicitHyperOptimiser,
    "Ours_LR": ImplicitHyperOptimiser,
    "Ours_LR_Momentum": ImplicitHyperOptimiser,
    "Ours_HDLR_Momentum": ImplicitHyperOptimiser,
    "DiffThroughOpt": UnrolledHyperOptimiser,
    "LongDiffThroughOpt_UCI_Standalone": UnrolledHyperOptimiser,
    "LongDiffThroughOpt_UCI_Full": UnrolledHyperOptimiser,
    "LongDiffThroughOpt_FashionMNIST_Standalone": UnrolledHyperOptimiser,
    "LongDiffThroughOpt_FashionMNIST_Medium": UnrolledHyperOptimiser,
}


def build(cfg: Config, problem: Problem, hyperparameters: Hyperparameters, weights: Weights,
          rule_state: dict) -> HyperOptimiser:
    return ALGORITHMS[cfg.algorithm](cfg, problem, hyperparameters, weights, rule_state)
