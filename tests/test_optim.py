"""The drop-in optimisers of optim.py against train.py's Learner, on the same batches (float64).

Each trajectory test runs a Learner on UCI Energy (batches of 64, an 8-16-1 MLP) while recording the
batches its training and hypergradient streams hand out, then replays those batches through a
hand-written loop around the optimiser, from the same initial weights, and compares the raw
hyperparameters after every window and the final weights to 1e-12. The bug each catches (each was
injected once into optim.py and seen to fail):

- `test_implicit_follows_train_py[Ours_LR_Momentum]`: one Neumann term fewer than asked; the
  hyperparameter step every T + 1 steps; the momentum buffer kept on the graph after the window
  (an error: the next window's hypergradient runs into the freed graph).
- `test_implicit_follows_train_py[Ours_Adam_LR_WD_Betas]`: betas handed to the rule swapped.
- `test_implicit_follows_train_py[Ours_HDLR_Momentum]`: per_element_lr ignored (one scalar lr).
- `test_baydin_follows_train_py`: the hypergradient's second gradient taken on the training batch
  of the step instead of the validation closure's.
- `test_clipped_trajectories_follow_train_py`: the fast steps not clipped (only the tracked one).
- `test_two_ranks_equal_one_process` (2 gloo processes): each rank's loss not counted as its share
  of the global batch (gradients twice as large on two ranks).
- `test_state_dict_round_trip_continues_the_same_trajectory`: the hyper-optimiser's Adam moments
  not restored; the fast steps' hyperparameters not refreshed after a mid-window restore.
- `test_a_scheduler_write_moves_the_tuned_lr`: a value written into param_groups ignored.

The rest: the parameter group shows the tuned values, the defaults are the paper's configs', misuse
is a one-line TypeError or ValueError, and the examples run.
"""
from __future__ import annotations

import copy
import inspect
import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.functional import mse_loss

from onepass import config, datasets, download_and_process_data, optim, train
from tests.conftest import REPO, run_cli

STEPS, WINDOWS = 10, 4
COMMON = ("dtype=float64", "seed=0", "model.layer_sizes=[8, 16, 1]", "batch_size=64", "optimiser.weight_decay=1e-4",
          f"network_weight_steps={STEPS}", f"hyperparameter_steps={WINDOWS}", "log_every=1000")


@pytest.fixture(scope="module")
def energy(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """UCI Energy, processed by the download script from the raw copy."""
    out = tmp_path_factory.mktemp("energy")
    assert download_and_process_data.main(["uci_energy", "--source", str(shared_data), "--out", str(out)]) == 0
    return out


class Recorded:
    """A Learner's batch stream that keeps every batch it hands out."""

    def __init__(self, stream):
        self.stream, self.batches = stream, []

    def __next__(self):
        self.batches.append(next(self.stream))
        return self.batches[-1]


def raw(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [leaf.detach().clone() for leaf in leaves]


def learner_run(data: Path, algorithm: str, *overrides: str) -> tuple[train.Learner, torch.nn.Module, list]:
    """A Learner's run (its streams recorded), its initial model, and its raw hyperparameters after
    every window."""
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml"), str(REPO / f"configs/{algorithm}.yaml")],
                           overrides=[*COMMON, f"dataset.data_dir={data}", *overrides])
    learner = train.Learner(train.prepare(cfg))
    initial = copy.deepcopy(learner.model)
    learner.streams.train, learner.streams.hyper = Recorded(learner.streams.train), Recorded(learner.streams.hyper)
    trajectory = []
    learner.train_windows(after_window=lambda done: trajectory.append(raw(done.hyperparameters.leaves())),
                          show_progress=False)
    return learner, initial, trajectory


def replay(learner: train.Learner, model: torch.nn.Module) -> list:
    """The Learner's batches through a hand-written loop around the optimiser; its raw
    hyperparameters after every window."""
    def loss(batch):
        return mse_loss(model(batch.inputs), batch.targets)
    optimiser = optim.from_config(learner.cfg, model, learner.streams.hyper.batches, loss)
    trajectory = []
    for index, batch in enumerate(learner.streams.train.batches, 1):
        optimiser.step(lambda batch=batch: loss(batch))
        if index % optimiser.window == 0:
            trajectory.append(optimiser.state_dict()["hyperparameters"]["raw"])
    return trajectory


def assert_same_run(learner: train.Learner, initial: torch.nn.Module, expected: list) -> None:
    got = replay(learner, initial)
    assert len(got) == len(expected) == learner.cfg.hyperparameter_steps
    for window, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m, w=window: f"window {w}: {m}")
    for a, b in zip(initial.parameters(), learner.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "Ours_Adam_LR_WD_Betas", "Ours_HDLR_Momentum"])
def test_implicit_follows_train_py(energy, algorithm):
    learner, initial, trajectory = learner_run(energy, algorithm)
    assert not torch.equal(trajectory[0][0], trajectory[-1][0])       # the lr moved
    assert_same_run(learner, initial, trajectory)


def test_baydin_follows_train_py(energy):
    learner, initial, trajectory = learner_run(energy, "Baydin", "hyperparameter_steps=3")
    assert len(trajectory) == 3 * STEPS                               # one window per weight step
    assert_same_run(learner, initial, trajectory)


@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "Ours_Adam_LR_WD_Betas"])
def test_clipped_trajectories_follow_train_py(energy, algorithm):
    learner, initial, trajectory = learner_run(energy, algorithm, "optimiser.gradient_clip=0.05")
    unclipped = learner_run(energy, algorithm)[2]
    assert not torch.equal(trajectory[-1][0], unclipped[-1][0])        # the clipping bites
    assert_same_run(learner, initial, trajectory)


@pytest.fixture(scope="module")
def data(energy: Path) -> tuple[torch.Tensor, ...]:
    """UCI Energy's training rows and 64 validation rows (two equal shards), float64."""
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml")], overrides=[f"dataset.data_dir={energy}"])
    splits = datasets.make_splits(cfg.dataset, torch.float64, torch.device("cpu"))
    return splits.train.inputs, splits.train.targets, splits.validation.inputs[:64], splits.validation.targets[:64]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def train_on(data: tuple[torch.Tensor, ...], steps: int, rank: int = 0, world_size: int = 1,
             resume: tuple[dict, dict, int] | None = None, **settings) -> tuple[torch.nn.Module, optim.TunedOptimiser]:
    """`steps` steps on consecutive batches of 32 training rows, this rank's equal shard of each
    (and of the validation rows) in a process group of `world_size`; or the steps after those that
    `resume` (model state, optimiser state, steps done) took."""
    x, y, xv, yv = data
    model = mlp()
    shard = slice(rank * len(xv) // world_size, (rank + 1) * len(xv) // world_size)
    optimiser = optim.Implicit(model, lambda: mse_loss(model(xv[shard]), yv[shard]), **settings)
    done = 0
    if resume is not None:
        model.load_state_dict(resume[0])
        optimiser.load_state_dict(resume[1])
        done = resume[2]
    for step in range(done, steps):
        start = step * 32 % (len(x) - 32)
        part = slice(start + rank * 32 // world_size, start + (rank + 1) * 32 // world_size)
        optimiser.step(lambda part=part: mse_loss(model(x[part]), y[part]))
    return model, optimiser


RANK_RUNS = [dict(gradient_clip=1.0), dict(rule="adam", per_element_lr=True)]


def rank_process(rank: int, world_size: int, folder: str, data: tuple[torch.Tensor, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        for run, settings in enumerate(RANK_RUNS):
            model, optimiser = train_on(data, 30, rank, world_size, **settings)
            torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict()},
                       f"{folder}/run{run}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, data):
    mp.spawn(rank_process, args=(2, str(tmp_path), data), nprocs=2)
    for run, settings in enumerate(RANK_RUNS):
        ranks = [torch.load(tmp_path / f"run{run}-rank{rank}.pt", weights_only=True) for rank in range(2)]
        model, optimiser = train_on(data, 30, **settings)
        one = {"model": model.state_dict(), "optimiser": optimiser.state_dict()}
        for name, value in one["model"].items():
            assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name])
            torch.testing.assert_close(ranks[0]["model"][name], value, rtol=1e-10, atol=0)
        for a, b, c in zip(*(r["optimiser"]["hyperparameters"]["raw"] for r in (*ranks, one)), strict=True):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, rtol=1e-10, atol=0)
        assert one["optimiser"]["param_groups"][0]["lr"] != pytest.approx(1e-3)       # it tuned


@pytest.mark.parametrize("stop", [20, 25])       # after two windows, and in the middle of the third
def test_state_dict_round_trip_continues_the_same_trajectory(data, stop):
    settings = dict(rule="adam", per_element_lr=True)
    whole_model, whole = train_on(data, 50, **settings)
    model, first = train_on(data, stop, **settings)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimiser": first.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    model, optimiser = train_on(data, 50, resume=(state["model"], state["optimiser"], stop), **settings)
    for a, b in zip(model.parameters(), whole_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(optimiser.state_dict()["hyperparameters"]["raw"], whole.state_dict()["hyperparameters"]["raw"],
                    strict=True):
        assert torch.equal(a, b)
    assert optimiser.param_groups[0]["lr"] == whole.param_groups[0]["lr"]


def test_the_param_group_shows_the_tuned_values(data):
    model, optimiser = train_on(data, 20, rule="adam")
    raw = optimiser.state_dict()["hyperparameters"]["raw"]      # lr, weight_decay, beta1, beta2
    group = optimiser.param_groups[0]
    assert group["lr"] == pytest.approx(10 ** raw[0].item(), rel=1e-14) and group["lr"] != 1e-3
    assert group["betas"] == pytest.approx((torch.sigmoid(raw[2]).item(), torch.sigmoid(raw[3]).item()), rel=1e-14)


def test_a_scheduler_write_moves_the_tuned_lr(data):
    """A StepLR halving the lr every step: the tuned lr follows it between hyperparameter steps."""
    model, optimiser = train_on(data, 10)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=1, gamma=0.5)
    before = optimiser.param_groups[0]["lr"]
    x, y, _, _ = data
    optimiser.step(lambda: mse_loss(model(x[:32]), y[:32]))
    scheduler.step()
    optimiser.step(lambda: mse_loss(model(x[32:64]), y[32:64]))      # takes the halved lr up
    assert 10 ** optimiser.state_dict()["hyperparameters"]["raw"][0].item() == pytest.approx(before / 2, rel=1e-12)


def test_defaults_are_the_papers():
    """Implicit's are configs/Ours_LR_Momentum.yaml's, Baydin's configs/Baydin.yaml's (on the
    dataset configs' starting values)."""
    for cls, algorithm in ((optim.Implicit, "Ours_LR_Momentum"), (optim.Baydin, "Baydin")):
        cfg = config.load_from([str(REPO / "configs/diabetes.yaml"), str(REPO / f"configs/{algorithm}.yaml")])
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        assert (defaults["hyper_lr"], defaults["rule"]) == (cfg.tuning.lr, cfg.optimiser.name)
        assert (defaults["lr"], defaults["weight_decay"], defaults["momentum"]) == \
            (cfg.optimiser.lr, cfg.optimiser.weight_decay, cfg.optimiser.momentum)
        if cls is optim.Implicit:
            assert (defaults["window"], defaults["terms"], defaults["hyper_optimiser"], defaults["tune"]) == \
                (cfg.network_weight_steps, cfg.tuning.rollback_distance, cfg.tuning.optimiser, None)
            assert optim.RULES["sgd"].hyperparameters == cfg.tuning.hyperparameters    # what tune=None tunes


def test_misuse_is_a_one_line_error(data):
    x, y, xv, yv = data
    model = mlp()

    def loss():
        return mse_loss(model(x[:32]), y[:32])
    optimiser = optim.Implicit(model, lambda: mse_loss(model(xv), yv))
    with pytest.raises(TypeError, match=r"step\(\) needs the closure .* optimiser.step\(lambda: loss_fn"):
        optimiser.step()
    def lbfgs_style():        # torch.optim.LBFGS's closures call backward() themselves
        value = loss()
        value.backward()
        return value
    with pytest.raises(ValueError, match=r"graph was used before .* without calling backward\(\)"):
        optimiser.step(lbfgs_style)
    with pytest.raises(TypeError, match="the closure must return the loss as a 0-d tensor, got float"):
        optimiser.step(lambda: loss().item())
    with pytest.raises(ValueError, match="returned a loss without a graph"):
        optimiser.step(lambda: loss().detach())
    with pytest.raises(TypeError, match="validation_loss=lambda batch"):
        optim.Implicit(model, [(xv, yv)])
    with pytest.raises(TypeError, match="not DistributedDataParallel"):
        optim.Implicit(torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel),
                       loss)
    with pytest.raises(ValueError, match=r"tune=\('lr', 'beta1'\): sgd has no beta1"):
        optim.Implicit(model, loss, tune=("lr", "beta1"))
    with pytest.raises(ValueError, match="weight_decay=0.0: must be above 0 to be tuned"):
        optim.Implicit(model, loss, weight_decay=0.0)
    with pytest.raises(ValueError, match="one parameter group"):
        optimiser.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    with pytest.raises(ValueError, match="the state is that of Baydin"):
        optimiser.load_state_dict(optim.Baydin(model, loss).state_dict())
    one_pass = optim.Implicit(model, iter([(xv, yv)]), lambda batch: mse_loss(model(batch[0]), batch[1]), window=1)
    one_pass.step(loss)
    with pytest.raises(ValueError, match="can be iterated again, such as a DataLoader"):
        one_pass.step(loss)


@pytest.mark.slow
def test_the_example_runs():
    result = run_cli("examples/optimiser_loop.py", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "validation loss" in result.stdout and " -> " in result.stdout


@pytest.mark.slow
def test_the_lightning_example_runs():
    pytest.importorskip("lightning")
    result = run_cli("examples/optimiser_lightning.py", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "validation loss" in result.stdout
