"""Intra-op threads against run time, on a quiet machine and on a busy one.

    .venv/bin/python bench/bench_threads.py [--repeats N] [--busy K]

Each measurement is a real `train.py` process (the quickstart's diabetes + Ours_LR_Momentum run,
and UCI Energy + Ours_LR, each 4000 weight steps) with `--set threads=N`, timed from start to exit.
"Busy" runs the same commands while K other processes (default: one per core) spin on the CPU, as
other users' jobs do on a shared workstation or cluster node. Thread settings alternate within
each round so that drift hits them alike; the report gives the median over the rounds and the
ratio to one thread.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = {"diabetes + Ours_LR_Momentum": ["configs/diabetes.yaml", "configs/Ours_LR_Momentum.yaml"]}
UCI_WORKLOAD = ("UCI Energy + Ours_LR", ["configs/uci_energy.yaml", "configs/Ours_LR.yaml"])


def spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy(processes: int) -> Iterator[None]:
    """`processes` CPU-bound processes for the duration of the block."""
    workers = [multiprocessing.Process(target=spin, daemon=True) for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()


def seconds(files: list[str], threads: int, log_root: str) -> float:
    command = [sys.executable, "train.py", "-c", *files, "--seed", "0", "-l", log_root, "--set", f"threads={threads}"]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per condition")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="spinning processes when busy")
    args = parser.parse_args()
    workloads = dict(WORKLOADS)
    if (REPO / "data" / "uci_energy.npz").is_file():
        workloads[UCI_WORKLOAD[0]] = UCI_WORKLOAD[1]
    else:
        print("(UCI Energy not processed: `make data` adds it)")
    thread_counts = sorted({1, os.cpu_count() or 1})
    print(f"{'workload':<30}{'machine':<10}" + "".join(f"{f'{n} thread(s)':>14}" for n in thread_counts)
          + f"{'ratio':>10}")
    with tempfile.TemporaryDirectory() as log_root:
        for name, files in workloads.items():
            for condition, spinners in (("quiet", 0), ("busy", args.busy)):
                times: dict[int, list[float]] = {n: [] for n in thread_counts}
                with busy(spinners):
                    for _ in range(args.repeats):
                        for n in thread_counts:
                            times[n].append(seconds(files, n, log_root))
                medians = {n: statistics.median(t) for n, t in times.items()}
                ratio = medians[thread_counts[-1]] / medians[1]
                print(f"{name:<30}{condition:<10}" + "".join(f"{medians[n]:>13.1f}s" for n in thread_counts)
                      + f"{ratio:>9.1f}x", flush=True)


if __name__ == "__main__":
    main()
