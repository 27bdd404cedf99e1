"""The paper's experiments, as data: list them, run one, summarise a results folder.

    python run_all.py --list                          # every experiment, its runs and estimated time here
    python run_all.py uci_energy --reps 5             # a quick look: 5 initialisations instead of 200
    python run_all.py fashion_mnist --workers 2 --set hyperparameter_steps=100
    python run_all.py --parse runs/paper              # what a results folder holds

Results go to `<results>/<experiment>/<dataset>/<algorithm>[/<setting>]/<config hash>`; the exit
code is 1 when any run failed (its error is in its directory), 2 for a bad command. Running an
experiment again continues it: finished runs are skipped, unfinished ones re-run (see
parallel_exec.py). A file named STOP in the results folder, or Ctrl-C, stops it after the runs in
progress. `--reps K` takes the first K of the experiment's initialisations (the same ones whatever
K is), so a quick look is a subset of the full experiment.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import config
import parallel_exec
from config import ConfigError

MAIN = ("Random", "Random_SteppedLR", "Random_Validation", "Lorraine", "Baydin", "Ours_LR", "Ours_LR_Momentum",
        "Ours_HDLR_Momentum", "DiffThroughOpt")
UCI = ("uci_boston", "uci_concrete", "uci_energy", "uci_kin8nm", "uci_naval", "uci_power", "uci_wine", "uci_yacht")
SENSITIVITY = tuple((f"Update{steps}_Rollback{terms}",
                     {"network_weight_steps": steps, "hyperparameter_steps": 4000 // steps,
                      "tuning.rollback_distance": terms, "tuning.unroll_steps": terms})
                    for steps in range(1, 11) for terms in range(1, steps + 1))


@dataclass(frozen=True)
class Experiment:
    """One of the paper's experiments: every initialisation, for every dataset and algorithm, under
    every setting (named groups of overrides; none by default)."""
    description: str
    datasets: tuple[str, ...]
    algorithms: tuple[str, ...]
    repetitions: int
    generator: str = "natural_sgd"          # natural_sgd | iterations | replay (of `replays`)
    replays: str | None = None              # the experiment whose initialisations are replayed
    settings: tuple[tuple[str, dict], ...] = (("", {}),)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)   # algorithm (or "*") -> key=value
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # natural_sgd's log10 ranges, if others
    capped: dict[str, int] = field(default_factory=dict)   # algorithm -> at most this many initialisations
    runner: str = "batch"                   # batch, bayesopt, or a separate entry point (named)

    def points(self, results: Path, reps: int | None, seed: int) -> list[dict]:
        count = min(reps or self.repetitions, self.repetitions)
        if self.generator == "replay":
            return parallel_exec.replay(results / self.replays)[:count]
        if self.generator == "iterations":
            return parallel_exec.iterations(self.repetitions, seed)[:count]
        return parallel_exec.natural_sgd(self.repetitions, seed, **self.ranges)[:count]

    def jobs(self, name: str, results: Path, reps: int | None = None, seed: int = 0,
             extra: tuple[str, ...] = ()) -> list[parallel_exec.Job]:
        points = self.points(results, reps, seed)
        jobs = []
        for algorithm in self.algorithms:
            overrides = self.overrides.get("*", ()) + self.overrides.get(algorithm, ()) + extra
            mine = points[:self.capped.get(algorithm, len(points))]
            jobs += parallel_exec.make_jobs(self.datasets, [algorithm],
                                            [(setting, point | values) for setting, values in self.settings
                                             for point in mine], overrides, prefix=name)
        return jobs


EXPERIMENTS: dict[str, Experiment] = {
    "uci": Experiment("main UCI experiment: 8 regression sets, 9 algorithms, 200 initialisations", UCI, MAIN, 200),
    **{name: Experiment(f"main UCI experiment on {name.removeprefix('uci_')} alone", (name,), MAIN, 200)
       for name in UCI},
    "fashion_mnist": Experiment("main Fashion-MNIST experiment", ("fashion_mnist",), MAIN, 100),
    "fashion_mnist_BatchNorm": Experiment("BatchNorm study: Fashion-MNIST's initialisations, BatchNorm MLP",
                                          ("fashion_mnist_BatchNorm",), MAIN, 100, "replay", "fashion_mnist"),
    "cifar10": Experiment("CIFAR-10 ResNet-18 (numbered repetitions of the config's hyperparameters)",
                          ("cifar10",), MAIN, 50, "iterations"),
    "penn_treebank": Experiment("Penn Treebank LSTM (numbered repetitions of the config's hyperparameters)",
                                ("penn_treebank",), MAIN, 50, "iterations"),
    "sensitivity": Experiment("sensitivity to T and i (i <= T <= 10) on UCI Energy; Diff-through-Opt with R = i",
                              ("uci_energy",), ("Ours_LR_Momentum", "DiffThroughOpt"), 100,
                              settings=SENSITIVITY),
    "hypergradient_comparison": Experiment(
        "first hypergradients of Ours and Diff-through-Opt from the same points, per (T, i)", ("uci_energy",),
        ("Ours_LR_Momentum", "DiffThroughOpt"), 50, settings=SENSITIVITY,
        overrides={"*": ("hyperparameter_steps=2", "optimiser.lr_bounds=[1e-30, 1e30]")}),
    "proof_of_concept": Experiment(
        "Random over wide (lr, weight decay) ranges, and Ours_LR from the first 50 of the same points, on UCI Energy",
        ("uci_energy",), ("Random", "Ours_LR"), 500, ranges={"log10_lr": (-6, 1), "log10_weight_decay": (-7, 2)},
        capped={"Ours_LR": 50}),
    "long_dto_standalone": Experiment(
        "Long Diff-through-Opt (whole 200-step runs) against 200-step runs of the others",
        ("uci_energy", "uci_kin8nm", "uci_power"),
        ("Random", "Ours_LR_Momentum", "DiffThroughOpt", "LongDiffThroughOpt_UCI_Standalone"), 60,
        overrides={name: ("hyperparameter_steps=20",) for name in ("Random", "Ours_LR_Momentum", "DiffThroughOpt")}),
    "long_dto_standalone_fashion_mnist": Experiment(
        "Long Diff-through-Opt (whole 1000-step runs) on Fashion-MNIST", ("fashion_mnist",),
        ("Random", "Ours_LR_Momentum", "DiffThroughOpt", "LongDiffThroughOpt_FashionMNIST_Standalone"), 60,
        overrides={name: ("hyperparameter_steps=100",) for name in ("Random", "Ours_LR_Momentum", "DiffThroughOpt")}),
    "long_dto_medium": Experiment("Long Diff-through-Opt Medium from Fashion-MNIST's initialisations",
                                  ("fashion_mnist",), ("LongDiffThroughOpt_FashionMNIST_Medium",), 100, "replay",
                                  "fashion_mnist"),
    "long_dto_full": Experiment("Long Diff-through-Opt through the whole 4000-step run", ("uci_energy",),
                                ("LongDiffThroughOpt_UCI_Full",), 36),
    "validation_proportion": Experiment(
        "validation proportions 0.25, 0.375, 0.5 on UCI Energy", ("uci_energy",),
        ("Ours_LR_Momentum", "Ours_HDLR_Momentum"), 200,
        settings=tuple((f"Proportion{p}", {"dataset.validation_proportion": p}) for p in (0.25, 0.375, 0.5))),
    "bayesopt": Experiment("Bayesian optimisation (5 random + 25 guided full runs per repetition)",
                           ("uci_energy", "uci_kin8nm", "uci_power", "fashion_mnist"), ("Random_Validation",), 32,
                           runner="bayesopt"),
    "asha": Experiment("ASHA on Ray Tune (a running Ray cluster): trials stopped early on validation loss",
                       ("uci_energy",), ("Random_TrainingSetOnly", "Ours_LR_Momentum"), 114_286, runner="asha"),
    "pbt": Experiment("population-based training on Ray Tune (a running Ray cluster), perturbing every 100 steps",
                      ("uci_energy",), ("Random_TrainingSetOnly", "Ours_LR_Momentum"), 200, runner="pbt"),
    "meta_scaling": Experiment("meta-learning scaling study", ("meta_dataset",), ("meta",), 1,
                               runner="meta_scaling.py"),
}
BAYESOPT_EVALUATIONS = 30           # full runs per Bayesian-optimisation repetition


# -------------------------------------------------------------------------------------------------
# Time estimates from a quick calibration: a few windows of each kind of run on this machine.

CALIBRATION_WINDOWS = 3


def calibrate(cfg: config.Config) -> tuple[float, float]:
    """(set-up seconds, seconds per weight step) of runs like `cfg`, from a few of its windows."""
    import train
    windows = min(CALIBRATION_WINDOWS, cfg.hyperparameter_steps)
    start = time.perf_counter()
    learner = train.Learner(train.prepare(replace(cfg, hyperparameter_steps=windows)))
    prepared = time.perf_counter() - start
    return prepared, learner.train_windows() / (windows * cfg.network_weight_steps)


def seconds_per_run(job: parallel_exec.Job, root: Path, cache: dict) -> float | None:
    """Estimated seconds of a job: set-up plus its weight steps at the calibrated pace of the same
    dataset, algorithm and T (None when the dataset is not processed yet)."""
    cfg = job.config(root)
    key = f"{cfg.dataset.name}/{cfg.algorithm}/{cfg.network_weight_steps}"
    if key not in cache:
        try:
            if cfg.algorithm not in cache:      # its first run in a process pays one-off costs
                cache[cfg.algorithm] = calibrate(cfg)
            cache[key] = calibrate(cfg)
        except ConfigError:
            cache[key] = None
    if cache[key] is None:
        return None
    prepared, per_step = cache[key]
    return prepared + per_step * cfg.total_weight_steps


def list_experiments(results: Path, workers: int) -> None:
    cache: dict = {}
    print(f"{'experiment':<34}{'runs':>8}{'estimated':>12}   description (estimates for {workers} workers)")
    for name, experiment in EXPERIMENTS.items():
        if experiment.runner not in ("batch", "bayesopt"):
            print(f"{name:<34}{'':>8}{'':>12}   {experiment.description} [runs with {experiment.runner}]")
            continue
        try:
            jobs = experiment.jobs(name, results)
            if experiment.runner == "bayesopt":     # each job stands for a sequence of full runs
                jobs *= BAYESOPT_EVALUATIONS
        except ConfigError:           # a replay whose source experiment has not run yet
            print(f"{name:<34}{'':>8}{'':>12}   {experiment.description} [after {experiment.replays}]")
            continue
        # One run per (dataset, algorithm, setting) calibrates the pace; the rest are like it.
        estimates = [seconds_per_run(job, results, cache) for job in _representatives(jobs)]
        per_group = len(jobs) // max(len(estimates), 1)
        if any(e is None for e in estimates):
            when = "needs data"
        else:
            when = _duration(sum(estimates) * per_group / workers)
        print(f"{name:<34}{len(jobs):>8}{when:>12}   {experiment.description}", flush=True)


def _representatives(jobs: list[parallel_exec.Job]) -> list[parallel_exec.Job]:
    """The first job of each group (dataset, algorithm, setting)."""
    first = {}
    for job in jobs:
        first.setdefault(job.group, job)
    return list(first.values())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -------------------------------------------------------------------------------------------------

def parse_results(results: Path) -> dict[str, Counter]:
    """{group: Counter of run statuses} for every run below `results` (unfinished runs included)."""
    groups: dict[str, Counter] = {}
    for config_file in sorted(Path(results).rglob("config.json")):
        run_dir = config_file.parent
        group = str(run_dir.parent.relative_to(results))
        groups.setdefault(group, Counter())[parallel_exec.status_of(run_dir) or "unfinished"] += 1
    return groups


def print_results(results: Path) -> None:
    groups = parse_results(results)
    if not groups:
        print(f"no runs below {results}")
        return
    statuses = ("completed", "diverged", "failed", "unfinished")
    print(f"{'group':<60}" + "".join(f"{status:>12}" for status in statuses))
    for group, counts in groups.items():
        print(f"{group:<60}" + "".join(f"{counts[status]:>12}" for status in statuses))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", choices=list(EXPERIMENTS), metavar="EXPERIMENT",
                        help="the experiment to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the experiments with run counts and estimates")
    parser.add_argument("--parse", type=Path, metavar="DIR", help="summarise the runs in a results folder")
    parser.add_argument("-l", "--results", type=Path, default=Path("runs/paper"), metavar="DIR",
                        help="results folder (default runs/paper)")
    parser.add_argument("--reps", type=config.positive_int, metavar="K", help="only the first K initialisations")
    parser.add_argument("--workers", type=config.positive_int, default=os.cpu_count() or 1,
                        help="processes (default: cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisations (default 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train.py override for every run (e.g. hyperparameter_steps=50)")
    args = parser.parse_args(argv)
    if args.list:
        list_experiments(args.results, args.workers)
        return 0
    if args.parse:
        print_results(args.parse)
        return 0
    if args.experiment is None:
        parser.error("name an experiment, or use --list or --parse")
    experiment = EXPERIMENTS[args.experiment]
    try:
        if experiment.runner == "bayesopt":
            run_bayesopt(args.experiment, experiment, args)
        elif experiment.runner in ("asha", "pbt"):
            run_tune(args.experiment, experiment, args)
        elif experiment.runner == "batch":
            jobs = experiment.jobs(args.experiment, args.results, args.reps, args.seed, tuple(args.overrides))
            counts = parallel_exec.run_batch(jobs, args.results, args.workers, show_progress=sys.stderr.isatty())
            print(f"{args.experiment}: {parallel_exec.summary(counts, args.results / args.experiment)}")
            if counts["failed"]:
                return 1          # the batch went on; the exit code still says that runs failed
        else:
            raise ConfigError(f"{args.experiment} runs with {experiment.runner}, not from run_all.py")
    except ConfigError as error:
        print(f"run_all.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def run_tune(name: str, experiment: Experiment, args: argparse.Namespace) -> None:
    samples = min(args.reps or experiment.repetitions, experiment.repetitions)
    for dataset in experiment.datasets:
        for algorithm in experiment.algorithms:
            results = parallel_exec.tune_search(experiment.runner, dataset, algorithm, samples, args.results / name,
                                                extra=tuple(args.overrides), seed=args.seed)
            best = results.get_best_result()
            print(f"{name} {dataset} {algorithm}: {len(results)} trials; best validation loss "
                  f"{best.metrics['validation_loss']:.4g} (test {best.metrics['test_loss']:.4g})")


def run_bayesopt(name: str, experiment: Experiment, args: argparse.Namespace) -> None:
    import bayesopt
    repetitions = min(args.reps or experiment.repetitions, experiment.repetitions)
    for dataset in experiment.datasets:
        best = bayesopt.run_repetitions(dataset, args.results / name, repetitions, args.workers,
                                        extra=tuple(args.overrides))
        print(f"{name} {dataset}: best validation loss of each repetition: {', '.join(f'{b:.4g}' for b in best)}")


if __name__ == "__main__":
    sys.exit(main())
