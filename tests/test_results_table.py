"""The results table that ends a batch and answers `run_all.py --parse`, against a hand-made results
folder whose right answers are known."""
from __future__ import annotations

import json
from pathlib import Path

from onepass import results_table
from tests.conftest import run_cli


def write_run(run_dir: Path, algorithm: str, status: str | None, test: float | None = None,
              validation: float | None = None, training: float = 0.5, lr: float = 1e-3, steps: int = 4000) -> None:
    """A run directory as train.py leaves it (config.json, and metrics.json once it has ended)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"algorithm": algorithm}))
    if status is None:
        return                           # killed before its end: unfinished
    final = {"Unnormalised_Loss/Test": test, "Loss/Test": None if test is None else test / 100,
             "Loss/Training": training, "Hyperparameter/Lr": lr}
    final |= {} if validation is None else {"Loss/Validation": validation}
    metrics = {"status": status, "weight_steps": steps, "weight_step_budget": 4000, "final": final}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def hand_made(root: Path) -> None:
    """Ours (WD+LR+M): test 4, 2, 8 (validation 0.3, 0.2, 0.1: the best by validation is the worst on
    test), one diverged, one unfinished, one interrupted after 600 steps (the best numbers of all, but
    not a finished run). Random: no validation split, test 5 and 3."""
    group = root / "main" / "uci_energy"
    for index, (test, validation) in enumerate([(4.0, 0.3), (2.0, 0.2), (8.0, 0.1)]):
        write_run(group / "Ours_LR_Momentum" / f"r{index}", "Ours_LR_Momentum", "completed", test, validation,
                  lr=0.01 * (index + 1))
    write_run(group / "Ours_LR_Momentum" / "r3", "Ours_LR_Momentum", "diverged")       # as train.py: null, not NaN
    write_run(group / "Ours_LR_Momentum" / "r4", "Ours_LR_Momentum", None)
    write_run(group / "Ours_LR_Momentum" / "r5", "Ours_LR_Momentum", "interrupted", 1.0, 0.01, steps=600)
    for index, (test, training) in enumerate([(5.0, 0.6), (3.0, 0.4)]):
        write_run(group / "Random" / f"r{index}", "Random", "completed", test, training=training, lr=1e-3 * (index + 1))


def rows(text: str) -> dict[str, list[str]]:
    return {line.split("  ")[0].strip(): [cell.strip() for cell in line.split("  ") if cell.strip()][1:]
            for line in text.splitlines()[1:]}


def test_the_table_gives_counts_budget_median_spread_and_the_best_run_by_validation(tmp_path):
    """Catches the median or quartiles taken over diverged runs too, the best run picked on the test
    loss (the paper's sin), a run's test loss not in target units, config names instead of the paper's,
    and unfinished or diverged runs left uncounted."""
    hand_made(tmp_path)
    text = results_table.render(tmp_path, "test")
    assert text.splitlines()[0].startswith("main/uci_energy:")
    table = rows(text)
    ours = table["Ours (WD+LR+M)"]
    assert ours[:5] == ["3 of 6", "1 diverged, 1 interrupted, 1 unfinished", "4000", "4", "3 – 6"]
    best = tmp_path / "main" / "uci_energy" / "Ours_LR_Momentum" / "r2"
    assert ours[5:] == ["8", "lr 0.03", str(best)]            # the lowest validation loss, not the lowest test
    random = table["Random"]
    assert random[:5] == ["2 of 2", "-", "4000", "4", "3.5 – 4.5"]
    assert random[5:] == ["3 (on training loss)", "lr 0.002", str(tmp_path / "main/uci_energy/Random/r1")]


def test_parse_prints_the_table_for_any_results_folder(tmp_path):
    hand_made(tmp_path)
    done = run_cli("run_all.py", "--parse", str(tmp_path))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == results_table.render(tmp_path, "run_all.py") + "\n"


def test_every_algorithm_config_has_a_single_paper_name():
    """Catches two configs shown under one name in a table or legend where they differ in the paper."""
    names = {path.stem: results_table.paper_name(path.stem)
             for path in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")}
    shown = [name for stem, name in names.items() if not stem.startswith("LongDiffThroughOpt_")]
    assert len(shown) == len(set(shown))
    assert names["Ours_LR_Momentum"] == "Ours (WD+LR+M)" and names["Random_SteppedLR"] == "Random ×LR"


def test_a_run_chosen_on_validation_loss_outranks_one_chosen_on_training_loss(tmp_path):
    """Catches the kinds of selection compared by name ('training' < 'validation'): a run without a
    validation loss, however low its training loss, is no better than one judged on validation."""
    group = tmp_path / "mixed" / "uci_energy" / "Ours_LR"
    write_run(group / "judged", "Ours_LR", "completed", 5.0, validation=0.9)
    write_run(group / "unjudged", "Ours_LR", "completed", 1.0, training=0.01)
    best = rows(results_table.render(tmp_path, "test"))["Ours (WD+LR)"]
    assert best[5:] == ["5", "lr 0.001", str(group / "judged")]
