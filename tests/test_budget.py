"""Every algorithm of an experiment trains its final network for the same number of weight steps:
the paper's comparisons are of equal budgets (Baydin's one-step windows included)."""
from __future__ import annotations

from collections import defaultdict

import pytest

from onepass import parallel_exec, run_all
from onepass.schema import ConfigError
from tests.conftest import run_cli

# The peers study runs once the peer optimisers' configs are in the checkout; until then it is skipped.
MISSING_PEERS = [name for name in run_all.PEERS if not (parallel_exec.CONFIGS / f"{name}.yaml").is_file()]
BATCHES = [pytest.param(name, marks=pytest.mark.skipif(name == "peers" and bool(MISSING_PEERS),
                                                       reason=f"no configs for {', '.join(MISSING_PEERS)} yet"))
           for name, experiment in run_all.EXPERIMENTS.items()
           if experiment.runner == "batch" and experiment.generator != "replay"]


def budgets(name: str, root, extra: tuple[str, ...] = ()) -> dict[tuple, dict[str, int]]:
    """{(dataset, setting): {algorithm: weight steps of its final network}}, from each run's config:
    H windows of T steps, or one window's T steps when every window restarts from the start."""
    found: dict[tuple, dict[str, int]] = defaultdict(dict)
    for job in run_all.EXPERIMENTS[name].jobs(name, root, reps=1, extra=extra):
        cfg = job.config(root)
        _, dataset, algorithm, *setting = job.group.split("/")
        steps = cfg.network_weight_steps * (1 if cfg.tuning.reset_weights else cfg.hyperparameter_steps)
        found[(dataset, *setting)][algorithm] = steps
    return found


@pytest.mark.parametrize("name", BATCHES)
def test_every_algorithm_of_an_experiment_trains_for_the_same_number_of_weight_steps(name, tmp_path):
    """Catches an algorithm config with its own step counts (Baydin's 4000 one-step windows against
    Fashion-MNIST's 1000 windows of 10 steps)."""
    for where, of_algorithm in budgets(name, tmp_path).items():
        assert len(set(of_algorithm.values())) == 1, (where, of_algorithm)
    assert run_all.weight_step_budgets(run_all.EXPERIMENTS[name].jobs(name, tmp_path, reps=1), tmp_path)


@pytest.mark.parametrize("name", BATCHES)
def test_a_set_of_steps_gives_every_algorithm_the_same_budget_or_is_refused(name, tmp_path):
    """Catches `--set hyperparameter_steps=20` meaning 200 weight steps for most algorithms and 20
    for Baydin, or leaving Long Diff-through-Opt's whole-run windows at another length unnoticed."""
    extra = ("hyperparameter_steps=20",)
    found = budgets(name, tmp_path, extra)
    if all(len(set(of_algorithm.values())) == 1 for of_algorithm in found.values()):
        assert run_all.weight_step_budgets(run_all.EXPERIMENTS[name].jobs(name, tmp_path, 1, extra=extra), tmp_path)
    else:
        with pytest.raises(ConfigError, match="different numbers of weight steps"):
            run_all.weight_step_budgets(run_all.EXPERIMENTS[name].jobs(name, tmp_path, 1, extra=extra), tmp_path)


def test_baydin_takes_a_hyperparameter_step_after_every_weight_step_of_the_same_budget():
    from onepass import config
    cfg = config.load_from(["configs/fashion_mnist.yaml", "configs/Baydin.yaml"], overrides=["hyperparameter_steps=20"])
    assert (cfg.network_weight_steps, cfg.hyperparameter_steps) == (1, 200)


def test_run_all_says_the_budget_and_refuses_an_unequal_one(tmp_path):
    done = run_cli("run_all.py", "long_dto_standalone", "--reps", "1", "--set", "hyperparameter_steps=2",
                   "-l", str(tmp_path), timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "uci_energy: the algorithms would train for different numbers of weight steps (Random 20" in done.stderr
    assert not any(tmp_path.iterdir())
