"""Bayesian optimisation baseline: a Gaussian process over (log10 lr, log10 weight decay, momentum).

    python bayesopt.py -d uci_energy -l runs/bayesopt [--repetitions 32] [--workers 2] [--set key=value]

Each repetition is one sequence of full training runs (configs/<dataset>.yaml with
configs/Random_Validation.yaml): 5 points drawn uniformly from the paper's ranges (log10 lr in
[-6, -1], log10 weight decay in [-7, -2], momentum in (0, 1)), then 25 proposed by
bayesian-optimization's GP (Matern 2.5 kernel, upper-confidence-bound acquisition), which
maximises minus the final whole-validation-set loss (in target units where the data has them). A
diverged run's loss is replaced by a per-dataset cap. Every evaluation is a normal run directory,
`<root>/<dataset>/repetition_<r>/<k>`; running the same command again re-reads the finished ones
and continues, proposing exactly what an uninterrupted sequence would have.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import math
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np

from onepass import config, parallel_exec, run_files, util
from onepass.config import ConfigError

BOUNDS = {"log10_lr": parallel_exec.LOG10_LR, "log10_weight_decay": parallel_exec.LOG10_WEIGHT_DECAY,
          "momentum": (1e-6, 1 - 1e-6)}      # momentum kept inside (0, 1): it is tuned as a logit
# What a diverged run counts as (the original's caps, in the objective's units).
CAPS = {"uci_energy": 150.0, "uci_kin8nm": 0.1, "uci_power": 400.0, "fashion_mnist": 3.0}


def objective(metrics: dict) -> float:
    """The final whole-validation loss, in target units where the run logs them."""
    final = metrics["final"]
    value = final.get("Unnormalised_Loss/Validation", final.get("Loss/Validation"))
    return math.nan if value is None else value


def overrides_of(point: dict, seed: int) -> dict:
    return {"optimiser.lr": 10 ** point["log10_lr"], "optimiser.weight_decay": 10 ** point["log10_weight_decay"],
            "optimiser.momentum": point["momentum"], "seed": seed}


def propose(history: list[tuple[dict, float]], k: int, seed: int, initial: int) -> dict:
    """The k-th point: uniform for the first `initial`, then the GP's suggestion given `history`.
    A fresh optimiser seeded by (seed, k) makes each proposal a function of the history alone."""
    if k < initial:
        rng = np.random.default_rng([seed, k])
        return {name: float(rng.uniform(low, high)) for name, (low, high) in BOUNDS.items()}
    from bayes_opt import BayesianOptimization
    optimiser = BayesianOptimization(f=None, pbounds=BOUNDS, random_state=seed * 1000 + k, verbose=0,
                                     allow_duplicate_points=True)
    for point, loss in history:
        optimiser.register(params=point, target=-loss)
    return {name: float(value) for name, value in optimiser.suggest().items()}


def optimise(dataset: str, folder: Path, seed: int, cap: float, initial: int = 5, guided: int = 25,
             extra: tuple[str, ...] = ()) -> list[tuple[dict, float]]:
    """One Bayesian-optimisation sequence in `folder`; returns [(point, capped loss)] in order."""
    from onepass import train
    files = (str(parallel_exec.CONFIGS / f"{dataset}.yaml"), str(parallel_exec.CONFIGS / "Random_Validation.yaml"))
    history: list[tuple[dict, float]] = []
    for k in range(initial + guided):
        run_dir = folder / f"{k:02d}"
        point = propose(history, k, seed, initial)
        job = parallel_exec.Job(files, tuple(f"{key}={value!r}" for key, value in overrides_of(point, seed).items())
                                + extra, "")
        if parallel_exec.status_of(run_dir) in parallel_exec.FINISHED:
            metrics = util.read_metrics(run_dir)
        else:
            if not parallel_exec.start_afresh(run_dir):
                raise run_files.RunDirInUse(f"run directory {run_dir} is in use by another process: is another "
                                       f"bayesopt.py running on {folder}? Wait for it to end, or stop it")
            _, metrics = train.train(job.config(folder), run_dir=run_dir)
        loss = objective(metrics)
        history.append((point, loss if math.isfinite(loss) else cap))
    util.write_json(folder / "history.json", [{"point": point, "loss": loss} for point, loss in history])
    return history


def _sequence(args: tuple) -> float:
    dataset, folder, seed, cap, initial, guided, extra = args
    return min(loss for _, loss in optimise(dataset, folder, seed, cap, initial, guided, extra))


def run_repetitions(dataset: str, root: Path, repetitions: int, workers: int, cap: float | None = None,
                    initial: int = 5, guided: int = 25, extra: tuple[str, ...] = ()) -> list[float]:
    """`repetitions` independent sequences (seeds 0, 1, ...) on a pool; returns each one's best loss."""
    if cap is None:
        if dataset not in CAPS:
            raise ConfigError(f"no cap for diverged runs on {dataset}: give one with --cap")
        cap = CAPS[dataset]
    tasks = [(dataset, Path(root) / dataset / f"repetition_{r}", r, cap, initial, guided, extra)
             for r in range(repetitions)]
    if workers <= 1:
        return [_sequence(task) for task in tasks]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=util.share_cores, initargs=(workers,)) as pool:
        return list(pool.map(_sequence, tasks))


def main(argv: list[str] | None = None) -> int:
    parser = util.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True, help="dataset config name, e.g. uci_energy")
    parser.add_argument("-l", "--log_root", type=Path, required=True, metavar="DIR", help="results folder")
    parser.add_argument("--repetitions", type=config.positive_int, default=1, help="independent sequences (default 1)")
    parser.add_argument("--initial", type=config.positive_int, default=5,
                        help="uniformly drawn points first (default 5)")
    parser.add_argument("--guided", type=int, default=25, help="GP-proposed points after them (default 25)")
    parser.add_argument("--cap", type=float, help="loss that a diverged run counts as (default: per dataset)")
    parser.add_argument("--workers", type=config.positive_int, default=os.cpu_count() or 1, help="parallel sequences")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="train.py override for every run; repeatable")
    args = parser.parse_args(argv)
    try:
        if not (parallel_exec.CONFIGS / f"{args.dataset}.yaml").is_file():
            raise ConfigError(f"no config configs/{args.dataset}.yaml")
        if args.guided < 0:
            raise ConfigError(f"--guided {args.guided}: must be 0 or more (GP-proposed points after the uniform ones)")
        if args.cap is not None and not 0 < args.cap < math.inf:      # a NaN cap fails this too
            raise ConfigError(f"--cap {args.cap:g}: must be a positive finite loss, worse than any a run reaches")
        best = run_repetitions(args.dataset, args.log_root, args.repetitions, args.workers, args.cap,
                               args.initial, args.guided, tuple(args.overrides))
    except ConfigError as error:
        print(f"bayesopt.py: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: best validation loss per repetition: {', '.join(f'{b:.6g}' for b in best)}")
    return 0


if __name__ == "__main__":
    sys.exit(util.run_command(main))
