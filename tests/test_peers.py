"""The learning-rate-free peers (algorithms/peers.py) against their packages' own optimisers.

Ground truth: the package's optimiser, built with the config's values as constructor arguments,
stepping a copy of the same initial network on the same batches in a plain PyTorch loop. The
framework's run must end at the same weights, report the step size the optimiser reached, and
measure Schedule-Free at its evaluation weights.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from onepass import config, train
from onepass.algorithms.peers import PEERS
from onepass.config import ConfigError
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.skipif(not all(rule.available() for rule in PEERS.values()),
                                reason="the optional peers packages are not installed (make peers)")
CONFIGS = REPO / "configs"
STEPS = 30
# The config's values, and the same as the package's constructor arguments.
SETTINGS = {"lr": 0.5, "weight_decay": 1e-3, "momentum": 0.8, "beta1": 0.85, "beta2": 0.99, "d_coef": 2.0,
            "warmup_steps": 7}
CONSTRUCTOR = {
    "prodigy": lambda s: dict(lr=s["lr"], weight_decay=s["weight_decay"], betas=(s["beta1"], s["beta2"]),
                              d_coef=s["d_coef"]),
    "dadapt_sgd": lambda s: dict(lr=s["lr"], weight_decay=s["weight_decay"], momentum=s["momentum"]),
    "dadapt_adam": lambda s: dict(lr=s["lr"], weight_decay=s["weight_decay"], betas=(s["beta1"], s["beta2"])),
    "sf_sgd": lambda s: dict(lr=s["lr"], weight_decay=s["weight_decay"], momentum=s["momentum"],
                             warmup_steps=s["warmup_steps"]),
    "sf_adamw": lambda s: dict(lr=s["lr"] / 50, weight_decay=s["weight_decay"], betas=(s["beta1"], s["beta2"]),
                               warmup_steps=s["warmup_steps"]),
}


def settings_of(name: str) -> dict:
    values = SETTINGS | ({"lr": SETTINGS["lr"] / 50} if name == "sf_adamw" else {})
    return {key: value for key, value in values.items() if key in PEERS[name].hyperparameters}


def peer_learner(name: str, *overrides: str) -> train.Learner:
    """Diabetes, full batch, float64, fixed hyperparameters (Random's config) under peer `name`."""
    settings = [f"optimiser.{key}={value}" for key, value in settings_of(name).items()]
    cfg = config.load_from([str(CONFIGS / "diabetes.yaml"), str(CONFIGS / "Random.yaml")],
                           overrides=["dtype=float64", "seed=0", f"optimiser.name={name}",
                                      f"network_weight_steps={STEPS}", "hyperparameter_steps=1", *settings,
                                      *overrides])
    return train.Learner(train.prepare(cfg))


def reference(learner: train.Learner, name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The package's optimiser on a copy of the learner's initial network, stepped STEPS times by
    hand on the learner's batches (full batch: the whole training split every step)."""
    model = copy.deepcopy(learner.model)
    rule = PEERS[name]
    module = __import__(rule.package)
    optimiser = getattr(module, rule.optimiser)(model.parameters(), **CONSTRUCTOR[name](SETTINGS))
    train_split = learner.splits.train
    if rule.schedule_free:
        optimiser.train()
    for _ in range(STEPS):
        optimiser.zero_grad()
        torch.nn.functional.mse_loss(model(train_split.inputs), train_split.targets).backward()
        optimiser.step()
    return model, optimiser


@pytest.mark.parametrize("name", PEERS)
def test_each_peer_ends_where_its_package_ends(name):
    """Bugs caught: a setting not written into the parameter group (betas, momentum, weight decay,
    d_coef, warm-up), the gradient handed over wrongly (stale, not summed), a step skipped."""
    learner = peer_learner(name)
    model, optimiser = reference(learner, name)
    metrics = learner.run(show_progress=False)
    assert metrics["status"] == "completed" and metrics["weight_steps"] == STEPS
    # (Schedule-Free: both in training mode, at the sequence y the steps move)
    for got, expected in zip(learner.params, model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    effective = metrics["final"]["Hyperparameter/Effective_Lr"]
    group = optimiser.param_groups[0]
    expected_lr = group["scheduled_lr"] if PEERS[name].schedule_free else group["d"] * group["lr"]
    assert effective == pytest.approx(expected_lr, rel=1e-12)


@pytest.mark.parametrize("name", [name for name, rule in PEERS.items() if rule.schedule_free])
def test_schedule_free_is_measured_at_its_evaluation_weights(name):
    """The final test loss is the loss at Schedule-Free's averaged weights x, not at the training
    sequence y it steps: caught if the measurement is not switched (optimizer.eval()/train())."""
    learner = peer_learner(name)
    model, optimiser = reference(learner, name)
    final = learner.run(show_progress=False)["final"]
    test = learner.splits.test
    optimiser.eval()
    with torch.no_grad():
        at_x = torch.nn.functional.mse_loss(model(test.inputs), test.targets).item()
    optimiser.train()
    with torch.no_grad():
        at_y = torch.nn.functional.mse_loss(model(test.inputs), test.targets).item()
    assert not math.isclose(at_x, at_y, rel_tol=1e-6)        # the switch matters here
    assert final["Loss/Test"] == pytest.approx(at_x, rel=1e-10)


def test_a_peer_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    """One line each: a tuned peer (it has no differentiable form), -S (its state is an optimiser
    object), and a missing package, which names the install command."""
    with pytest.raises(ConfigError, match="runs with fixed hyperparameters"):
        config.load_from([str(CONFIGS / "diabetes.yaml"), str(CONFIGS / "Ours_LR.yaml")],
                         overrides=["optimiser.name=prodigy"])
    result = run_cli("train.py", "-c", "configs/diabetes.yaml", "configs/Prodigy.yaml", "-S", str(tmp_path / "s.pt"),
                     "-l", str(tmp_path / "runs"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "checkpoints do not cover optimiser.name = 'prodigy'" in result.stderr
    assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(type(PEERS["sf_sgd"]), "available", lambda rule: rule.package != "schedulefree")
    with pytest.raises(ConfigError, match=r"needs the schedulefree package: make peers"):
        config.load_from([str(CONFIGS / "diabetes.yaml"), str(CONFIGS / "ScheduleFree_SGD.yaml")])


def test_peer_and_adam_configs_accept_the_dataset_configs_momentum():
    """A dataset config's SGD momentum stays allowed under an algorithm config that chooses another
    rule in a section of a file it extends (was refused: the extending file claimed the section)."""
    for algorithm in ("Prodigy", "Ours_Adam_LR_WD", "Ours_HDLR_Adam"):
        cfg = config.load_from([str(CONFIGS / "uci_energy.yaml"), str(CONFIGS / f"{algorithm}.yaml")])
        assert cfg.algorithm == algorithm
    with pytest.raises(ConfigError, match="optimiser.momentum = 0.5 is not used by optimiser.name = 'prodigy'"):
        config.load_from([str(CONFIGS / "uci_energy.yaml"), str(CONFIGS / "Prodigy.yaml")],
                         overrides=["optimiser.momentum=0.5"])
