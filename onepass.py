"""Tune the weight-update hyperparameters of your own network, on your own data, from Python.

`tune` trains `model` with the weight-update rule of the configs (SGD with momentum and weight decay,
by default) while one of the framework's algorithms tunes lr, weight decay and momentum on the
validation loss, in the same training loop as `python train.py`:

    import torch
    from torch import nn
    import onepass

    x = torch.randn(600, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(600, 1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    result = onepass.tune(model, nn.functional.mse_loss, (x[:400], y[:400]), (x[400:500], y[400:500]),
                          test=(x[500:], y[500:]), lr=1e-3, hyperparameter_steps=100, seed=0)
    print(result.hyperparameters)                      # {'lr': ..., 'weight_decay': ..., 'momentum': ...}
    print(result.metrics["final"]["Loss/Validation"])  # result.model is `model`, trained

The configuration is STARTING_VALUES (lr 1e-3, weight decay 1e-6, momentum 0.5), then the
algorithm's YAML in configs/ (`algorithm="Ours_LR_Momentum"` reads configs/Ours_LR_Momentum.yaml; a
path to a .yaml file works too), then `**settings`, validated as the command line's are. A setting
is a top-level key (`hyperparameter_steps`, `network_weight_steps`, `batch_size`, `seed`, `device`,
`dtype`, `threads`, `log_every`), a key of the `optimiser` section by its own name (`lr`,
`weight_decay`, `momentum`, `name`, `gradient_clip`, ...: initial values, natural units), or any key
by its dotted name (`**{"tuning.lr": 0.1}`). `python train.py --help` lists them.
The data is yours and used as given (no normalisation): `dataset.full_validation` and
`dataset.test_batch_size` apply; the rest of `dataset`, `model` and `loss` are what you pass.

To use your own model from the command line instead, name its factory in a config:
`model.name: mypackage.models:make` (see models.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepass import config, datasets, distributed, measure, models, run_files, train, util
from onepass.schema import REPO_DIR, Config, ConfigError, OptimiserConfig, short_repr

CONFIG_DIR = REPO_DIR / "configs"
OWN_DATA = "own"        # dataset.name recorded for data passed to `tune` (run group own/<algorithm>)
TASKS = ("regression", "classification")
# Settings `tune` takes from its arguments instead (the dataset keys that still apply are allowed).
FROM_ARGUMENTS = {"model": "model", "loss": "loss", "task": "task", "algorithm": "algorithm", "log_root": "log_dir",
                  **{f"dataset.{key}": "train/validation" for key in
                     ("name", "validation_proportion", "normalise_inputs", "normalise_outputs", "data_dir",
                      "sequence_streams")}}

# Initial hyperparameters below the algorithm's config and the settings (the dataset configs' values;
# the schema's defaults, 0 weight decay and momentum, cannot start an optimisation in log10/logit space).
STARTING_VALUES = {"optimiser": {"lr": 1.0e-3, "weight_decay": 1.0e-6, "momentum": 0.5}}

Data = tuple[Any, Any] | datasets.Split | Sequence[tuple[Any, Any]]
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]     # (outputs, targets) -> mean loss


@dataclass
class Window:
    """What a `callback` sees after each window of T weight steps and the hyperparameter step after it."""
    index: int                           # windows done so far (1 after the first)
    weight_steps: int                    # weight steps done so far
    hyperparameters: dict[str, float]    # natural values for the next window (a per-element lr: its mean)
    model: nn.Module                     # the model being trained (its weights as of now)


@dataclass
class Result:
    """The outcome of `tune`."""
    model: nn.Module                     # the model passed in, trained (on the run's device and dtype)
    hyperparameters: dict[str, float]    # final natural values, e.g. {'lr': 0.02, 'weight_decay': ..., ...}
    metrics: dict                        # status, weight_steps, train_seconds, seed, threads and 'final':
                                         # {'Loss/Training': ..., 'Loss/Validation': ..., 'Hyperparameter/Lr': ...}
    config: Config                       # the validated configuration of the run
    log_dir: Path | None = None          # the run's directory (TensorBoard events), when logged

    @property
    def status(self) -> str:
        """'completed', 'diverged' (a non-finite training loss) or 'interrupted' (the callback stopped it)."""
        return self.metrics["status"]


def algorithm_names() -> list[str]:
    """The algorithms `tune` accepts: the configs/*.yaml files that name an algorithm."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml")
                  if "algorithm" in config.read_yaml_file(str(path), {}))


def _algorithm_file(algorithm: str) -> str:
    if not isinstance(algorithm, str):
        raise ConfigError(f"algorithm: expected a name such as 'Ours_LR_Momentum', got {short_repr(algorithm)}")
    if algorithm.endswith((".yaml", ".yml")):
        return algorithm
    names = algorithm_names()
    if algorithm not in names:
        raise ConfigError(f"algorithm {short_repr(algorithm)} is unknown; valid: {', '.join(names)}")
    return str(CONFIG_DIR / f"{algorithm}.yaml")


def _dotted_key(name: str) -> str:
    """A setting's config key: dotted as given, a top-level key, else an optimiser key by its own name."""
    if "." in name or name in {f.name for f in dataclasses.fields(Config)}:
        return name
    return f"optimiser.{name}" if name in {f.name for f in dataclasses.fields(OptimiserConfig)} else name


def make_config(algorithm: str, settings: dict[str, Any], validation_rows: int, train_rows: int) -> Config:
    """The algorithm's config with `settings` on top, for data of `train_rows` training and
    `validation_rows` validation rows, validated as the command line's is (one-line ConfigErrors)."""
    sources: dict = {}
    values = config.deep_merge({}, STARTING_VALUES, "onepass.STARTING_VALUES", sources)
    path, file_sources = _algorithm_file(algorithm), {}
    algorithm_values = config.read_yaml_file(path, file_sources)
    values = config.deep_merge(values, algorithm_values, path, sources)
    sources.update(file_sources)     # a key set by an extended file names that file
    for name, value in settings.items():
        key = _dotted_key(name)
        if key in FROM_ARGUMENTS or key.split(".")[0] in FROM_ARGUMENTS:
            what = FROM_ARGUMENTS.get(key, FROM_ARGUMENTS.get(key.split(".")[0]))
            raise ConfigError(f"onepass.tune({name}=...): {key} is given by the argument {what}, not a setting")
        values = config.deep_merge(values, config.nest(key, value), f"onepass.tune({name}=...)", sources)
    # The algorithm's config trains on train+validation when it sets no validation split (Random).
    dataset = algorithm_values.get("dataset")
    merge_validation = isinstance(dataset, dict) and dataset.get("validation_proportion") == 0
    proportion = 0.0 if merge_validation else validation_rows / (train_rows + validation_rows)
    values = config.deep_merge(values, config.nest("dataset.validation_proportion", proportion), "validation", sources)
    tuning = values.get("tuning", {}) if isinstance(values.get("tuning"), dict) else {}
    if validation_rows == 0 and tuning.get("hyperparameters") and \
            tuning.get("validation_data", "validation") == "validation":
        raise ConfigError(f"validation: {values.get('algorithm', algorithm)} tunes on validation data: pass "
                          f"validation=(inputs, targets)")
    cfg = config.build_config(values, sources)
    return replace(cfg, dataset=replace(cfg.dataset, name=OWN_DATA))


def _tensor(value: Any, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{what}: not a tensor or array ({util.one_line(error)})") from None


def as_split(data: Data | None, what: str) -> datasets.Split | None:
    """A tuple (inputs, targets), a datasets.Split, or a Dataset-like sequence of (input, target) pairs
    (a torch Dataset, a list), as a Split."""
    if data is None or isinstance(data, datasets.Split):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        inputs, targets = _tensor(data[0], f"{what} inputs"), _tensor(data[1], f"{what} targets")
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        try:
            pairs = [data[index] for index in range(len(data))]
            inputs = torch.stack([_tensor(pair[0], f"{what} inputs") for pair in pairs])
            targets = torch.stack([_tensor(pair[1], f"{what} targets") for pair in pairs])
        except (TypeError, IndexError, RuntimeError, KeyError) as error:
            raise ConfigError(f"{what}: expected (inputs, targets) or a Dataset of (input, target) pairs "
                              f"({util.one_line(error)})") from None
    else:
        raise ConfigError(f"{what}: expected (inputs, targets) or a Dataset of (input, target) pairs, "
                          f"got {type(data).__name__}")
    if inputs.ndim == 0 or targets.ndim == 0 or len(inputs) != len(targets):
        raise ConfigError(f"{what}: {tuple(inputs.shape)} inputs but {tuple(targets.shape)} targets: "
                          f"they need one row each per example")
    if len(inputs) == 0:
        raise ConfigError(f"{what}: no rows")
    return datasets.Split(inputs, targets)


def make_splits(train_data: Data, validation: Data | None, test: Data | None, task: str | None,
                dtype: torch.dtype, device: torch.device) -> datasets.Splits:
    """The user's data as the Splits a Learner trains on (without test, validation or else training
    stands in for it, so that the Test tags of the logs repeat that split)."""
    splits = {"train": as_split(train_data, "train"), "validation": as_split(validation, "validation"),
              "test": as_split(test, "test")}
    given = {name: split for name, split in splits.items() if split is not None}
    if task is None:
        task = "regression" if given["train"].targets.is_floating_point() else "classification"
    if task not in TASKS:
        raise ConfigError(f"task = {short_repr(task)}: valid: {', '.join(TASKS)}")
    row_shape = tuple(given["train"].inputs.shape[1:])
    for name, split in given.items():
        if tuple(split.inputs.shape[1:]) != row_shape:
            raise ConfigError(f"{name}: inputs of shape {tuple(split.inputs.shape[1:])} per row, but train's are "
                              f"{row_shape}")
        if task == "classification" and (split.targets.is_floating_point() or split.targets.ndim != 1):
            raise ConfigError(f"{name}: classification targets must be a vector of integer class labels, got "
                              f"{split.targets.dtype} of shape {tuple(split.targets.shape)} (task='regression'?)")

    def moved(split: datasets.Split) -> datasets.Split:
        inputs = split.inputs.to(device=device, dtype=dtype if split.inputs.is_floating_point() else None)
        targets = split.targets.to(device=device, dtype=torch.long if task == "classification" else dtype)
        return datasets.Split(inputs, targets)

    given = {name: moved(split) for name, split in given.items()}
    train_targets = given["train"].targets
    num_outputs = (int(max(split.targets.max() for split in given.values())) + 1 if task == "classification"
                   else (train_targets.shape[1] if train_targets.ndim > 1 else 1))
    return datasets.Splits(train=given["train"], validation=given.get("validation"),
                           test=given.get("test", given.get("validation", given["train"])), task=task,
                           input_shape=row_shape, num_outputs=num_outputs)


def tune(model: nn.Module, loss: LossFunction | str,
         train_data: Data, validation: Data | None = None, algorithm: str = "Ours_LR_Momentum", *,
         test: Data | None = None, task: str | None = None,
         callback: Callable[[Window], bool | None] | None = None,
         log_dir: str | Path | None = None, **settings: Any) -> Result:
    """Train `model` on `train_data` while `algorithm` tunes its hyperparameters on `validation`.

    model: any nn.Module whose forward takes a batch of inputs; trained in place (moved to the
        run's device and dtype: float64 if its parameters are, unless `dtype=` says otherwise).
    loss: loss(outputs, targets) -> the batch's mean loss (a scalar tensor), e.g.
        nn.functional.mse_loss, or the name 'mse' or 'cross_entropy'. It must be twice
        differentiable for the implicit algorithms.
    train_data, validation, test: (inputs, targets) tensors or arrays with one row per example, or a
        Dataset-like sequence of (input, target) pairs. Algorithms that tune on validation data need
        `validation`; those that train on train+validation (Random, Random_SteppedLR) train on both.
    algorithm: a config in configs/ (see `algorithm_names()`), or a path to an algorithm YAML.
    task: 'regression' or 'classification' (accuracy logged); default: classification when the
        training targets are integers.
    callback: called after every window with a `Window`; returning True stops the run there
        (status 'interrupted').
    log_dir: log the run as train.py does (config.json, metrics.json, TensorBoard events) into a new
        directory below log_dir/own/<algorithm>/; see it with `tensorboard --logdir log_dir`.
    **settings: config keys (see the module's docstring), e.g. lr=1e-3, hyperparameter_steps=200,
        network_weight_steps=10, batch_size=64, seed=0. With a seed, torch's global random generator
        is seeded with it (and the data order depends on it only), so a run is reproducible.

    Bad inputs raise ConfigError (a ValueError) with a one-line message, before training starts.
    """
    loss_fn = _checked_arguments(model, loss, callback)
    if "dtype" not in settings and next(model.parameters()).dtype == torch.float64:
        settings["dtype"] = "float64"
    train_split, validation_split = as_split(train_data, "train"), as_split(validation, "validation")
    cfg = make_config(algorithm, settings, len(validation_split) if validation_split is not None else 0,
                      len(train_split))
    if log_dir is not None:
        cfg = replace(cfg, log_root=str(log_dir))
        run_files.check_outputs(cfg, None)
    cfg = util.seeded(cfg)
    device, dtype = distributed.resolve_device(cfg.device), getattr(torch, cfg.dtype)
    splits = make_splits(train_split, validation_split, test, task, dtype, device)
    if cfg.dataset.validation_proportion == 0 and splits.validation is not None:   # Random: train on both
        both = datasets.Split(torch.cat([splits.train.inputs, splits.validation.inputs]),
                              torch.cat([splits.train.targets, splits.validation.targets]))
        splits = replace(splits, train=both, validation=None, test=splits.test if test is not None else both)
    datasets.check_batch_size(cfg.batch_size, splits.train)
    model.to(device=device, dtype=dtype)
    measure.check_fit(model, loss_fn, splits, "model", loss if isinstance(loss, str) else None)
    cfg = replace(cfg, threads=cfg.threads or train.default_threads(model))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        return _run(train.Setup(cfg, device, splits, model, loss_fn), callback, log_dir is not None, test is not None)
    finally:
        torch.set_num_threads(threads_before)


def _checked_arguments(model: nn.Module, loss: LossFunction | str,
                       callback: Callable[[Window], bool | None] | None) -> LossFunction:
    """`tune`'s model, loss and callback checked before any work (a ConfigError names the bad one);
    returns the loss function, a loss's name resolved."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not list(model.parameters()):
        raise ConfigError("model: it has no parameters to train")
    if isinstance(loss, str):
        if loss not in models.LOSSES:
            raise ConfigError(f"loss {short_repr(loss)} is unknown; valid: {', '.join(models.LOSSES)}, or a callable")
        loss_fn = models.build_loss(loss)
    elif callable(loss):
        loss_fn = loss
    else:
        raise ConfigError(f"loss: expected a callable loss(outputs, targets) -> tensor, or 'mse' or "
                          f"'cross_entropy', got {type(loss).__name__}")
    if callback is not None and not callable(callback):
        raise ConfigError(f"callback: expected a callable, got {type(callback).__name__}")
    return loss_fn


def _run(setup: train.Setup, callback: Callable[[Window], bool | None] | None, logged: bool,
         has_test: bool) -> Result:
    cfg, run_dir, log = setup.cfg, None, None
    if logged:
        run_dir, log = run_files.open_run(cfg, distributed.SINGLE)
    learner = train.Learner(setup)
    train.start_log(learner, log, resumed=False)
    stop = False

    def after_window(learner: train.Learner) -> None:
        nonlocal stop
        record = learner.record
        stop = bool(callback(Window(record.windows_done, record.steps_done, _natural(learner), learner.model)))
    try:
        metrics = learner.run(after_window=after_window if callback is not None else None,
                              stop_requested=lambda: stop)
    finally:
        if log is not None:
            log.close()
    if not has_test:       # the Test tags measured a stand-in split
        metrics["final"] = {tag: value for tag, value in metrics["final"].items() if not tag.endswith("/Test")}
    if log is not None:
        metrics = run_files.close_run(run_dir, log, metrics, cfg, distributed.SINGLE)
    else:
        metrics |= {"seed": cfg.seed, "threads": cfg.threads}
    return Result(setup.model, _natural(learner), metrics, cfg, run_dir)


def _natural(learner: train.Learner) -> dict[str, float]:
    """The hyperparameters' natural values by name (lr, weight_decay, momentum, ...)."""
    return {tag.split("/", 1)[1].lower(): value for tag, value in learner.hyperparameters.log_values().items()}
