"""The analysis and the baselines the paper's tables rest on, against answers known from outside
the code: hand-made results folders whose right values are computed here by hand, and baselines
whose choice must follow the validation loss where the test loss would say otherwise."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom

from onepass import checkpoint, config, ray_tune, results_table, run_files, train, util
from tests.conftest import REPO, run_cli

CONFIGS = REPO / "configs"


def write_finished_run(run_dir: Path, algorithm: str, final: dict[str, float | None], status: str = "completed",
                       dataset: str = "uci_energy") -> None:
    """A run directory as a batch leaves it: the real merged config.json, metrics.json with these
    final values, and test-loss events."""
    cfg = config.load_from([str(CONFIGS / f"{dataset}.yaml"), str(CONFIGS / f"{algorithm}.yaml")],
                           overrides=["hyperparameter_steps=10"])
    run_dir.mkdir(parents=True)
    util.write_json(run_dir / "config.json", config.to_dict(cfg))
    util.write_json(run_dir / "metrics.json", {"status": status, "weight_steps": 100, "train_seconds": 1.0,
                                               "segments": 1, "final": final})
    log = run_files.RunLog(run_dir)
    test = final.get("Unnormalised_Loss/Test")
    for step in range(0, 101, 50):
        log.scalars(step, {"Unnormalised_Loss/Test": math.nan if test is None else test * (2 - step / 100)})
    log.close()


def table_row(text: str, algorithm: str, separator: str) -> tuple[int, list[tuple[float, float]]]:
    """The runs and the (value, standard error or NaN) of each statistic cell of `algorithm`'s row
    (by its paper name) in a Markdown (separator '|') or LaTeX ('&') table."""
    name = results_table.paper_name(algorithm)
    name = name.replace("_", "\\_").replace("×", "$\\times$") if separator == "&" else name
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip(" |\\").split(separator)]
        if cells[0] == name:
            parsed = []
            for cell in cells[2:5]:
                cell = cell.replace("**", "").replace("\\textbf{", "").replace("}", "").replace("$\\pm$", "±")
                value, _, error = cell.partition("±")
                parsed.append((float(value), float(error) if error else math.nan))
            return int(cells[1]), parsed
    raise AssertionError(f"no row {name!r} in\n{text}")


def exact_bootstrap_median_se(values: np.ndarray) -> float:
    """The standard error of the median over every bootstrap resample (odd n = 2m + 1: the
    resampled median is at most the k-th smallest value when at least m + 1 draws are)."""
    ordered, n = np.sort(values), len(values)
    probabilities = np.diff(binom.sf((n - 1) // 2, n, np.arange(n + 1) / n))
    return float(np.sqrt(probabilities @ ordered**2 - (probabilities @ ordered) ** 2))


# One far outlier: the mean's bootstrap error (about 45) is some 20 times the median's, and the
# outlier is practically never a resample's median (that needs 11 of its 21 draws).
RANDOM_FINALS = np.append(np.arange(1.0, 21.0), 1000.0)
# Random_Validation runs whose validation loss orders them the other way round from their test value.
VALIDATION_RUNS = {"Unnormalised_Loss/Test": [1.0, 2.0, 3.0], "Loss/Validation": [0.3, 0.2, 0.1]}


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> tuple[str, str]:
    """report.md and the LaTeX table of paper_plots.py on a hand-made main experiment."""
    root = tmp_path_factory.mktemp("results")
    group = root / "main" / "uci_energy"
    for index, value in enumerate(RANDOM_FINALS):
        write_finished_run(group / "Random" / f"run{index}", "Random",
                           {"Unnormalised_Loss/Test": value, "Loss/Validation": value / 10})
    for index, (test, validation) in enumerate(zip(*VALIDATION_RUNS.values(), strict=True)):
        write_finished_run(group / "Random_Validation" / f"run{index}", "Random_Validation",
                           {"Unnormalised_Loss/Test": test, "Loss/Validation": validation})
    result = run_cli("paper_plots.py", str(root), "--out", str(root / "paper"), timeout=300)
    assert result.returncode == 0, result.stderr
    return (root / "paper" / "report.md").read_text(), (root / "paper" / "main_uci_energy_table.tex").read_text()


@pytest.mark.parametrize("separator", ["|", "&"], ids=["markdown", "latex"])
def test_table_errors_are_the_bootstrap_errors_of_the_mean_and_the_median(tables, separator):
    runs, ((mean, mean_se), (median, median_se), (best, _)) = table_row(tables[separator == "&"], "Random", separator)
    assert runs == len(RANDOM_FINALS)
    assert (mean, median, best) == (pytest.approx(RANDOM_FINALS.mean(), rel=1e-3), 11.0, 1.0)
    # The mean's bootstrap error is exactly the population standard deviation over sqrt(n).
    exact_mean_se = RANDOM_FINALS.std() / math.sqrt(len(RANDOM_FINALS))
    assert mean_se == pytest.approx(exact_mean_se, rel=0.15)
    assert median_se == pytest.approx(exact_bootstrap_median_se(RANDOM_FINALS), rel=0.15)


@pytest.mark.parametrize("separator", ["|", "&"], ids=["markdown", "latex"])
def test_three_batched_random_picks_the_run_with_the_best_validation_loss_not_test(tables, separator):
    runs, ((mean, _), (median, _), (best, _)) = table_row(tables[separator == "&"], "Random_3Batched", separator)
    assert runs == 1                            # one triple of the 3 Random_Validation runs
    assert mean == median == best == 3.0        # the run with the lowest validation loss, and highest test value


def test_bayesian_optimisation_minimises_the_validation_loss_not_the_test_loss(tmp_path):
    """A resumed sequence re-reads its finished runs: their objective is the validation loss (test
    and validation disagree on the best), a diverged run counts as the dataset's cap."""
    folder = tmp_path / "uci_energy" / "repetition_0"
    finals = [{"Unnormalised_Loss/Validation": 5.0, "Unnormalised_Loss/Test": 1.0},
              {"Unnormalised_Loss/Validation": 2.0, "Unnormalised_Loss/Test": 9.0},
              {"Unnormalised_Loss/Validation": None, "Unnormalised_Loss/Test": None}]
    for k, final in enumerate(finals):
        write_finished_run(folder / f"{k:02d}", "Random_Validation", final,
                           status="diverged" if final["Unnormalised_Loss/Test"] is None else "completed")
    result = run_cli("bayesopt.py", "-d", "uci_energy", "-l", str(tmp_path), "--initial", "3", "--guided", "0",
                     "--workers", "1", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "best validation loss per repetition: 2\n" in result.stdout
    history = json.loads((folder / "history.json").read_text())
    assert [entry["loss"] for entry in history] == [5.0, 2.0, 150.0]     # Energy's cap for the diverged run


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("algorithm", ["Random_TrainingSetOnly", "Ours_LR_Momentum"])
def test_a_pbt_trial_continues_the_copied_state_moved_by_its_perturbation_in_log10_and_logit_space(algorithm,
                                                                                                  tmp_path):
    """PBT's exploit: the trial takes the copied trial's complete state, and each hyperparameter
    moves from that state's value by the change of the starting value (x1.2 lr, x0.8 momentum:
    PBT's perturbation factors), in log10 for lr and logit for momentum."""
    files = [str(CONFIGS / "diabetes.yaml"), str(CONFIGS / f"{algorithm}.yaml")]

    def learner(lr: float, momentum: float) -> train.Learner:
        cfg = config.load_from(files, overrides=["hyperparameter_steps=3", "model.layer_sizes=[10, 8, 1]",
                                                 f"log_root={tmp_path}", f"optimiser.lr={lr}",
                                                 f"optimiser.momentum={momentum}", "optimiser.weight_decay=1e-4"])
        return train.Learner(train.prepare(cfg))
    source = learner(1e-3, 0.5)
    source.run()
    state = checkpoint.state_of(source) | {"config": config.to_dict(source.cfg)}
    reached = source.hyperparameters.log_values()
    trial = learner(1.2e-3, 0.4)
    ray_tune.continue_from(trial, state)
    moved = trial.hyperparameters.log_values()
    assert moved["Hyperparameter/Lr"] == pytest.approx(
        10 ** (math.log10(reached["Hyperparameter/Lr"]) + math.log10(1.2e-3) - math.log10(1e-3)), rel=1e-6)
    expected_logit = logit(reached["Hyperparameter/Momentum"]) + logit(0.4) - logit(0.5)
    assert moved["Hyperparameter/Momentum"] == pytest.approx(1 / (1 + math.exp(-expected_logit)), rel=1e-6)
    assert moved["Hyperparameter/Weight_Decay"] == pytest.approx(reached["Hyperparameter/Weight_Decay"], rel=1e-9)
    for name, value in source.model.state_dict().items():
        assert torch.equal(trial.model.state_dict()[name], value), name


def test_the_logged_per_element_lr_is_the_mean_over_every_element(tmp_path):
    """Ours_HDLR_Momentum's Hyperparameter/Lr: the mean of all its per-element lrs (read from the
    final checkpoint), not a mean of each weight tensor's mean."""
    result = run_cli("train.py", "-c", str(CONFIGS / "diabetes.yaml"), str(CONFIGS / "Ours_HDLR_Momentum.yaml"),
                     "--seed", "0", "--hyperparameter_steps", "6", "--set", "model.layer_sizes=[10, 8, 1]",
                     "-l", str(tmp_path / "runs"), "-S", str(tmp_path / "state.pt"), timeout=300)
    assert result.returncode == 0, result.stderr
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    per_tensor = [10 ** raw.double() for raw in state["hyperparameters"]["raw"][:len(state["model"])]]  # lr first
    every_element = torch.cat([lr.reshape(-1) for lr in per_tensor]).mean().item()
    mean_of_means = torch.stack([lr.mean() for lr in per_tensor]).mean().item()
    assert abs(mean_of_means - every_element) > 1e-3 * every_element      # the two readings differ here
    (run,) = util.get_tags(tmp_path / "runs", "Hyperparameter/Lr").values()
    assert run.metrics["final"]["Hyperparameter/Lr"] == pytest.approx(every_element, rel=1e-6)
    assert run.scalars["Hyperparameter/Lr"].values[-1] == pytest.approx(every_element, rel=1e-6)
