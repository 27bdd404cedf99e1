"""--nproc N equals one process: real gloo processes, float64, compared through checkpoints and logs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from onepass import util
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def run_ranks(tmp_path, algorithm: str, nproc: int, *extra: str) -> dict:
    checkpoint = tmp_path / f"{algorithm}-{nproc}.pt"
    result = run_cli("train.py", "-c", "configs/diabetes.yaml", f"configs/{algorithm}.yaml", "--nproc", str(nproc),
                     "--seed", "5", "--set", "dtype=float64", "--set", "model.layer_sizes=[10, 8, 1]",
                     "--set", "batch_size=32", "-l", str(tmp_path / f"runs{nproc}"), "-S", str(checkpoint), *extra)
    assert result.returncode == 0, result.stderr
    return torch.load(checkpoint, weights_only=True)


def assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    if not expected.is_floating_point():          # e.g. BatchNorm's num_batches_tracked
        assert torch.equal(got, expected)
        return
    assert float((got - expected).norm() / expected.norm()) < 1e-8


@pytest.mark.parametrize("algorithm,nproc", [
    ("Random", 2), ("Ours_LR", 2), ("Ours_LR_Momentum", 2), ("Ours_HDLR_Momentum", 2), ("Lorraine", 2),
    ("Baydin", 2), ("DiffThroughOpt", 2), ("Ours_LR_Momentum", 3), ("DiffThroughOpt", 3),
    ("Ours_LR_Momentum+batch_norm", 2), ("DiffThroughOpt+batch_norm", 2), ("Ours_LR_Momentum+batch_norm", 3)])
def test_n_ranks_end_where_one_rank_ends(algorithm, nproc, tmp_path):
    algorithm, _, batch_norm = algorithm.partition("+")
    steps = ["--hyperparameter_steps", "200"] if algorithm == "Baydin" else ["--hyperparameter_steps", "20"]
    steps += ["--set", "model.batch_norm=true"] if batch_norm else []
    one, many = run_ranks(tmp_path, algorithm, 1, *steps), run_ranks(tmp_path, algorithm, nproc, *steps)
    assert many["steps_done"] == one["steps_done"]
    for name, value in one["model"].items():
        assert_close(many["model"][name], value)
    for got, expected in zip(many["hyperparameters"]["raw"], one["hyperparameters"]["raw"], strict=True):
        assert_close(got, expected)
    # The logs (rank 0 only) carry the same global losses and hyperparameter trajectory.
    logs = [next(iter(util.get_tags(tmp_path / f"runs{n}").values())) for n in (1, nproc)]
    assert logs[1].metrics["world_size"] == nproc
    tags = ["Last_Hyperparameter/Lr", "Loss/Test", "Loss/Training", "Last_Loss/Validation"]
    for tag in [t for t in tags if t in logs[0].scalars]:
        np.testing.assert_allclose(logs[1].scalars[tag].values, logs[0].scalars[tag].values, rtol=1e-6)
    tuned = [tag for tag in logs[0].scalars if tag.startswith("Last_Hyperparameter/")
             and len(np.unique(logs[0].scalars[tag].values)) > 1]
    assert bool(tuned) == (algorithm != "Random")


FAILING_DRIVER = '''
import sys
from onepass import train

original = train.Learner.train_step


def train_step(self, stepper):
    if self.context.rank == 1 and self.record.steps_done == 25:
        raise RuntimeError("injected failure on rank 1")
    return original(self, stepper)


train.Learner.train_step = train_step   # module level: spawned ranks import this file too
if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
'''


def test_a_failing_rank_brings_the_job_down_with_its_error(tmp_path):
    """Its error is the job's one line on stderr: not rank 0's consequent one, nor the libraries'
    warnings, nor a pointer to a line printed elsewhere."""
    driver = tmp_path / "failing_driver.py"
    driver.write_text(FAILING_DRIVER)
    result = subprocess.run([sys.executable, str(driver), "-c", "configs/diabetes.yaml", "configs/Ours_LR.yaml",
                             "--nproc", "2", "-l", str(tmp_path / "runs")],
                            cwd=REPO, capture_output=True, text=True, timeout=600,      # only a hang takes this long
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr == "train.py: error on rank 1: RuntimeError: injected failure on rank 1\n", result.stderr
    leftover = subprocess.run(["pgrep", "-f", str(driver)], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


CHECKING_DRIVER = '''
import hashlib
import sys

import torch
import torch.distributed as dist

from onepass import algorithms
from onepass import train


def same_on_every_rank(tensors, what):
    digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in tensors)).hexdigest()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, digest)
    assert len(set(everyone)) == 1, f"{what} differ across ranks"
    return 1


original_step = train.Learner.train_step
checks = {"weights": 0, "hypergradients": 0}


def weight_step(self, take_step):
    result = original_step(self, take_step)
    checks["weights"] += same_on_every_rank(self.params, "weights")
    return result


def checked(hypergradient):
    def wrapper(self, *args):
        grads = hypergradient(self, *args)
        checks["hypergradients"] += same_on_every_rank(grads, "hypergradients")
        return grads
    return wrapper


original_finish = train.Learner.finish


def finish(self, *args):
    print(f"rank {self.context.rank} checked {checks['weights']} steps, {checks['hypergradients']} hypergradients")
    return original_finish(self, *args)


train.Learner.train_step, train.Learner.finish = weight_step, finish
for cls in {cls for cls in algorithms.METHODS.values() if "hypergradient" in vars(cls)}:
    cls.hypergradient = checked(cls.hypergradient)
if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("algorithm", ["Ours_HDLR_Momentum", "DiffThroughOpt"])
def test_weights_and_hypergradients_are_identical_on_every_rank_at_every_step(algorithm, tmp_path):
    driver = tmp_path / "checking_driver.py"
    driver.write_text(CHECKING_DRIVER)
    result = subprocess.run([sys.executable, str(driver), "-c", "configs/diabetes.yaml", f"configs/{algorithm}.yaml",
                             "--nproc", "2", "--set", "batch_size=32", "--hyperparameter_steps", "10",
                             "-l", str(tmp_path / "runs")],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO),
                                                                                       "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        assert f"rank {rank} checked 100 steps, 10 hypergradients" in result.stdout


def test_torchrun_runs_the_same_job(tmp_path):
    one = run_ranks(tmp_path, "Ours_LR_Momentum", 1, "--hyperparameter_steps", "20")
    checkpoint = tmp_path / "torchrun.pt"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "train.py",
         "-c", "configs/diabetes.yaml", "configs/Ours_LR_Momentum.yaml", "--seed", "5", "--set", "dtype=float64",
         "--set", "model.layer_sizes=[10, 8, 1]", "--set", "batch_size=32", "--hyperparameter_steps", "20",
         "-l", str(tmp_path / "runs_torchrun"), "-S", str(checkpoint)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("completed after 200 weight steps") == 1         # rank 0 alone reports
    many = torch.load(checkpoint, weights_only=True)
    for name, value in one["model"].items():
        assert_close(many["model"][name], value)


def test_nproc_below_one_is_rejected(tmp_path):
    result = run_cli("train.py", "-c", "configs/diabetes.yaml", "--nproc", "0", "-l", str(tmp_path / "runs"))
    assert result.returncode == 2 and "--nproc: must be at least 1, got 0" in result.stderr
    assert not (tmp_path / "runs").exists()


BAD_UNDER_NPROC = {      # the command, and its arguments
    "missing dataset": ("train.py", lambda tmp: ["-c", "configs/uci_energy.yaml", "configs/Ours_LR.yaml",
                                                 "--set", f"dataset.data_dir={tmp / 'missing'}"]),
    "checkpoint with the meta task": ("meta_learning.py", lambda tmp: ["-c", "configs/meta_dataset.yaml", "-S",
                                                                       str(tmp / "state.pt")]),
}


@pytest.mark.parametrize("case", BAD_UNDER_NPROC)
def test_bad_input_under_nproc_is_one_line_exit_2_before_any_rank_starts(case, tmp_path):
    command, arguments = BAD_UNDER_NPROC[case]
    result = run_cli(command, *arguments(tmp_path), "--nproc", "2", "-l", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{command}: error: "), result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("workload,algorithm", [
    ("penn_treebank_small", "Ours_LR_Momentum"), ("penn_treebank_small", "DiffThroughOpt"),
    ("cifar10", "Ours_LR_Momentum")])
def test_workloads_on_two_ranks_end_where_one_rank_ends(workload, algorithm, workload_data, tmp_path):
    """The LSTM (streams split across ranks, clipped gradients, truncated BPTT) and ResNet-18
    (BatchNorm2d over the global batch) under --nproc 2 equal one process."""
    from tests.test_workloads import SMALL
    settings = [item for override in SMALL[workload] for item in ("--set", override)]

    def run(nproc: int) -> dict:
        checkpoint = tmp_path / f"{nproc}.pt"
        result = run_cli("train.py", "-c", f"configs/{workload}.yaml", f"configs/{algorithm}.yaml", *settings,
                         "--nproc", str(nproc), "--seed", "5", "--set", "dtype=float64", "--set",
                         f"dataset.data_dir={workload_data}", "--hyperparameter_steps", "3",
                         "--network_weight_steps", "5", "-l", str(tmp_path / f"runs{nproc}"), "-S", str(checkpoint))
        assert result.returncode == 0, result.stderr
        return torch.load(checkpoint, weights_only=True)

    one, many = run(1), run(2)
    for name, value in one["model"].items():
        assert_close(many["model"][name], value)
    for got, expected in zip(many["hyperparameters"]["raw"], one["hyperparameters"]["raw"], strict=True):
        assert_close(got, expected)
    if workload.startswith("penn"):        # every stream's state, gathered from both ranks
        for got, expected in zip(many["streams"]["train"]["hidden"], one["streams"]["train"]["hidden"], strict=True):
            assert_close(got, expected)
