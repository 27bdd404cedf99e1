"""The head-to-head on shared draws (head_to_head.py): the exact sign test against hand-computed
values, and the counts of a hand-made results folder whose right answers are known, through both
surfaces (`run_all.py --parse DIR --head-to-head`, paper_plots' report)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from onepass import head_to_head
from tests.conftest import run_cli


@pytest.mark.parametrize("wins, losses, p", [
    (9, 1, 22 / 1024),            # 2 * (C(10,0) + C(10,1)) / 2^10
    (1, 9, 22 / 1024),            # two-sided: the same either way
    (10, 0, 2 / 1024),
    (3, 0, 2 / 8),
    (6, 2, 74 / 256),             # 2 * (1 + 8 + 28) / 2^8
    (5, 5, 1.0),                  # a doubled tail over 1 is 1
    (0, 0, 1.0),                  # nothing to test
])
def test_the_sign_test_is_exact_and_two_sided(wins, losses, p):
    """Catches a one-sided p-value (9 of 10: 11/1024), a tail that leaves out the observed split,
    and a p-value over 1."""
    assert head_to_head.sign_test(wins, losses) == p


def test_ties_do_not_enter_the_sign_test():
    """Catches tied draws counted as draws of the test (9 of 15 instead of 9 of 10)."""
    assert head_to_head.Pair("A", "B", a_better=9, b_better=1, ties=5).p_value == 22 / 1024


def write_run(run_dir: Path, algorithm: str, seed: int, status: str | None, test: float | None = None) -> None:
    """A run directory as train.py leaves it: config.json, and metrics.json once it has ended (a
    diverged run's loss is null, a failed one has none)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"algorithm": algorithm, "seed": seed}))
    if status is None:
        return
    final = {} if status == "failed" else {"Unnormalised_Loss/Test": test, "Loss/Training": 0.5}
    (run_dir / "metrics.json").write_text(json.dumps({"status": status, "weight_step_budget": 4000, "final": final}))


# Final test losses by seed; "diverged", "failed", "interrupted" (with a loss, but not finished).
RUNS = {
    "Random": {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: "diverged", 6: 2.0},
    "Ours_LR_Momentum": {1: 1.0, 2: 2.0, 3: "diverged", 4: 3.0, 5: "failed", 6: "interrupted"},
    "Prodigy": {1: 0.5, 2: 0.5, 3: 0.5},
}


def hand_made(root: Path) -> None:
    """Seed by seed, Ours (WD+LR+M) against Random: 1 lower; 2 higher; 3 diverged against a completed
    run, lower for Random; 4 equal, a tie; 5 failed against diverged, both lost, a tie; 6 interrupted,
    left out. Prodigy ran seed 1 twice (0.5 and 0.7): that draw is left out of its pairs. A second
    block whose algorithms share no draw, and a setting below a dataset (a third folder level)."""
    block = root / "peers" / "uci_energy"
    for algorithm, outcomes in RUNS.items():
        for seed, result in outcomes.items():
            status, test = ("completed", result) if isinstance(result, float) else (result, None)
            test = 1.0 if status == "interrupted" else test
            write_run(block / algorithm / f"s{seed}", algorithm, seed, status, test)
    write_run(block / "Prodigy" / "s1-again", "Prodigy", 1, "completed", 0.7)
    write_run(root / "peers" / "fashion_mnist" / "Random" / "a", "Random", 7, "completed", 0.4)
    write_run(root / "peers" / "fashion_mnist" / "Prodigy" / "b", "Prodigy", 8, "completed", 0.3)
    for algorithm, test in (("Random", 2.0), ("Prodigy", 1.0)):
        write_run(root / "sweep" / "uci_energy" / algorithm / "Setting1" / "a", algorithm, 9, "completed", test)


def test_pairs_count_shared_draws_lost_runs_and_ties(tmp_path):
    """Catches ties counted as wins, a diverged or failed run tying with (or beating) a completed one,
    two lost runs counted as a win for either, an interrupted run entering a pair, and a seed run twice
    paired by whichever of its runs came last."""
    hand_made(tmp_path)
    blocks = head_to_head.blocks(tmp_path, "test")
    found = {(pair.a, pair.b): pair for pair in head_to_head.pairs(blocks["peers/uci_energy"])}
    assert found == {
        ("Random", "Ours_LR_Momentum"): head_to_head.Pair("Random", "Ours_LR_Momentum", 2, 1, 2),
        ("Random", "Prodigy"): head_to_head.Pair("Random", "Prodigy", 0, 2, 0),
        ("Ours_LR_Momentum", "Prodigy"): head_to_head.Pair("Ours_LR_Momentum", "Prodigy", 0, 2, 0),
    }
    assert found["Random", "Ours_LR_Momentum"].p_value == 1.0 and found["Random", "Prodigy"].p_value == 0.5
    assert head_to_head.pairs(blocks["peers/fashion_mnist"]) == []       # no shared draw: no pair


def test_parse_prints_the_summary_and_the_head_to_head_in_markdown(tmp_path):
    """Catches the head-to-head rows or the summary's diverged and quartile cells going wrong between
    the counts and the text, and a block without shared draws given an empty table."""
    hand_made(tmp_path)
    done = run_cli("run_all.py", "--parse", str(tmp_path), "--head-to-head")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    table, duels = done.stdout.split("\n\n#### ", 1)
    assert table.startswith("peers/fashion_mnist:")                        # the results table comes first
    lines = duels.splitlines()
    assert lines[0] == "peers/uci_energy: head to head on shared draws"
    assert "| Random | 6 | 1 | 0 | 3 | 2 – 4 |" in lines
    assert "| Ours (WD+LR+M) | 6 | 1 | 2 | 2 | 1.5 – 2.5 |" in lines        # failed and interrupted
    assert "| Prodigy | 4 | 0 | 0 | 0.5 | 0.5 – 0.55 |" in lines
    assert "| Random | Ours (WD+LR+M) | 5 | 2 | 1 | 2 | 1 |" in lines
    assert "| Random | Prodigy | 2 | 0 | 2 | 0 | 0.5 |" in lines
    assert "| Ours (WD+LR+M) | Prodigy | 2 | 0 | 2 | 0 | 0.5 |" in lines
    assert "fashion_mnist" not in duels and "#### sweep/uci_energy/Setting1" in done.stdout


def test_head_to_head_needs_parse():
    done = run_cli("run_all.py", "--list", "--head-to-head")
    assert done.returncode == 2 and "use it with --parse DIR" in done.stderr


def test_the_report_has_the_head_to_head_per_experiment_and_dataset(tmp_path):
    """Catches the section missing from report.md, or a setting's block (a third folder level) in it."""
    hand_made(tmp_path)
    done = run_cli("paper_plots.py", str(tmp_path), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "### Head to head on shared draws" in report
    assert "#### peers/uci_energy: head to head on shared draws" in report
    assert "| Random | Prodigy | 2 | 0 | 2 | 0 | 0.5 |" in report
    assert "sweep/uci_energy/Setting1" not in report
