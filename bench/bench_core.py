"""Framework overhead: a full UCI Energy Random run against a bare PyTorch loop of the same SGD steps.

    .venv/bin/python bench/bench_core.py [--repeats N]      (or: make bench)

The framework side is `train.Learner(setup, log).run()` at the default logging cadence (TensorBoard
scalars every `log_every` steps, `Last_*` tags every hyperparameter step). The floor is the same
full-batch data and an identically built MLP trained by `torch.optim.SGD` with the config's initial
hyperparameters in a plain zero_grad / forward / MSE / backward / step loop, and nothing else.

Floor and framework runs alternate (after one warm-up of each) so that drift on a noisy shared
machine hits both sides alike; the report gives medians, min/max and the per-pair ratio median.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, Python puts bench/ (not the repo root) on sys.path

from onepass import config, models, run_files, train
from onepass.config import Config

CONFIG_FILES = [REPO / "configs" / "uci_energy.yaml", REPO / "configs" / "Random.yaml"]
TARGET_RATIO = 1.20


def load_config(log_root: str) -> Config:
    return config.load_from([str(path) for path in CONFIG_FILES], overrides=["seed=0", f"log_root={log_root}"])


def time_framework(cfg: Config) -> float:
    """Seconds for one full `Learner.run()`, logging to a fresh run directory (setup not timed)."""
    setup = train.prepare(cfg)
    log = run_files.RunLog(run_files.make_run_dir(cfg.log_root, cfg.run_group, cfg.run_name))
    try:
        start = time.perf_counter()
        train.Learner(setup, log).run()
        return time.perf_counter() - start
    finally:
        log.close()


def time_floor(setup: train.Setup) -> float:
    """Seconds for the same number of full-batch SGD steps in a minimal hand-written loop."""
    cfg = setup.cfg
    inputs, targets = setup.splits.train.inputs, setup.splits.train.targets
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, setup.splits.input_shape, setup.splits.num_outputs).to(dtype=inputs.dtype)
    opt = cfg.optimiser
    start = time.perf_counter()
    optimiser = torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    for _ in range(cfg.total_weight_steps):
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimiser.step()
    return time.perf_counter() - start


def spread(label: str, seconds: list[float]) -> str:
    return (f"{label:<10} median {statistics.median(seconds):7.3f} s   "
            f"min {min(seconds):7.3f} s   max {max(seconds):7.3f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each side (default 15)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_core-") as log_root:
        cfg = load_config(log_root)
        floor_setup = train.prepare(cfg)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{cfg.algorithm} on {cfg.dataset.name}: {cfg.total_weight_steps} steps, "
              f"{len(floor_setup.splits.train)} training rows, log_every {cfg.log_every}")
        time_floor(floor_setup)   # warm-up
        time_framework(cfg)       # warm-up
        floor, framework = [], []
        print(f"\n{'pair':>4}  {'floor s':>9}  {'framework s':>11}  {'ratio':>6}")
        for pair in range(1, args.repeats + 1):
            floor.append(time_floor(floor_setup))
            framework.append(time_framework(cfg))
            print(f"{pair:>4}  {floor[-1]:9.3f}  {framework[-1]:11.3f}  {framework[-1] / floor[-1]:5.2f}x")

    pair_ratios = [fw / fl for fw, fl in zip(framework, floor, strict=True)]
    ratio = statistics.median(framework) / statistics.median(floor)
    print()
    print(spread("floor", floor))
    print(spread("framework", framework))
    print(f"per-pair ratio median {statistics.median(pair_ratios):.2f}x "
          f"(min {min(pair_ratios):.2f}x, max {max(pair_ratios):.2f}x)")
    print(f"ratio of fastest runs (least disturbed by other load): {min(framework) / min(floor):.2f}x")
    print(f"ratio (median framework / median floor): {ratio:.2f}x  target <= {TARGET_RATIO:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
