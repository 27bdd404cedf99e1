"""Hyperparameter optimisers, by the algorithm names used in configs/ and in the paper's figures.

Names differ by configuration as well as by code: the four Random baselines share one class and
differ in their YAML (validation split, full validation evaluation, lr multiplier).
"""
from __future__ import annotations

from algorithms.base import HyperOptimiser
from algorithms.hyperparameters import Hyperparameters

ALGORITHMS: dict[str, type[HyperOptimiser]] = {
    "Random": HyperOptimiser,
    "Random_SteppedLR": HyperOptimiser,
    "Random_Validation": HyperOptimiser,
    "Random_TrainingSetOnly": HyperOptimiser,
}


def build(name: str, hyperparameters: Hyperparameters) -> HyperOptimiser:
    return ALGORITHMS[name](hyperparameters)
