"""Steps per second of each workload (Random and Ours_LR_Momentum), and peak memory against the
unroll length of Diff-through-Opt.

    .venv/bin/python bench/bench_workloads.py [--windows N] [--repeats K] [--workloads ...] [--no-memory]

The workloads at their real sizes, each run as its config says (logging and held-out measurements
included) for N windows of 10 steps:
- fashion_mnist: the real data, processed from ../shared/data into a temporary folder;
- cifar10: ResNet-18, batch 100, on synthetic 32x32 images (a step's cost does not depend on the
  pixel values): 5000 train+validation and 1000 test images;
- penn_treebank: the 650-unit 2-layer LSTM over a 10,000-word vocabulary, batches of 70 x 40
  tokens, on synthetic tokens: 100,000 for training and validation, and the real test set's size,
  82,430, measured every window as the config says (the cost of `dataset.test_batch_size: null`).
Memory: peak resident memory of a fresh process that runs one window of T steps of CIFAR-10, for
Diff-through-Opt unrolling R = T steps and for Ours_LR_Momentum (which keeps one step's graph).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, Python puts bench/ (not the repo root) on sys.path

from onepass import config, download_and_process_data, train

ALGORITHMS = ["Random", "Ours_LR_Momentum"]
WORKLOADS = ["fashion_mnist", "cifar10", "penn_treebank"]
PEAK_MEMORY = """
import resource, sys
sys.path.insert(0, {repo!r})
from onepass import config, train
train.train(config.load_from({files!r}, overrides={overrides!r}))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def prepare_data(folder: Path, workloads: list[str]) -> None:
    """Processed files for the workloads: real Fashion-MNIST, synthetic CIFAR-10 and PTB tokens."""
    rng = np.random.default_rng(0)
    if "fashion_mnist" in workloads:
        source = REPO.parent / "shared" / "data"
        assert download_and_process_data.main(["fashion_mnist", "--source", str(source), "--out", str(folder)]) == 0
    np.savez(folder / "cifar10.npz", inputs=rng.integers(0, 256, (6000, 3, 32, 32), dtype=np.uint8),
             targets=rng.integers(0, 10, (6000, 1), dtype=np.uint8), test_size=1000)
    np.savez(folder / "penn_treebank.npz", train_val=rng.integers(0, 10000, 100_000),
             test=rng.integers(0, 10000, 82_430), vocabulary=np.array([f"w{i}" for i in range(10000)]),
             test_size=82_430)


def files(workload: str, algorithm: str) -> list[str]:
    return [str(REPO / "configs" / f"{workload}.yaml"), str(REPO / "configs" / f"{algorithm}.yaml")]


def seconds_per_step(workload: str, algorithm: str, data: Path, log_root: str, windows: int) -> float:
    cfg = config.load_from(files(workload, algorithm), overrides=[
        f"dataset.data_dir={data}", f"log_root={log_root}", "seed=0", f"hyperparameter_steps={windows}"])
    _, metrics = train.train(cfg)
    return metrics["train_seconds"] / metrics["weight_steps"]


def peak_memory_mb(algorithm: str, steps: int, data: Path, log_root: str) -> float:
    overrides = [f"dataset.data_dir={data}", f"log_root={log_root}", "seed=0", "hyperparameter_steps=1",
                 f"network_weight_steps={steps}", "dataset.test_batch_size=100"]
    if algorithm == "DiffThroughOpt":
        overrides.append(f"tuning.unroll_steps={steps}")
    script = PEAK_MEMORY.format(repo=str(REPO), files=files("cifar10", algorithm), overrides=overrides)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024      # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=3, help="windows of 10 steps per timed run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each algorithm (default 3)")
    parser.add_argument("--workloads", nargs="*", choices=WORKLOADS, default=WORKLOADS,
                        help="workloads to time (none: only the memory study)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory study")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_workloads-") as temporary:
        data, log_root = Path(temporary) / "data", str(Path(temporary) / "runs")
        data.mkdir()
        prepare_data(data, args.workloads)
        if args.workloads:
            print(f"{'workload':<16}{'algorithm':<20}{'steps/s':>9}{'vs Random':>11}   (median of {args.repeats} "
                  f"runs of {10 * args.windows} steps)")
        for workload in args.workloads:
            seconds: dict[str, list[float]] = {algorithm: [] for algorithm in ALGORITHMS}
            for _ in range(args.repeats):            # alternate, so drift hits both alike
                for algorithm in ALGORITHMS:
                    seconds[algorithm].append(seconds_per_step(workload, algorithm, data, log_root, args.windows))
            random = statistics.median(seconds["Random"])
            for algorithm in ALGORITHMS:
                median = statistics.median(seconds[algorithm])
                print(f"{workload:<16}{algorithm:<20}{1 / median:>9.2f}{median / random:>10.2f}x", flush=True)
        if args.memory:
            print("\npeak resident memory, CIFAR-10 ResNet-18, one window of T steps (MB):")
            print(f"{'T':>4}{'DiffThroughOpt (R = T)':>26}{'Ours_LR_Momentum':>20}")
            for steps in (1, 2, 4, 8):
                unrolled = peak_memory_mb("DiffThroughOpt", steps, data, log_root)
                implicit = peak_memory_mb("Ours_LR_Momentum", steps, data, log_root)
                print(f"{steps:>4}{unrolled:>26.0f}{implicit:>20.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
