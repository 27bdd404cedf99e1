"""Head to head on shared draws: where the algorithms of a results folder ran from the same
initialisations (one draw of lr, weight decay and momentum, and the network's seed: every run of a
draw carries its seed), how often one method ends below another from the same start.

    python run_all.py --parse runs/paper --head-to-head     # after the results table
    python paper_plots.py runs/paper                        # a section of report.md per experiment and dataset

For each block of the results table (dataset and setting) and each pair of its algorithms A and B,
on the draws both ran: on how many A's final test loss (target units on UCI) is lower than B's, on
how many B's is, and the ties: equal losses, or both runs without a loss. A run that diverged or
failed loses against one that completed; an interrupted or unfinished run, and a seed an algorithm
ran more than once, leave that draw out of the pair. The p-value is the exact two-sided sign test
over the draws that were not ties: under "neither is better", A's wins are Binomial(n, 1/2).
Beside it, each algorithm's median final test loss with its quartiles, and its runs that diverged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onepass import results_table
from onepass.results_table import Group

# What a report says of the tables `render` makes.
EXPLAINED = ("Per experiment and dataset: each algorithm's runs, diverged runs, median final test loss and "
             "quartiles; then, for each pair A, B, the draws (initialisations) both ran, on how many A's final test "
             "loss is lower and on how many B's (a diverged or failed run loses; both lost, or equal: a tie), and "
             "the exact two-sided sign-test p-value over the draws that are not ties.")


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign-test p-value of `wins` against `losses` (ties left out): the
    probability, with every outcome a fair coin, of a split at least as uneven either way,
    2 * P(Binomial(n, 1/2) <= min(wins, losses)), at most 1. 9 against 1: 2 * 11 / 1024."""
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test({wins}, {losses}): counts must be at least 0")
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclass(frozen=True)
class Pair:
    """Algorithms `a` and `b` on the draws both ran: `a_better` + `b_better` + `ties` = `draws`."""
    a: str
    b: str
    a_better: int
    b_better: int
    ties: int

    @property
    def draws(self) -> int:
        return self.a_better + self.b_better + self.ties

    @property
    def p_value(self) -> float:
        return sign_test(self.a_better, self.b_better)


def single_outcomes(group: Group) -> dict[int, float]:
    """{seed: outcome} of the draws the algorithm ran once (results_table.outcome: +inf for a lost run)."""
    return {seed: outcomes[0] for seed, outcomes in group.draws.items() if len(outcomes) == 1}


def compare(a: str, b: str, of_a: dict[int, float], of_b: dict[int, float]) -> Pair:
    """The head-to-head of two algorithms' outcomes on their shared draws; two lost runs (both +inf)
    are a tie, as are equal losses."""
    shared = of_a.keys() & of_b.keys()
    a_better = sum(of_a[seed] < of_b[seed] for seed in shared)
    b_better = sum(of_b[seed] < of_a[seed] for seed in shared)
    return Pair(a, b, a_better, b_better, len(shared) - a_better - b_better)


def pairs(groups: dict[str, Group]) -> list[Pair]:
    """Every pair of the algorithms of one block (in the paper's order) that share a draw."""
    names = sorted(groups, key=results_table.order_key)
    outcomes = {name: single_outcomes(groups[name]) for name in names}
    found = [compare(a, b, outcomes[a], outcomes[b]) for i, a in enumerate(names) for b in names[i + 1:]]
    return [pair for pair in found if pair.draws]


def blocks(results: Path, prog: str | None) -> dict[str, dict[str, Group]]:
    """{block: {algorithm: its runs}}, the blocks of results_table.collect."""
    found: dict[str, dict[str, Group]] = {}
    for (block, algorithm), group in results_table.collect(results, prog).items():
        found.setdefault(block, {})[algorithm] = group
    return found


def _number(value: float) -> str:
    return f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def summary_table(groups: dict[str, Group]) -> str:
    """Markdown: each algorithm's runs, diverged runs, median final test loss and quartiles."""
    rows = []
    for name in sorted(groups, key=results_table.order_key):
        group = groups[name]
        others = sum(count for status, count in group.statuses.items() if status not in ("completed", "diverged"))
        spread = ["-", "-"]
        if group.tests:
            low, median, high = np.percentile(group.tests, [25, 50, 75])
            spread = [_number(median), f"{_number(low)} – {_number(high)}"]
        rows.append([results_table.paper_name(name), str(sum(group.statuses.values())),
                     str(group.statuses["diverged"]), str(others), *spread])
    return _table(["algorithm", "runs", "diverged", "other not completed", "median test loss", "25–75 %"], rows)


def pairs_table(found: list[Pair]) -> str:
    """Markdown: one row per pair, 'A better on k of the n shared draws', with the sign test."""
    rows = [[results_table.paper_name(pair.a), results_table.paper_name(pair.b), str(pair.draws),
             str(pair.a_better), str(pair.b_better), str(pair.ties), f"{pair.p_value:.3g}"] for pair in found]
    return _table(["A", "B", "shared draws", "A lower", "B lower", "ties", "p (two-sided sign test)"], rows)


def markdown(groups: dict[str, Group]) -> str:
    """The summary and the head-to-head of one block; '' when no two of its algorithms share a draw."""
    found = pairs(groups)
    return f"{summary_table(groups)}\n\n{pairs_table(found)}" if found else ""


def render(results: Path, prog: str | None, depth: int | None = None) -> str:
    """The head-to-head of every block below `results` (of at most `depth` folders, if given) where
    two algorithms share draws, under a heading naming it; '' if there is none."""
    sections = [f"#### {block}: head to head on shared draws\n\n{text}"
                for block, groups in sorted(blocks(results, prog).items())
                if (depth is None or len(Path(block).parts) <= depth) and (text := markdown(groups))]
    return "\n\n".join(sections)
