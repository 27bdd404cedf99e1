"""The peers study (`run_all.py peers`): the learning-rate-free optimisers and Ours on Adam from the
main experiments' own draws, Prodigy and D-Adaptation from lr 1.0, and each draw's settings only
where the algorithm's update rule has them, without changing any existing experiment's runs."""
from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import replace

import pytest

from onepass import parallel_exec, run_all
from onepass.algorithms.weight_update import RULES

PEERS = run_all.EXPERIMENTS["peers"]
BASELINES = ("Random", "Ours_LR_Momentum")          # the peers' algorithms whose configs exist everywhere
MISSING = [name for name in run_all.PEERS if not (parallel_exec.CONFIGS / f"{name}.yaml").is_file()]


def values(job: parallel_exec.Job) -> dict[str, str]:
    """{key: value} of a job's overrides (a later one wins, as in config.load_from)."""
    return dict(override.split("=", 1) for override in job.overrides)


@pytest.mark.parametrize("seed", [0, 5])
def test_the_peers_draws_are_the_main_experiments_first_draws(seed, tmp_path):
    """Catches the peers drawn with another generator, seed or ranges: `--reps K` of the peers would
    not start where the main experiments' first K runs started."""
    assert PEERS.points(tmp_path, None, seed) == run_all.EXPERIMENTS["uci"].points(tmp_path, 20, seed)
    assert PEERS.points(tmp_path, 3, seed) == run_all.EXPERIMENTS["fashion_mnist"].points(tmp_path, 3, seed)


@pytest.mark.parametrize("dataset", ["uci_energy", "fashion_mnist"])
def test_random_and_ours_of_the_peers_are_the_main_experiments_runs(dataset, tmp_path):
    """Same configs, so the same config hashes: the peers' baselines are the main experiment's runs."""
    mine = replace(PEERS, algorithms=BASELINES).jobs("peers", tmp_path, reps=3)
    main = replace(run_all.EXPERIMENTS[dataset], algorithms=BASELINES).jobs(dataset, tmp_path, reps=3)
    assert ({job.run_dir(tmp_path).name for job in mine if f"/{dataset}/" in f"/{job.group}/"}
            == {job.run_dir(tmp_path).name for job in main})


def test_fashion_mnist_takes_the_first_5_draws_and_uci_20(tmp_path):
    jobs = replace(PEERS, algorithms=BASELINES).jobs("peers", tmp_path)
    per_dataset = Counter(job.group.split("/")[1] for job in jobs)         # 2 algorithms each
    assert per_dataset == {"uci_energy": 40, "uci_kin8nm": 40, "uci_power": 40, "fashion_mnist": 10}
    quick = replace(PEERS, algorithms=BASELINES).jobs("peers", tmp_path, reps=3)
    assert len(quick) == 4 * 2 * 3


def test_existing_experiments_keep_their_runs(tmp_path):
    """The rule on a draw's settings reproduces what the main experiments always ran (the lr
    multiplier for Random_SteppedLR alone, everything else as drawn): their config hashes, and so
    their results folders, stay valid."""
    for name in ("uci_energy", "fashion_mnist"):
        experiment = run_all.EXPERIMENTS[name]
        points = experiment.points(tmp_path, 3, 0)
        expected = [tuple(f"{key}={value!r}" for key, value in point.items()
                          if key != parallel_exec.MULTIPLIER or algorithm == "Random_SteppedLR")
                    for algorithm in experiment.algorithms for point in points]
        assert [job.overrides for job in experiment.jobs(name, tmp_path, reps=3)] == expected


def test_a_draw_gives_only_the_settings_of_the_algorithms_rule(tmp_path):
    """Catches momentum passed to an Adam run (config.py refuses it from --set), the rule read from
    the algorithm's file alone when an override changes it, and the lr multiplier given to a run
    without a fixed schedule."""
    points = parallel_exec.natural_sgd(2, seed=0)
    sgd = parallel_exec.make_jobs(["uci_energy"], ["Random", "Random_SteppedLR"], points)
    adam = parallel_exec.make_jobs(["uci_energy"], ["Ours_LR"], points, ("optimiser.name=adam",))
    assert {"optimiser.momentum", "seed"} <= values(sgd[0]).keys() and parallel_exec.MULTIPLIER not in values(sgd[0])
    assert parallel_exec.MULTIPLIER in values(sgd[2])
    for job, point in zip(adam, points, strict=True):
        assert "optimiser.momentum" not in values(job) and parallel_exec.MULTIPLIER not in values(job)
        cfg = job.config(tmp_path)
        assert (cfg.optimiser.name, cfg.optimiser.lr, cfg.optimiser.weight_decay, cfg.seed) == (
            "adam", point["optimiser.lr"], point["optimiser.weight_decay"], point["seed"])


STAND_INS = {"Prodigy": "adam", "DAdaptation_SGD": "sgd", "ScheduleFree_AdamW": "adam"}


@pytest.fixture
def stand_in_configs(tmp_path, monkeypatch):
    """A copy of configs/ with fixed-hyperparameter Adam or SGD configs under peers' names (the
    rule chosen in the algorithm's own file, as the peers' configs choose theirs). The Adam ones
    set momentum to its default, unused, value: the dataset configs' SGD momentum would otherwise
    be refused where config sources are kept per section rather than key by key."""
    folder = tmp_path / "configs"
    shutil.copytree(parallel_exec.CONFIGS, folder)
    for name, rule in STAND_INS.items():
        reset = "\n  momentum: 0.0" if rule == "adam" else ""
        (folder / f"{name}.yaml").write_text(f"algorithm: {name}\ndataset:\n  validation_proportion: 0.0\n"
                                             f"optimiser:\n  name: {rule}{reset}\ntuning:\n  method: fixed\n")
    monkeypatch.setattr(parallel_exec, "CONFIGS", folder)


def test_prodigy_and_d_adaptation_start_from_lr_1_with_the_draws_weight_decay(stand_in_configs, tmp_path):
    """Catches the lr 1.0 override missing, or put before the draw's lr (which would then win), and a
    draw's momentum given to an Adam-based rule (config.py would refuse the run)."""
    experiment = replace(PEERS, algorithms=("Random", *STAND_INS))
    jobs = experiment.jobs("peers", tmp_path, reps=2)
    points = PEERS.points(tmp_path, 2, 0)
    for job in jobs:
        cfg = job.config(tmp_path)
        point = points[[p["seed"] for p in points].index(cfg.seed)]
        lr = 1.0 if cfg.algorithm in run_all.LR_ONE else point["optimiser.lr"]
        assert (cfg.optimiser.lr, cfg.optimiser.weight_decay) == (lr, point["optimiser.weight_decay"]), job.group
        assert ("optimiser.momentum" in values(job)) == (STAND_INS.get(cfg.algorithm, "sgd") == "sgd"), job.group
    assert {"Prodigy", "DAdaptation_SGD"} <= set(run_all.LR_ONE) and "ScheduleFree_AdamW" not in run_all.LR_ONE


@pytest.mark.skipif(bool(MISSING), reason=f"the peers' configs are not in this checkout yet: {MISSING}")
def test_every_peer_run_takes_the_draw_where_its_rule_has_the_setting(tmp_path):
    """The real configs: each run loads, Prodigy and D-Adaptation start from lr 1.0, and every other
    setting of the draw that the algorithm's rule has is the draw's."""
    points = PEERS.points(tmp_path, 2, 0)
    for job in PEERS.jobs("peers", tmp_path, reps=2):
        cfg = job.config(tmp_path)
        point = points[[p["seed"] for p in points].index(cfg.seed)]
        for name in RULES[cfg.optimiser.name].hyperparameters:
            drawn = 1.0 if (name, cfg.algorithm in run_all.LR_ONE) == ("lr", True) else point.get(f"optimiser.{name}")
            if drawn is not None:
                assert getattr(cfg.optimiser, name) == drawn, (job.group, name)
