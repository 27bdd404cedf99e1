"""Wall time of every hyperparameter optimiser against Random, on identical data, steps and logging.

    .venv/bin/python bench/bench_algorithms.py [--repeats N] [--workload uci_energy|fashion_mnist_sized]

- uci_energy: the paper's full protocol (configs/uci_energy.yaml, 400 x 10 full-batch steps).
- fashion_mnist_sized: a 784-50-10 MLP on batches of 50 (synthetic inputs and labels of
  Fashion-MNIST's shape: the speed of a step does not depend on the pixel values), 200 x 10 steps.

Algorithms run in turn within each repeat, so drift on a noisy machine hits all alike; the report
gives each algorithm's median seconds and its ratio to Random's median, against the targets. The
learning-rate-free peers (Prodigy, D-Adaptation, Schedule-Free) join when their packages are installed.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, Python puts bench/ (not the repo root) on sys.path

from onepass import config, datasets, models, run_files, train
from onepass.algorithms.peers import PEERS

TARGETS = {"Ours_LR": 1.5, "Ours_LR_Momentum": 1.5, "Lorraine": 1.5, "DiffThroughOpt": 3.0,
           "Ours_HDLR_Momentum": 2.0, "Baydin": None}
# The learning-rate-free peers (the optional peers packages, make peers), each within 1.3x Random.
PEER_TARGETS = {"Prodigy": 1.3, "DAdaptation_SGD": 1.3, "DAdaptation_Adam": 1.3, "ScheduleFree_SGD": 1.3,
                "ScheduleFree_AdamW": 1.3}
if all(rule.available() for rule in PEERS.values()):
    TARGETS |= PEER_TARGETS
ALGORITHMS = ["Random", *TARGETS]


def uci_energy_setup(algorithm: str, log_root: str) -> train.Setup:
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml"), str(REPO / f"configs/{algorithm}.yaml")],
                           overrides=["seed=0", f"log_root={log_root}", "optimiser.weight_decay=1e-4"])
    return train.prepare(cfg)


def fashion_mnist_sized_setup(algorithm: str, log_root: str) -> train.Setup:
    windows = (2000, 1) if algorithm == "Baydin" else (200, 10)     # Baydin steps the lr after every step
    cfg = config.load_from([str(REPO / "configs/digits.yaml"), str(REPO / f"configs/{algorithm}.yaml")],
                           overrides=["seed=0", f"log_root={log_root}", "optimiser.weight_decay=1e-4",
                                      "model.layer_sizes=[784, 50, 10]", "batch_size=50",
                                      f"hyperparameter_steps={windows[0]}", f"network_weight_steps={windows[1]}"])
    generator = torch.Generator().manual_seed(0)

    def split(rows: int) -> datasets.Split:
        return datasets.Split(torch.randn(rows, 784, generator=generator),
                              torch.randint(0, 10, (rows,), generator=generator))
    splits = datasets.Splits(train=split(10000), validation=split(2000), test=split(2000), task="classification",
                             input_shape=(784,), num_outputs=10)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, (784,), 10)
    return train.Setup(cfg, torch.device("cpu"), splits, model, models.build_loss(cfg.loss))


WORKLOADS = {"uci_energy": uci_energy_setup, "fashion_mnist_sized": fashion_mnist_sized_setup}


def time_run(setup: train.Setup) -> float:
    """Seconds for one `Learner.run()`, logging to a fresh run directory (setup not timed)."""
    cfg = setup.cfg
    log = run_files.RunLog(run_files.make_run_dir(cfg.log_root, cfg.run_group, cfg.run_name))
    try:
        learner = train.Learner(setup, log)
        start = time.perf_counter()
        learner.run()
        return time.perf_counter() - start
    finally:
        log.close()


def median_seconds(action, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_costs(make_setup, log_root: str, rollback_distance: int) -> tuple[float, float, int]:
    """Median seconds of a fast weight step and of an implicit window's last step plus its
    hypergradient (Ours_LR_Momentum), and T."""
    setup = make_setup("Ours_LR_Momentum", log_root)
    values = config.to_dict(setup.cfg)
    values["tuning"]["rollback_distance"] = rollback_distance
    setup.cfg = config.build_config(values)
    learner = train.Learner(setup)
    learner.fast_hyperparameters = learner.hyperparameters.natural_values()

    def last_step_and_hypergradient() -> None:
        weights = [p.detach().clone().requires_grad_() for p in learner.params]
        last, _ = learner.train_step(functools.partial(learner.algorithm.track, weights, learner.rule_state))
        learner.algorithm.hypergradient(last, next(learner.streams.hyper))
    fast = median_seconds(lambda: learner.train_step(learner.fast_step))
    return fast, median_seconds(last_step_and_hypergradient), setup.cfg.network_weight_steps


def components(make_setup, log_root: str) -> None:
    """Where an implicit window's time goes; i = 5 against i = 1 isolates four vector-Jacobian
    products through the tracked step (each a Hessian-vector product of the training loss)."""
    fast, end_5, T = step_costs(make_setup, log_root, 5)
    _, end_1, _ = step_costs(make_setup, log_root, 1)
    vjp = (end_5 - end_1) / 4
    print(f"\ncomponents (Ours_LR_Momentum, median of 200): fast step {fast * 1e6:.0f} us; last step + "
          f"hypergradient {end_5 * 1e6:.0f} us at i = 5, {end_1 * 1e6:.0f} us at i = 1 "
          f"(one vector-Jacobian product through the step: {vjp * 1e6:.0f} us = {vjp / fast:.2f} fast steps)")
    print(f"so a window of T = {T} costs at least {((T - 1) * fast + end_5) / (T * fast):.2f}x its fast steps "
          f"alone, before logging and the hyper-optimiser step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each algorithm (default 5)")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="uci_energy")
    args = parser.parse_args(argv)
    make_setup = WORKLOADS[args.workload]
    seconds: dict[str, list[float]] = {name: [] for name in ALGORITHMS}
    with tempfile.TemporaryDirectory(prefix="bench_algorithms-") as log_root:
        for algorithm in ALGORITHMS:        # warm-up
            time_run(make_setup(algorithm, log_root))
        for _ in range(args.repeats):
            for algorithm in ALGORITHMS:
                seconds[algorithm].append(time_run(make_setup(algorithm, log_root)))
    steps = make_setup("Random", "unused").cfg.total_weight_steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; workload {args.workload}: "
          f"{steps} weight steps, median of {args.repeats}")
    random = statistics.median(seconds["Random"])
    print(f"\n{'algorithm':<22}{'median s':>10}{'vs Random':>11}{'target':>9}")
    for algorithm in ALGORITHMS:
        median = statistics.median(seconds[algorithm])
        target = TARGETS.get(algorithm)
        verdict = "" if target is None else f"<= {target:.1f}x {'met' if median / random <= target else 'MISSED'}"
        print(f"{algorithm:<22}{median:>10.3f}{median / random:>10.2f}x  {verdict}")
    with tempfile.TemporaryDirectory(prefix="bench_algorithms-") as log_root:
        components(make_setup, log_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
