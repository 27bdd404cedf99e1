"""The paper's experiments, as data: list them, run one, summarise a results folder.

    python run_all.py --list                          # every experiment, its runs and estimated time
    python run_all.py --calibrate                     # measure this machine's pace for --list
    python run_all.py uci_energy --reps 5             # a quick look: 5 initialisations instead of 200
    python run_all.py fashion_mnist --workers 2 --set hyperparameter_steps=100
    python run_all.py peers --datasets mydata:load --reps 5 --set model.layer_sizes=[5,50,1]   # data of your own
    python run_all.py --parse runs/paper              # what a results folder holds
    python run_all.py --parse runs/paper --head-to-head   # and which algorithm wins from the same draws

Results go to `<results>/<experiment>/<dataset>/<algorithm>[/<setting>]/<config hash>`; the exit
code is 1 when any run failed (its error is in its directory), 2 for a bad command. Running an
experiment again continues it: finished runs are skipped, unfinished ones re-run (see
parallel_exec.py). A file named STOP in the results folder, or Ctrl-C, stops it after the runs in
progress. `--reps K` takes the first K of the experiment's initialisations (the same ones whatever
K is), so a quick look is a subset of the full experiment.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from onepass import config, head_to_head, parallel_exec, progress, ray_tune, results_table, util
from onepass.config import ConfigError

MAIN = ("Random", "Random_SteppedLR", "Random_Validation", "Lorraine", "Baydin", "Ours_LR", "Ours_LR_Momentum",
        "Ours_HDLR_Momentum", "DiffThroughOpt")
# The peers study: what researchers would pick instead of tuning in one pass. The learning-rate-free
# optimisers (Prodigy, D-Adaptation, Schedule-Free; `make peers`) and our one-pass tuning on Adam, against
# Random and Ours (WD+LR+M); Prodigy and D-Adaptation start from lr 1.0, as their authors recommend.
LEARNING_RATE_FREE = ("Prodigy", "DAdaptation_SGD", "DAdaptation_Adam", "ScheduleFree_SGD", "ScheduleFree_AdamW")
OURS_ON_ADAM = ("Ours_Adam_LR_WD", "Ours_Adam_LR_WD_Betas", "Ours_Adam_LR_WD_Betas_AllRows", "Ours_HDLR_Adam")
PEERS = ("Random", "Ours_LR_Momentum", *LEARNING_RATE_FREE, *OURS_ON_ADAM)
LR_ONE = ("Prodigy", "DAdaptation_SGD", "DAdaptation_Adam")
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
    dataset_capped: dict[str, int] = field(default_factory=dict)   # dataset -> at most this many
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
            for dataset in self.datasets:
                count = min(self.capped.get(algorithm, len(points)), self.dataset_capped.get(dataset, len(points)))
                mine = points[:count]
                jobs += parallel_exec.make_jobs([dataset], [algorithm],
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
    "peers": Experiment(
        "learning-rate-free optimisers (Prodigy, D-Adaptation, Schedule-Free) and Ours on Adam against Random and "
        "Ours (WD+LR+M): the main experiments' first 20 initialisations (Fashion-MNIST: 5)",
        ("uci_energy", "uci_kin8nm", "uci_power", "fashion_mnist"), PEERS, 20,
        overrides={name: ("optimiser.lr=1.0",) for name in LR_ONE}, dataset_capped={"fashion_mnist": 5}),
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
# Time estimates: a stored table of each kind of run's pace here, refreshed by --calibrate.

RUNS = ("batch", "bayesopt")               # runners whose runs --list estimates
CALIBRATION = "calibration.json"          # in the results folder, written by --calibrate
SHIPPED_CALIBRATION = Path(__file__).resolve().parent / "resources" / CALIBRATION
CALIBRATION_STEPS = 200                   # longer windows are calibrated on this many steps, then scaled
CALIBRATION_SECONDS = 0.5                 # timed per kind of run, after a warm-up window


def calibration_key(cfg: config.Config) -> str:
    """What sets a run's pace per weight step: dataset, algorithm, T, and the i or R it uses."""
    from onepass import algorithms
    tuning = cfg.tuning
    optimises = algorithms.METHODS[tuning.method].optimises
    detail = "" if not optimises else f"/i={tuning.rollback_distance}/R={tuning.unroll_steps}"
    return f"{cfg.dataset.name}/{cfg.algorithm}/T={cfg.network_weight_steps}{detail}"


def calibrate(cfg: config.Config) -> dict:
    """Set-up seconds and seconds per weight step of runs like `cfg`: one window to warm up (it
    carries one-off costs), then windows until CALIBRATION_SECONDS have been timed. A window
    longer than CALIBRATION_STEPS is measured at that length (with as many unrolled steps) and
    scaled: unrolled memory grows with the length, so such estimates are lower bounds."""
    from onepass import train
    steps = min(cfg.network_weight_steps, CALIBRATION_STEPS)
    unroll = None if cfg.tuning.unroll_steps is None else min(cfg.tuning.unroll_steps, steps)
    short = replace(cfg, network_weight_steps=steps, hyperparameter_steps=1,
                    tuning=replace(cfg.tuning, unroll_steps=unroll))
    start = time.perf_counter()
    learner = train.Learner(train.prepare(short))
    setup = time.perf_counter() - start
    learner.train_windows(show_progress=False)
    timed, windows = 0.0, 0
    while timed < CALIBRATION_SECONDS:
        timed += learner.train_windows(until=learner.record.windows_done + 1, show_progress=False)
        windows += 1
    return {"setup_seconds": round(setup, 4), "seconds_per_step": timed / (windows * steps), "windows": windows}


def machine() -> dict:
    """What the estimates assume: this machine, its load, the software."""
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": util.available_cores(), "load": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}


def calibrate_experiments(results: Path, workers: int, names: list[str], extra: tuple[str, ...] = ()) -> Path:
    """Measure every kind of run the named experiments contain whose data is here (as one of
    `workers` processes, so at the workers' thread count); store the table in the results folder,
    added to what an earlier calibration there measured."""
    util.share_cores(workers)
    kinds: dict[str, config.Config] = {}
    for name in names:
        experiment = EXPERIMENTS[name]
        if experiment.runner not in RUNS:
            continue
        try:
            jobs = experiment.jobs(name, results, extra=extra)     # (a bad --set is an error here)
        except ConfigError:
            if experiment.generator == "replay":                  # its source has not run yet
                continue
            raise
        for job in _representatives(jobs):
            cfg = job.config(results)     # (a bad --set is an error here, not a silently empty table)
            kinds.setdefault(calibration_key(cfg), cfg)
    path = results / CALIBRATION
    earlier = read_calibration(path)["kinds"] if path.is_file() else {}
    table = {"machine": machine() | {"workers": workers}, "kinds": earlier}
    for number, (key, cfg) in enumerate(sorted(kinds.items()), 1):
        try:
            table["kinds"][key] = calibrate(cfg)
            pace = f"{table['kinds'][key]['seconds_per_step'] * 1e3:.3g} ms/step"
        except ConfigError as error:           # e.g. the dataset is not processed here
            pace = f"skipped: {error}"
        print(f"[{number}/{len(kinds)}] {key}: {pace}", flush=True)
    results.mkdir(parents=True, exist_ok=True)
    util.write_json(path, table)
    return path


def load_calibration(results: Path) -> tuple[dict, Path | None]:
    """The results folder's calibration table, or the one shipped (measured where this was built);
    an empty one if neither exists."""
    for path in (results / CALIBRATION, SHIPPED_CALIBRATION):
        if path.is_file():
            return read_calibration(path), path
    return {"machine": None, "kinds": {}}, None


# What --list reads of a calibration table (calibrate_experiments writes it).
CALIBRATION_SHAPE = {"machine.date": str, "machine.cpu": str, "machine.cores": int, "machine.load": util.NUMBER,
                     "machine.workers": int, "kinds": dict, "kinds.*.setup_seconds": util.NUMBER,
                     "kinds.*.seconds_per_step": util.NUMBER}


def read_calibration(path: Path) -> dict:
    try:
        return util.read_json_object(path, CALIBRATION_SHAPE)
    except util.UnreadableFile as error:
        raise ConfigError(f"{error}; not a calibration table: delete it and run --calibrate again") from None


def estimate(jobs: list[parallel_exec.Job], results: Path, kinds: dict) -> tuple[float, int]:
    """(Seconds of the jobs on one worker, how many of them have no calibrated pace)."""
    total, missing = 0.0, 0
    groups: dict[str, list[parallel_exec.Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    for members in groups.values():
        cfg = members[0].config(results)
        pace = kinds.get(calibration_key(cfg))
        if pace is None:
            missing += len(members)
        else:
            total += len(members) * (pace["setup_seconds"] + pace["seconds_per_step"] * cfg.total_weight_steps)
    return total, missing


def list_experiments(results: Path, workers: int) -> None:
    table, source = load_calibration(results)
    measured = table["machine"]
    if measured is None:
        print("No calibration yet: `--calibrate` measures this machine, for the estimates.")
    else:
        print(f"Estimates for {workers} workers, from the calibration in {source} ({measured['date']}: "
              f"{measured['cpu']}, {measured['cores']} cores, load {measured['load']}, {measured['workers']} "
              f"workers); load here now {os.getloadavg()[0]:.2f}. `--calibrate` measures this machine.")
    print(f"{'experiment':<34}{'runs':>8}{'estimated':>14}   description")
    for name, experiment in EXPERIMENTS.items():
        if experiment.runner not in RUNS:
            print(f"{name:<34}{'':>8}{'':>14}   {experiment.description} [runs with {experiment.runner}]")
            continue
        try:
            jobs = experiment.jobs(name, results)
        except ConfigError as error:    # a replay whose source has not run yet, or a config not in this checkout
            why = f"after {experiment.replays}" if experiment.generator == "replay" else str(error)
            print(f"{name:<34}{'':>8}{'':>14}   {experiment.description} [{why}]")
            continue
        runs = len(jobs) * (BAYESOPT_EVALUATIONS if experiment.runner == "bayesopt" else 1)
        seconds, missing = estimate(jobs, results, table["kinds"])
        seconds *= runs / len(jobs)
        when = progress.duration(seconds / min(workers, runs)) if not missing else f"{missing} untimed"
        print(f"{name:<34}{runs:>8}{when:>14}   {experiment.description}", flush=True)


def weight_step_budgets(jobs: list[parallel_exec.Job], results: Path) -> dict[str, int]:
    """{dataset and setting: the weight-step budget of its runs}; a ConfigError when the algorithms
    of one dataset and setting would train for different budgets (an unequal comparison)."""
    budgets: dict[str, dict[str, int]] = {}
    for job in _representatives(jobs):
        _, dataset, algorithm, *setting = job.group.split("/")
        budgets.setdefault("/".join([dataset, *setting]), {})[algorithm] = job.config(results).weight_step_budget
    for where, of_algorithm in budgets.items():
        if len(set(of_algorithm.values())) > 1:
            steps = ", ".join(f"{algorithm} {steps}" for algorithm, steps in of_algorithm.items())
            raise ConfigError(f"{where}: the algorithms would train for different numbers of weight steps ({steps}); "
                              f"set hyperparameter_steps or network_weight_steps per algorithm, not with --set")
    return {where: next(iter(of_algorithm.values())) for where, of_algorithm in budgets.items()}


def _representatives(jobs: list[parallel_exec.Job]) -> list[parallel_exec.Job]:
    """The first job of each group (dataset, algorithm, setting)."""
    first = {}
    for job in jobs:
        first.setdefault(job.group, job)
    return list(first.values())


# -------------------------------------------------------------------------------------------------

def print_results(results: Path, duels: bool = False) -> None:
    """The results table of a results folder (results_table.py), or a line saying it holds no runs;
    with `duels`, then the head-to-head on shared draws (head_to_head.py, Markdown)."""
    if not results.is_dir():
        raise ConfigError(f"--parse {results}: no such folder; name a results folder (e.g. runs/paper)")
    print(results_table.render(results, "run_all.py") or f"no runs below {results}")
    if duels:
        print(f"\n{head_to_head.render(results, 'run_all.py') or 'no two algorithms ran from the same draws'}")


def main(argv: list[str] | None = None) -> int:
    parser = util.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", choices=list(EXPERIMENTS), metavar="EXPERIMENT",
                        help="the experiment to run (see --list)")
    parser.add_argument("--list", action="store_true",
                        help="list the experiments with run counts and time estimates (from the stored calibration)")
    parser.add_argument("--calibrate", action="store_true",
                        help="time a few windows of each kind of run of EXPERIMENT (default: all) here, at the "
                             "workers' thread count, and store the table in the results folder, for --list")
    parser.add_argument("--parse", type=Path, metavar="DIR", help="summarise the runs in a results folder")
    parser.add_argument("--head-to-head", action="store_true",
                        help="with --parse: then, per dataset, how often each algorithm ends below each other from "
                             "the same draws, with a sign test (Markdown)")
    parser.add_argument("-l", "--results", type=Path, default=Path("runs/paper"), metavar="DIR",
                        help="results folder (default runs/paper)")
    parser.add_argument("--reps", type=config.positive_int, metavar="K", help="only the first K initialisations")
    parser.add_argument("--workers", type=config.positive_int, default=os.cpu_count() or 1,
                        help="processes (default: cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisations (default 0)")
    parser.add_argument("--datasets", nargs="+", metavar="NAME",
                        help="run the experiment's algorithms and draws on these datasets instead of its own: "
                             "registered names or data of your own as module.path:factory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train.py override for every run (e.g. hyperparameter_steps=50)")
    args = parser.parse_args(argv)
    if not (args.calibrate or args.list or args.parse or args.experiment):
        parser.error("name an experiment, or use --list, --calibrate or --parse")
    if args.head_to_head and not args.parse:
        parser.error("--head-to-head summarises a results folder: use it with --parse DIR")
    try:
        return run(args)
    except (ConfigError, util.UnreadableFile) as error:     # a bad flag, or a damaged file it names
        print(f"run_all.py: error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """What the command line asks for; a ConfigError for anything a user must fix."""
    if args.calibrate or not (args.list or args.parse):       # it writes below the results folder
        util.check_output_folder(args.results, f"-l {args.results}", "choose another with -l DIR")
    if args.calibrate:
        names = [args.experiment] if args.experiment else list(EXPERIMENTS)
        path = calibrate_experiments(args.results, args.workers, names, tuple(args.overrides))
        print(f"calibration stored in {path}")
        return 0
    if args.list:
        list_experiments(args.results, args.workers)
        return 0
    if args.parse:
        print_results(args.parse, args.head_to_head)
        return 0
    experiment = EXPERIMENTS[args.experiment]
    if args.datasets:
        experiment = on_datasets(args.experiment, experiment, args.datasets)
    if experiment.runner == "bayesopt":
        run_bayesopt(args.experiment, experiment, args)
    elif experiment.runner in ("asha", "pbt"):
        run_tune(args.experiment, experiment, args)
    elif experiment.runner == "batch":
        jobs = experiment.jobs(args.experiment, args.results, args.reps, args.seed, tuple(args.overrides))
        budgets = weight_step_budgets(jobs, args.results)
        print(f"{args.experiment}: {len(jobs)} runs; weight steps of every algorithm: "
              + ", ".join(f"{steps} on {where}" for where, steps in budgets.items()), flush=True)
        counts = parallel_exec.run_batch(jobs, args.results, args.workers, name=args.experiment)
        print(f"\n{results_table.render(args.results / args.experiment, 'run_all.py')}\n\n"
              f"{args.experiment}: {parallel_exec.summary(counts, args.results / args.experiment)}")
        if counts["failed"]:
            return 1          # the batch went on; the exit code still says that runs failed
    else:
        raise ConfigError(f"{args.experiment} runs with {experiment.runner}, not from run_all.py")
    return 0


def on_datasets(name: str, experiment: Experiment, datasets: list[str]) -> Experiment:
    """`experiment` on other datasets (its algorithms, draws and settings): registered ones, or the
    user's own `module.path:factory` (parallel_exec.dataset_configs); a ConfigError where it cannot."""
    if experiment.runner != "batch":
        raise ConfigError(f"--datasets: {name} runs with {experiment.runner}, which takes the experiment's own "
                          f"datasets only (bayesopt.py -d and parallel_exec.py -d take any)")
    parallel_exec.check_names(datasets, [])
    return replace(experiment, datasets=tuple(datasets))


def run_tune(name: str, experiment: Experiment, args: argparse.Namespace) -> None:
    samples = min(args.reps or experiment.repetitions, experiment.repetitions)
    for dataset in experiment.datasets:
        for algorithm in experiment.algorithms:
            results = ray_tune.tune_search(experiment.runner, dataset, algorithm, samples, args.results / name,
                                           extra=tuple(args.overrides), seed=args.seed)
            best = results.get_best_result()
            print(f"{name} {dataset} {algorithm}: {len(results)} trials; best validation loss "
                  f"{best.metrics['validation_loss']:.4g} (test {best.metrics['test_loss']:.4g})")


def run_bayesopt(name: str, experiment: Experiment, args: argparse.Namespace) -> None:
    from onepass import bayesopt
    repetitions = min(args.reps or experiment.repetitions, experiment.repetitions)
    for dataset in experiment.datasets:
        best = bayesopt.run_repetitions(dataset, args.results / name, repetitions, args.workers,
                                        extra=tuple(args.overrides))
        print(f"{name} {dataset}: best validation loss of each repetition: {', '.join(f'{b:.4g}' for b in best)}")


if __name__ == "__main__":
    sys.exit(util.run_command(main))
