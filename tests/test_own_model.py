"""A user's own model and data: the Python API (onepass.tune), the `module:factory` config route and
examples/own_model.py."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import onepass
from onepass import config, datasets, measure, models, train
from onepass.schema import ConfigError, ModelConfig
from tests import own_models
from tests.conftest import run_cli

DIABETES = ["configs/diabetes.yaml", "configs/Ours_LR_Momentum.yaml"]


def regression_data(rows: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=generator)
    return x, torch.sin(x[:, :1]) + x[:, 1:2] + 0.1 * torch.randn(rows, 1, generator=generator)


def small_model(seed: int = 0, outputs: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, outputs))


def tune_small(**settings) -> onepass.Result:
    x, y = regression_data()
    return onepass.tune(small_model(), nn.functional.mse_loss, (x[:200], y[:200]), (x[200:250], y[200:250]),
                        test=(x[250:], y[250:]), **{"hyperparameter_steps": 5, "seed": 0} | settings)


# -- the API drives the same loop as the command line -------------------------------------------------

def test_the_api_ends_where_the_command_line_does_for_the_same_config_and_seed(tmp_path):
    """Catches an API that builds another config (a setting under the wrong key, the algorithm's
    file not read), seeds the data order differently, or wraps the data differently from train.py."""
    flags = ["--seed", "3", "--hyperparameter_steps", "12", "--batch_size", "64"]
    done = run_cli("train.py", "-c", *DIABETES, *flags, "-l", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (metrics_file,) = tmp_path.glob("**/metrics.json")
    cli = json.loads(metrics_file.read_text())["final"]

    cfg = config.load_from(DIABETES, {"seed": 3})
    splits = datasets.make_splits(cfg.dataset, torch.float32, torch.device("cpu"))
    torch.manual_seed(3)                 # as train.prepare seeds before building the model
    model = models.build(cfg.model, splits.input_shape, splits.num_outputs)
    result = onepass.tune(model, "mse", splits.train, splits.validation, "Ours_LR_Momentum", test=splits.test,
                          lr=1e-3, weight_decay=1e-6, momentum=0.5, hyperparameter_steps=12, batch_size=64,
                          seed=3, device="cpu")
    assert result.status == "completed" and result.metrics["weight_steps"] == 120
    for name, value in result.hyperparameters.items():
        assert value == pytest.approx(cli[f"Hyperparameter/{name.title()}"], rel=1e-6), name
    assert result.hyperparameters["lr"] != pytest.approx(1e-3, rel=1e-2)      # it did tune
    for tag in ("Loss/Training", "Loss/Validation", "Loss/Test"):
        assert result.metrics["final"][tag] == pytest.approx(cli[tag], rel=1e-5), tag


# -- the API ----------------------------------------------------------------------------------------

def test_tune_returns_the_trained_model_and_its_hyperparameters_and_logs_like_train_py(tmp_path):
    """Catches a Result whose hyperparameters are not the final ones, a model that is a copy, and
    logs missing or written elsewhere."""
    model = small_model()
    x, y = regression_data()
    before = [p.detach().clone() for p in model.parameters()]
    result = onepass.tune(model, nn.functional.mse_loss, (x[:200], y[:200]), (x[200:250], y[200:250]),
                          hyperparameter_steps=4, seed=1, log_dir=tmp_path)
    assert result.model is model and any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    final = result.metrics["final"]
    assert result.hyperparameters == {name: final[f"Hyperparameter/{name.title()}"]
                                      for name in ("lr", "weight_decay", "momentum")}
    assert "Loss/Test" not in final       # no test split was given
    assert result.log_dir.parent == tmp_path / "own" / "Ours_LR_Momentum"
    assert json.loads((result.log_dir / "config.json").read_text())["dataset"]["name"] == "own"
    assert json.loads((result.log_dir / "metrics.json").read_text())["final"]["Loss/Validation"] == \
        final["Loss/Validation"]
    assert list(result.log_dir.glob("events.out.tfevents.*"))


def test_the_callback_sees_every_window_and_can_stop_the_run():
    """Catches a callback not called after each window, or one whose request to stop is ignored."""
    seen = []

    def callback(window: onepass.Window) -> bool:
        seen.append((window.index, window.weight_steps, sorted(window.hyperparameters)))
        return window.index == 3

    result = tune_small(hyperparameter_steps=10, callback=callback)
    assert [(index, steps) for index, steps, _ in seen] == [(1, 10), (2, 20), (3, 30)]
    assert seen[0][2] == ["lr", "momentum", "weight_decay"]
    assert result.status == "interrupted" and result.metrics["weight_steps"] == 30


def test_integer_targets_are_classification_with_accuracy():
    """Catches class labels taken for regression targets (cast to floats, no accuracy)."""
    x, _ = regression_data()
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()          # 3 classes
    result = onepass.tune(small_model(outputs=3), nn.functional.cross_entropy, (x[:200], labels[:200]),
                          (x[200:], labels[200:]), hyperparameter_steps=3, seed=0)
    assert 0.0 <= result.metrics["final"]["Accuracy/Validation"] <= 1.0


def test_random_trains_on_train_plus_validation_with_fixed_hyperparameters():
    """Catches the algorithm's config not being applied (Random keeps its lr and sets no validation split)."""
    result = tune_small(algorithm="Random", lr=0.01)
    assert result.hyperparameters["lr"] == pytest.approx(0.01)
    assert "Loss/Validation" not in result.metrics["final"]


BAD_CALLS = {
    "mismatched lengths": (dict(train_data=(torch.zeros(10, 4), torch.zeros(9, 1))), ["train", "(10, 4) inputs",
                                                                                      "(9, 1) targets"]),
    "loss not callable": (dict(loss=3), ["loss: expected a callable", "got int"]),
    "unknown loss name": (dict(loss="hinge"), ["loss 'hinge' is unknown"]),
    "unknown algorithm": (dict(algorithm="Ours_Everything"), ["algorithm 'Ours_Everything' is unknown",
                                                              "Ours_LR_Momentum"]),
    "no validation": (dict(validation=None), ["validation: Ours_LR_Momentum tunes on validation data"]),
    "unknown setting": (dict(settings={"hyperparameter_step": 3}), ["onepass.tune(hyperparameter_step=...)",
                                                                    "unknown key", "did you mean"]),
    "setting out of range": (dict(settings={"momentum": 1.5}), ["onepass.tune(momentum=...)",
                                                               "optimiser.momentum = 1.5 is out of range"]),
    "model setting": (dict(settings={"model.name": "mlp"}), ["model.name is given by the argument model"]),
    "not a model": (dict(model=lambda x: x), ["model: expected a torch.nn.Module"]),
    "inputs of another shape": (dict(validation=(torch.zeros(5, 3), torch.zeros(5, 1))),
                                ["validation: inputs of shape (3,) per row, but train's are (4,)"]),
    "float labels for classification": (dict(task="classification"), ["train: classification targets must be"]),
    "features the model does not take": (dict(model=nn.Linear(3, 1)), [
        "model does not fit the data: on inputs of shape (2, 4) it raised RuntimeError: mat1 and mat2 shapes"]),
    "outputs of another shape than the targets": (dict(model=small_model(outputs=2), loss="mse"), [
        "model does not fit the data: outputs of shape (2, 2) for targets of shape (2, 1)"]),
    "a loss of one value per row": (dict(loss=lambda out, y: (out - y) ** 2), [
        "loss returned a tensor of shape (2, 1)", "scalar floating-point tensor"]),
    "a loss returning a float": (dict(loss=lambda out, y: float(((out - y) ** 2).mean())), [
        "loss returned a float", "no .item() or float()"]),
    "a loss that raises": (dict(loss=lambda out, y: out @ y), [
        "loss does not fit model's outputs: loss(outputs (2, 1), targets (2, 1)) raised RuntimeError"]),
    "a batch larger than the training data": (dict(settings={"batch_size": 11}), [
        "batch_size = 11 is more than the 10 training rows: use at most 10"]),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_inputs_are_one_line_errors_before_training(case):
    """Catches bad inputs reaching the training loop (a traceback from deep inside) or multi-line messages."""
    x, y = regression_data(20)
    arguments = dict(model=small_model(), loss=nn.functional.mse_loss, train_data=(x[:10], y[:10]),
                     validation=(x[10:], y[10:]), algorithm="Ours_LR_Momentum", settings={})
    changes, expected = BAD_CALLS[case]
    arguments |= changes
    settings = arguments.pop("settings")
    with pytest.raises(ConfigError) as error:
        onepass.tune(**arguments, **settings, hyperparameter_steps=1) if "hyperparameter_step" not in settings \
            else onepass.tune(**arguments, **settings)
    message = str(error.value)
    assert "\n" not in message and all(part in message for part in expected), message


class CountsCalls(nn.Module):
    """Draws a random number and counts its calls in a buffer in every mode (as some users' models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + 0 * torch.rand(())


def test_the_fit_check_leaves_no_trace_on_the_run():
    """Catches a probe of the model in training mode (dropout draws, BatchNorm's running statistics
    move), or one that leaves a model's own random draws or buffer updates behind: the model's state
    and the random stream are those of a model never probed."""
    x, y = regression_data(60)
    splits = datasets.Splits(train=datasets.Split(x[:40], y[:40]), validation=None, test=None,
                             input_shape=(4,), num_outputs=1, task="regression")
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), CountsCalls(), nn.Linear(8, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    measure.check_fit(model, nn.functional.mse_loss, splits, "model", "mse")
    after_probe = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_probe, torch.rand(3)) and all(module.training for module in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- model.name: module:factory -----------------------------------------------------------------------

def test_a_factory_gets_the_model_section_the_input_shape_and_the_number_of_outputs():
    """Catches the factory called with other arguments (swapped, or without the config section)."""
    own_models.calls.clear()
    cfg = ModelConfig(name="tests.own_models:small_mlp")
    model = models.build(cfg, (7,), 3)
    assert own_models.calls == [(cfg, (7,), 3)]
    assert model(torch.zeros(2, 7)).shape == (2, 3)


def test_a_factory_named_in_a_config_trains_from_the_command_line(tmp_path):
    """Catches config validation refusing a module:factory name, or train.py not building it."""
    done = run_cli("train.py", "-c", *DIABETES, "--set", "model.name=tests.own_models:small_mlp",
                   "--hyperparameter_steps", "3", "--seed", "0", "-l", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (run_dir,) = {path.parent for path in tmp_path.glob("**/metrics.json")}
    assert json.loads((run_dir / "config.json").read_text())["model"]["name"] == "tests.own_models:small_mlp"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


BAD_FACTORIES = {
    "nosuchpackage.models:make": "no module named 'nosuchpackage'",
    "tests.no_such_module:make": "no module named 'tests.no_such_module'",
    "tests.own_models:missing": "module 'tests.own_models' has no attribute 'missing'",
    "tests.own_models:NOT_CALLABLE": "is a int, not a callable",
    "tests.broken_model_module:make": "importing 'tests.broken_model_module' failed: RuntimeError: this module "
                                      "cannot be imported second line",
    "transformer": "unknown name 'transformer'; valid: lstm, mlp, resnet18, or module.path:factory",
    "tests.own_models:1x": "unknown name",
}


@pytest.mark.parametrize("name", BAD_FACTORIES)
def test_a_bad_factory_name_is_a_one_line_config_error(name):
    """Catches a factory name accepted by the syntax check alone (the error then comes mid-run)."""
    with pytest.raises(ConfigError) as error:
        config.load_from(DIABETES, overrides=[f"model.name={name}"])
    message = str(error.value)
    assert message.startswith("--set model.name") and BAD_FACTORIES[name] in message and "\n" not in message


def test_a_factory_that_returns_no_module_fails_before_training():
    """Catches a factory's result used without checking that it is an nn.Module."""
    cfg = config.load_from(DIABETES, overrides=["model.name=tests.own_models:not_a_module"])
    with pytest.raises(ConfigError, match="the factory returned a str, not a torch.nn.Module"):
        train.prepare(cfg)


@pytest.mark.parametrize("factory,expected", [
    ("wrong_inputs", "model.name = 'tests.own_models:wrong_inputs' does not fit the data: on inputs of shape (2, 10)"),
    ("wrong_outputs", "outputs of shape (2, 3) for targets of shape (2, 1) (mse needs the same shape"),
])
def test_a_factory_model_that_does_not_fit_the_data_stops_train_py_with_one_line(factory, expected, tmp_path):
    """Catches the model first meeting the data inside the training loop (a traceback, a run directory
    half-written), or mse broadcasting (rows, 3) outputs against (rows, 1) targets without a word."""
    done = run_cli("train.py", "-c", *DIABETES, "--set", f"model.name=tests.own_models:{factory}",
                   "-l", str(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr and not any(tmp_path.iterdir())


def test_a_missing_factory_module_stops_train_py_with_one_line():
    done = run_cli("train.py", "-c", *DIABETES, "--set", "model.name=nosuchpackage.models:make")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no module named 'nosuchpackage'" in done.stderr


def test_a_factory_that_raises_stops_train_py_with_one_line_naming_where():
    """Catches the user's exception escaping as a traceback (or a run directory made before it)."""
    done = run_cli("train.py", "-c", *DIABETES, "--set", "model.name=tests.own_models:failing")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "the factory raised ValueError: this factory needs images (" in done.stderr
    assert "own_models.py, line" in done.stderr


# -- the example ------------------------------------------------------------------------------------

def test_the_example_tunes_its_own_model_and_lowers_the_validation_loss():
    """Catches tune not tuning (the hyperparameters keep their starting values) or not training."""
    done = run_cli("examples/own_model.py", timeout=120)
    assert done.returncode == 0, done.stderr
    learned = dict(re.findall(r"(\w+) ([\d.e+-]+)", done.stdout.splitlines()[0].removeprefix("learned: ")))
    assert set(learned) == {"lr", "weight_decay", "momentum"}
    assert not math.isclose(float(learned["lr"]), 1e-3, rel_tol=0.1)
    assert not math.isclose(float(learned["momentum"]), 0.5, rel_tol=0.05)
    before, after = map(float, re.search(r"validation loss: ([\d.]+) -> ([\d.]+)", done.stdout).groups())
    assert after < 0.5 * before
