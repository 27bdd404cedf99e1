"""Statistics over a results folder's runs, the primitives of the paper's tables and figures.

Runs are grouped by algorithm (config.json's `algorithm`); "Random_3Batched" is derived from the
Random_Validation runs. Every statistic is over the final values of the runs' headline metric;
diverged runs (a non-finite final value, or one at or above the dataset's threshold) are left out
of the statistics and counted.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import util

# The paper's order of algorithms (the 3-batched Random comes after the stepped-lr one).
ALGORITHM_ORDER = ("Random", "Random_SteppedLR", "Random_3Batched", "Random_Validation", "Random_TrainingSetOnly",
                   "Lorraine", "Baydin", "Ours_LR", "Ours_LR_Momentum", "Ours_HDLR_Momentum", "DiffThroughOpt",
                   "LongDiffThroughOpt_UCI_Standalone", "LongDiffThroughOpt_UCI_Full",
                   "LongDiffThroughOpt_FashionMNIST_Standalone", "LongDiffThroughOpt_FashionMNIST_Medium")
BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class Summary:
    """Statistics of one algorithm's final values."""
    mean: float
    mean_se: float          # bootstrap standard error
    median: float
    median_se: float
    best: float             # the minimum
    runs: int               # runs in the statistics
    diverged: int           # runs left out


def bootstrap_standard_error(values: np.ndarray, statistic: Callable[..., np.ndarray],
                             samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> float:
    """Standard deviation of `statistic` over `samples` resamples of `values` with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return math.nan
    rows = np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))
    return float(np.std(statistic(values[rows], axis=1), ddof=1))


def summarise(values: np.ndarray, threshold: float = math.inf, seed: int = 0) -> Summary:
    """Mean and median (each with its bootstrap standard error) and best of the finite values
    below `threshold`; the others count as diverged."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[np.isfinite(values) & (values < threshold)]
    if len(kept) == 0:
        return Summary(math.nan, math.nan, math.nan, math.nan, math.nan, 0, len(values))
    return Summary(float(kept.mean()), bootstrap_standard_error(kept, np.mean, seed=seed),
                   float(np.median(kept)), bootstrap_standard_error(kept, np.median, seed=seed),
                   float(kept.min()), len(kept), len(values) - len(kept))


def three_batched(test: np.ndarray, validation: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random (3-batched): the runs in random triples (a leftover one or two are dropped), and from
    each triple the test value of the run with the best final validation loss (a run whose
    validation loss is not finite never wins over one whose is)."""
    test, validation = np.asarray(test, dtype=np.float64), np.asarray(validation, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(test))[:len(test) // 3 * 3].reshape(-1, 3)
    scores = np.where(np.isfinite(validation), validation, np.inf)[order]
    winners = order[np.arange(len(order)), np.argmin(scores, axis=1)]
    return test[winners]


def final_value(run: util.Run, tag: str) -> float:
    """A run's final value of `tag` (from metrics.json; NaN when missing, diverged or failed)."""
    value = run.metrics.get("final", {}).get(tag)
    return math.nan if value is None else float(value)


def final_values_by_algorithm(runs: dict[str, util.Run], tag: str, seed: int = 0) -> dict[str, np.ndarray]:
    """{algorithm: final values of `tag`}, in the paper's order, with Random_3Batched derived from
    the Random_Validation runs (by their final Loss/Validation)."""
    grouped: dict[str, list[util.Run]] = {}
    for run in runs.values():
        grouped.setdefault(run.config.get("algorithm", "?"), []).append(run)
    values = {algorithm: np.array([final_value(run, tag) for run in group]) for algorithm, group in grouped.items()}
    if "Random_Validation" in grouped:
        validation = np.array([final_value(run, "Loss/Validation") for run in grouped["Random_Validation"]])
        values["Random_3Batched"] = three_batched(values["Random_Validation"], validation, seed)
    order = {name: index for index, name in enumerate(ALGORITHM_ORDER)}
    return dict(sorted(values.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
