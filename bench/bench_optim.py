"""Window time of the drop-in optimisers (optim.py) against train.py's Learner, same model and data.

    .venv/bin/python bench/bench_optim.py [--repeats N] [--windows W] [--workload uci_energy|fashion_mnist_sized]

For each algorithm, the Learner trains W windows (`Learner.train_windows`, no log, no held-out
measurements: log_every is set past the run) and the optimiser takes the same W * T steps in a
plain loop, `optimiser.step(closure)` on batches drawn from the same kind of stream (and its
validation closure on the hypergradient's stream). Both start from identically built setups; the
two alternate within every repeat after a warm-up of each. Reported: the median seconds per window
of each and the ratio optimiser / Learner (target: within 1.1x). The workloads are bench_algorithms.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, Python puts bench/ (not the repo root) on sys.path

from bench.bench_algorithms import WORKLOADS
from onepass import optim, train

ALGORITHMS = ["Ours_LR_Momentum", "Ours_Adam_LR_WD_Betas", "Baydin"]
TARGET = 1.1


def setup_for(workload: str, algorithm: str, windows: int) -> train.Setup:
    """The workload's setup for `algorithm`, cut to `windows` windows, with no measurements."""
    setup = WORKLOADS[workload](algorithm, "unused")
    setup.cfg = dataclasses.replace(setup.cfg, hyperparameter_steps=windows, log_every=10**9)
    return setup


def learner_seconds(setup: train.Setup, windows: int) -> float:
    learner = train.Learner(setup)
    start = time.perf_counter()
    learner.train_windows(until=windows, show_progress=False)
    return (time.perf_counter() - start) / windows


def optimiser_seconds(setup: train.Setup, windows: int) -> float:
    learner = train.Learner(setup)        # (only its model, streams and loss: not timed)
    model, loss_fn, streams = learner.model, setup.loss_fn, learner.streams

    def loss(batch) -> torch.Tensor:
        return loss_fn(model(batch.inputs), batch.targets)
    optimiser = optim.from_config(setup.cfg, model, lambda: loss(next(streams.hyper)))
    start = time.perf_counter()
    for _ in range(windows * optimiser.window):
        batch = next(streams.train)
        optimiser.step(lambda batch=batch: loss(batch))
    return (time.perf_counter() - start) / windows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (default 7)")
    parser.add_argument("--windows", type=int, default=40, help="windows of T steps per run (default 40)")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="uci_energy")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)         # train.py's default for models this small, on either workload
    print(f"torch {torch.__version__}, 1 thread; workload {args.workload}, {args.windows} windows per run, "
          f"median of {args.repeats}")
    print(f"\n{'algorithm':<24}{'Learner ms/window':>19}{'optimiser ms/window':>21}{'ratio':>8}")
    for algorithm in ALGORITHMS:
        # Baydin's windows are single steps: time as many weight steps as the others take.
        windows = args.windows * 10 if algorithm == "Baydin" else args.windows
        timed = {learner_seconds: [], optimiser_seconds: []}
        for repeat in range(args.repeats + 1):            # the first is a warm-up
            for measure in timed:
                seconds = measure(setup_for(args.workload, algorithm, windows), windows)
                if repeat:
                    timed[measure].append(seconds)
        learner, mine = (statistics.median(timed[m]) for m in (learner_seconds, optimiser_seconds))
        verdict = "met" if mine / learner <= TARGET else "MISSED"
        print(f"{algorithm:<24}{learner * 1e3:>19.3f}{mine * 1e3:>21.3f}{mine / learner:>7.2f}x  "
              f"<= {TARGET}x {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
