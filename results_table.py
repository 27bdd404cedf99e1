"""A results folder at a glance: for every group of runs (dataset, algorithm and setting), how many
ran and how they ended, the weight steps they trained for, the median final test loss with its
spread, and the best run (by final validation loss) with its hyperparameters and directory.

`run_all.py` prints this table at the end of a batch and for `--parse DIR`; `parallel_exec.py` at
the end of a batch. It reads only each run's config.json and metrics.json (no event files), so it
answers in seconds for thousands of runs.
"""
from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onepass import util

STATUSES = ("completed", "diverged", "interrupted", "failed", "unfinished", "unreadable")   # the order shown
# The paper's number: the test loss in target units where the targets were normalised (UCI).
TEST_TAGS = ("Unnormalised_Loss/Test", "Loss/Test")
# The best run is chosen on what a user may look at: validation, else (no validation split) training.
SELECTION_TAGS = (("Loss/Validation", "validation"), ("Loss/Training", "training"))

# The paper's names for the algorithm configs (config names elsewhere stay as they are).
PAPER_NAMES = {
    "Random_SteppedLR": "Random ×LR", "Random_3Batched": "Random (3-batched)",
    "Random_Validation": "Random (full validation)", "Random_TrainingSetOnly": "Random (training set only)",
    "Baydin_Exact": "Baydin (exact)", "Ours_LR": "Ours (WD+LR)", "Ours_LR_Momentum": "Ours (WD+LR+M)",
    "Ours_HDLR_Momentum": "Ours (WD+HDLR+M)", "DiffThroughOpt": "Diff-through-Opt",
    "LongDiffThroughOpt_UCI_Standalone": "Long Diff-through-Opt",
    "LongDiffThroughOpt_UCI_Full": "Full Diff-through-Opt",
    "LongDiffThroughOpt_FashionMNIST_Standalone": "Long Diff-through-Opt",
    "LongDiffThroughOpt_FashionMNIST_Medium": "Medium Diff-through-Opt",
    "DAdaptation_SGD": "D-Adaptation (SGD)", "DAdaptation_Adam": "D-Adaptation (Adam)",
    "ScheduleFree_SGD": "Schedule-Free (SGD)", "ScheduleFree_AdamW": "Schedule-Free (AdamW)",
    "Ours_Adam_LR_WD": "Ours (Adam, WD+LR)", "Ours_Adam_LR_WD_Betas": "Ours (Adam, WD+LR+β)",
    "Ours_Adam_LR_WD_Betas_AllRows": "Ours (Adam, WD+LR+β, all rows)", "Ours_HDLR_Adam": "Ours (Adam, WD+HDLR)",
}


# How figures and reports name the datasets.
DATASET_NAMES = {
    "uci_boston": "UCI Boston Housing", "uci_concrete": "UCI Concrete", "uci_energy": "UCI Energy",
    "uci_kin8nm": "UCI Kin8nm", "uci_naval": "UCI Naval", "uci_power": "UCI Power", "uci_wine": "UCI Wine",
    "uci_yacht": "UCI Yacht", "fashion_mnist": "Fashion-MNIST", "fashion_mnist_BatchNorm": "Fashion-MNIST (BatchNorm)",
    "cifar10": "CIFAR-10", "penn_treebank": "Penn Treebank", "penn_treebank_small": "Penn Treebank (small)",
}


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


# The paper's order of algorithms in tables and legends (the 3-batched Random after the stepped-lr
# one, the exact Baydin beside Baydin's); the peers study's algorithms after the paper's.
ALGORITHM_ORDER = ("Random", "Random_SteppedLR", "Random_3Batched", "Random_Validation", "Random_TrainingSetOnly",
                   "Lorraine", "Baydin", "Baydin_Exact", "Ours_LR", "Ours_LR_Momentum", "Ours_HDLR_Momentum",
                   "DiffThroughOpt",
                   "LongDiffThroughOpt_UCI_Standalone", "LongDiffThroughOpt_UCI_Full",
                   "LongDiffThroughOpt_FashionMNIST_Standalone", "LongDiffThroughOpt_FashionMNIST_Medium",
                   "Prodigy", "DAdaptation_SGD", "DAdaptation_Adam", "ScheduleFree_SGD", "ScheduleFree_AdamW",
                   "Ours_Adam_LR_WD", "Ours_Adam_LR_WD_Betas", "Ours_Adam_LR_WD_Betas_AllRows", "Ours_HDLR_Adam")


def paper_name(algorithm: str) -> str:
    """The name the paper gives an algorithm config (the config's own name when it gives none)."""
    return PAPER_NAMES.get(algorithm, algorithm)


def order_key(algorithm: str) -> tuple[int, str]:
    """Sorts algorithms in the paper's order, unknown ones last by name."""
    order = ALGORITHM_ORDER.index(algorithm) if algorithm in ALGORITHM_ORDER else len(ALGORITHM_ORDER)
    return order, algorithm


@dataclass
class Best:
    rank: int                # of its selection tag in SELECTION_TAGS: validation before training
    selection: float
    test: float
    hyperparameters: dict[str, float]
    run_dir: Path

    @property
    def selected_on(self) -> str:
        return SELECTION_TAGS[self.rank][1]


@dataclass
class Group:
    """The runs of one folder below the results folder."""
    statuses: Counter = field(default_factory=Counter)
    budgets: set[int] = field(default_factory=set)
    tests: list[float] = field(default_factory=list)     # final test losses of the completed runs
    best: Best | None = None
    draws: dict[int, list[float]] = field(default_factory=dict)   # seed -> outcomes of its runs (see `outcome`)

    def add(self, run_dir: Path, metrics: dict, seed: int | None = None) -> None:
        status = metrics.get("status", "unfinished")
        result = outcome(status, _first(metrics.get("final") or {}, TEST_TAGS))
        if seed is not None and result is not None:
            self.draws.setdefault(seed, []).append(result)
        self.statuses[status] += 1
        budget = metrics.get("weight_step_budget", metrics.get("weight_steps"))     # older runs: steps taken
        if budget is not None:
            self.budgets.add(budget)
        final = metrics.get("final") or {}
        test = _first(final, TEST_TAGS)
        if status != "completed" or test is None:
            return
        self.tests.append(test)
        selection = next(((rank, final[tag]) for rank, (tag, _) in enumerate(SELECTION_TAGS)
                          if final.get(tag) is not None and math.isfinite(final[tag])), None)
        if selection is not None and (self.best is None or selection < (self.best.rank, self.best.selection)):
            hyperparameters = {key.split("/", 1)[1]: value for key, value in final.items()
                               if key.startswith("Hyperparameter/") and value is not None}
            self.best = Best(*selection, test, hyperparameters, run_dir)


def outcome(status: str, test: float | None) -> float | None:
    """What a run's draw compares it by: its final test loss; +inf, worse than any, for a run that
    diverged, failed or ended with no finite loss; None (no outcome) for a run that was interrupted,
    has not finished, or completed without recording a test loss."""
    if status in ("diverged", "failed") or (status == "completed" and test is not None and not math.isfinite(test)):
        return math.inf
    return test if status == "completed" else None


def _first(final: dict, tags: tuple[str, ...]) -> float | None:
    return next((final[tag] for tag in tags if final.get(tag) is not None), None)


def collect(results: Path, prog: str | None) -> dict[tuple[str, str], Group]:
    """{(block, algorithm): its runs}, a block being the group folder relative to `results` without
    its algorithm's part (so that the algorithms of one dataset and setting share it). A run whose
    config.json or metrics.json is damaged counts as unreadable, with a line on stderr naming it."""
    groups: dict[tuple[str, str], Group] = {}
    for config_file in sorted(results.rglob("config.json")):
        run_dir = config_file.parent
        folders = run_dir.parent.relative_to(results).parts
        try:
            values = util.read_json_object(config_file, {"algorithm": str, "seed?": util.SEED})
            algorithm, seed = values["algorithm"], values.get("seed")
            metrics = util.read_metrics(run_dir)
        except util.UnreadableFile as error:
            if prog is not None:      # (None: the caller has said so already)
                print(f"{prog}: skipped the run {run_dir}: {error}", file=sys.stderr)
            algorithm, seed = folders[-1] if folders else "?", None
            metrics = {"status": "unreadable"}
        block = "/".join(folder for folder in folders if folder != algorithm) or "."
        groups.setdefault((block, algorithm), Group()).add(run_dir, metrics, seed)
    return groups


def _number(value: float) -> str:
    return f"{value:.4g}"


def _hyperparameters(values: dict[str, float]) -> str:
    return "  ".join(f"{name.lower()} {value:.3g}" for name, value in values.items()) or "-"


def row(name: str, group: Group) -> list[str]:
    counts = group.statuses
    shown = sorted(counts, key=lambda status: STATUSES.index(status) if status in STATUSES else len(STATUSES))
    others = ", ".join(f"{counts[status]} {status}" for status in shown if status != "completed")
    steps = "/".join(str(steps) for steps in sorted(group.budgets)) or "-"
    cells = [name, f"{counts['completed']} of {sum(counts.values())}", others or "-", steps]
    if group.tests:
        low, median, high = np.percentile(group.tests, [25, 50, 75])
        cells += [_number(median), f"{_number(low)} – {_number(high)}"]
    else:
        cells += ["-", "-"]
    best = group.best
    if best is None:
        return cells + ["-", "-", "-"]
    where = "" if best.selected_on == "validation" else " (on training loss)"
    return cells + [_number(best.test) + where, _hyperparameters(best.hyperparameters), str(best.run_dir)]


HEADER = ["completed", "not completed", "weight steps", "median test loss", "25–75 %", "best run: test loss",
          "its final hyperparameters", "its directory"]


def render(results: Path, prog: str) -> str:
    """The results table of every run below `results`, one block per dataset and setting (its
    algorithms as rows, by their paper names), aligned for a terminal or a log; '' with no runs."""
    blocks: dict[str, list[list[str]]] = {}
    groups = collect(results, prog)
    for block, algorithm in sorted(groups, key=lambda key: (key[0], order_key(key[1]))):
        blocks.setdefault(block, []).append(row(paper_name(algorithm), groups[block, algorithm]))
    return "\n\n".join(_aligned([f"{block}:", *HEADER], rows) for block, rows in blocks.items())


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *rows])
