"""Data-parallel overhead on this machine: --nproc 2 against --nproc 1, and the traffic per step.

    .venv/bin/python bench/bench_distributed.py [--repeats N]

Random and Ours_LR_Momentum on a Fashion-MNIST-sized MLP (784-50-10, global batch 50, synthetic
data of that shape), 100 windows of T = 10 steps, run by 1 and by 2 gloo processes started like
`train.py --nproc`. Reports wall seconds per weight step (median over repeats) and the all-reduces
and bytes per window, counted by wrapping `distributed.all_reduce_`, through which every all-reduce
goes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, Python puts bench/ (not the repo root) on sys.path

from bench_algorithms import fashion_mnist_sized_setup

from onepass import distributed, train

WINDOWS = 100


@contextlib.contextmanager
def counted_traffic() -> Iterator[dict[str, int]]:
    """Count this process's all-reduces and their bytes while the block runs, by wrapping
    `distributed.all_reduce_` (callers look it up at each call, so they all reach the wrapper)."""
    traffic = {"all_reduces": 0, "bytes": 0}
    all_reduce_ = distributed.all_reduce_

    def counting(tensors: list[torch.Tensor], context: distributed.Context) -> list[torch.Tensor]:
        if context.active and tensors:      # what all_reduce_ sends: one flat message
            traffic["all_reduces"] += 1
            traffic["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return all_reduce_(tensors, context)

    distributed.all_reduce_ = counting
    try:
        yield traffic
    finally:
        distributed.all_reduce_ = all_reduce_


def _rank(rank: int, world_size: int, port: int, algorithm: str, results: dict) -> None:
    # one process has no group to join (and no launcher's store to meet at)
    context = distributed.join_local_group(rank, world_size, port) if world_size > 1 else distributed.SINGLE
    try:
        with tempfile.TemporaryDirectory() as log_root:
            setup = fashion_mnist_sized_setup(algorithm, log_root)
            setup.cfg = train.config.build_config(train.config.to_dict(setup.cfg) | {"hyperparameter_steps": WINDOWS})
            learner = train.Learner(setup, context=context)
            with counted_traffic() as traffic:
                start = time.perf_counter()
                learner.run()
            if context.is_rank0:
                results[algorithm] = (time.perf_counter() - start, traffic, learner.steps_done)
        distributed.shutdown(finished=True)
        if context.active:
            distributed.exit_process(0)
    finally:
        distributed.shutdown()


def measure(algorithm: str, world_size: int) -> tuple[float, dict, int]:
    if world_size == 1:
        results: dict = {}
        _rank(0, 1, 0, algorithm, results)
        return results[algorithm]
    with torch.multiprocessing.Manager() as manager, distributed.local_rendezvous() as store:
        results = manager.dict()
        torch.multiprocessing.spawn(_rank, args=(world_size, store.port, algorithm, results), nprocs=world_size)
        return results[algorithm]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}; {os.cpu_count()} cores; {WINDOWS} windows of 10 steps, "
          f"median of {args.repeats}\n")
    print(f"{'algorithm':<18}{'nproc':>6}{'ms/step':>9}{'vs 1':>7}{'all-reduces/window':>20}{'kB/window':>11}")
    for algorithm in ("Random", "Ours_LR_Momentum"):
        single = None
        for world_size in (1, 2):
            runs = [measure(algorithm, world_size) for _ in range(args.repeats)]
            seconds = statistics.median(run[0] for run in runs)
            traffic, steps = runs[0][1], runs[0][2]
            per_step = seconds / steps * 1e3
            single = single or per_step
            print(f"{algorithm:<18}{world_size:>6}{per_step:>9.3f}{per_step / single:>6.2f}x"
                  f"{traffic['all_reduces'] / WINDOWS:>20.1f}{traffic['bytes'] / WINDOWS / 1e3:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
