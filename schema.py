"""The configuration schema: what a run's `Config` holds, each key's documentation, default and
valid range, and `ConfigError`. The bottom layer of the project: it imports none of its modules.

Names that must be registered somewhere (datasets, models, algorithm families, ...) are declared here by the
registry they belong to (`choices="datasets"`) and checked one layer up, by config.py, which reads
YAML files and command lines into a validated Config.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A bad configuration, described in one line."""


# Upper bounds of integer keys: far above any real run, low enough that a typo (10**30) is an error
# instead of a run that never ends, an allocation that fails or an integer overflow in torch.
MAX_COUNT = 10**9           # steps, batch sizes, tasks
MAX_WIDTH = 10**6           # layer widths, streams, points, dimensions
MAX_SEED = 2**63 - 1        # seeds are offset per stream and must stay within torch's 64 bits
MAX_NAME = 100              # characters of a run or group name
QUOTE_LENGTH = 80           # characters of a value quoted in an error message


def short(text: str, limit: int = QUOTE_LENGTH) -> str:
    """`text` cut to `limit` characters (with an ellipsis): error messages stay one short line."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def short_repr(value: Any) -> str:
    """repr(value) for an error message, cut to a readable length (a tuple shown as the YAML list
    it was written as)."""
    return short(repr(list(value) if isinstance(value, tuple) else value))


def option(default: Any, doc: str, *, choices: str | tuple[str, ...] | None = None,
           low: float | None = None, high: float | None = None,
           low_inclusive: bool = True, high_inclusive: bool = True,
           check: typing.Callable[[Any], str | None] | None = None) -> Any:
    """A config field with its documentation and valid range (checked by config.py). `choices`: the
    valid names, or the registry that holds them ("datasets", "models", ...); `check` returns what
    is wrong with a value, or None."""
    metadata = dict(doc=doc, choices=choices, low=low, high=high,
                    low_inclusive=low_inclusive, high_inclusive=high_inclusive, check=check)
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata=metadata)


def plain_name(name: str) -> str | None:
    """What makes `name` unfit to be one folder name below log_root, or None: it must not lead
    elsewhere (a separator, '..') nor hold control characters, and stays short."""
    if "/" in name or "\\" in name:
        return "a name, not a path: it must not contain '/' or '\\'"
    if ".." in name:
        return "a name, not a path: it must not contain '..'"
    if any(ord(character) < 32 for character in name):
        return "must not contain control characters"
    if len(name) > MAX_NAME:
        return f"must be at most {MAX_NAME} characters long, not {len(name)}"
    return None


def folder_name(dataset: str) -> str:
    """A dataset name as a file or folder name: a registered name as it is; the user's own
    `package.module:factory` as `package-module--factory`, portable (no ':', which Windows refuses) and
    with no '.' that a suffix could be taken from (figures.save replaces the suffix). Unambiguous, as no
    factory name holds a '-'."""
    return dataset.replace(":", "--").replace(".", "-")


@dataclass(frozen=True)
class DatasetConfig:
    name: str = option("diabetes", "registered dataset, or data of your own as module.path:factory (called with "
                                   "this section; returns datasets.RawData(inputs, targets, test_size), cut as "
                                   "the registered ones are; see own_data.py)", choices="datasets")
    validation_proportion: float = option(
        0.0, "fraction of train+validation held out (contiguously, at the end) for validation; "
        "0 trains on all of it and logs no validation loss", low=0.0, high=1.0, high_inclusive=False)
    normalise_inputs: bool = option(True, "standardise each input feature with train+validation statistics")
    normalise_outputs: bool = option(False, "standardise regression targets (losses are also logged unnormalised)")
    full_validation: bool = option(False, "evaluate the whole validation split at each log, not one batch")
    test_batch_size: int | None = option(
        None, "intermediate measurements of the test set use a random batch of this many rows (token "
              "streams: time steps); null = the whole test split. The final measurement always uses it all",
        low=1, high=MAX_COUNT)
    data_dir: str | None = option(None, "folder of processed datasets (default: data/ in a clone of the "
                                   "repository, ./data for an installed copy)")
    sequence_streams: int = option(40, "language-model datasets: parallel streams the token sequence is cut "
                                       "into (batch_size is then the truncated-BPTT length)",
                                    low=1, high=MAX_WIDTH)


@dataclass(frozen=True)
class ModelConfig:
    name: str = option("mlp", "registered model, or a model of your own as module.path:factory (called with "
                              "this section, the input shape and the number of outputs; see models.py)",
                       choices="models")
    layer_sizes: tuple[int, ...] = option((10, 50, 1), "widths from inputs to outputs", low=1, high=MAX_WIDTH)
    activation: str = option("relu", "hidden-layer nonlinearity", choices="activations")
    batch_norm: bool = option(False, "BatchNorm before each hidden activation")
    embedding_size: int = option(650, "lstm: width of the token embedding", low=1, high=MAX_WIDTH)
    hidden_size: int = option(650, "lstm: units per LSTM layer", low=1, high=MAX_WIDTH)
    num_layers: int = option(2, "lstm: stacked LSTM layers", low=1, high=1000)


@dataclass(frozen=True)
class OptimiserConfig:
    name: str = option("sgd", "weight-update rule: sgd or adam (PyTorch's update rules, which every tuning.method "
                              "differentiates), or a learning-rate-free optimiser of its own package for fixed "
                              "hyperparameters: prodigy, dadapt_sgd, dadapt_adam, sf_sgd, sf_adamw "
                              "(algorithms/peers.py; make peers installs them)", choices="rules")
    lr: float = option(1.0e-3, "initial learning rate", low=0.0, low_inclusive=False)
    weight_decay: float = option(0.0, "initial L2 weight decay (added to the gradient)", low=0.0)
    momentum: float = option(0.0, "initial momentum, sgd (PyTorch convention: b <- mu b + g)",
                             low=0.0, high=1.0, high_inclusive=False)
    beta1: float = option(0.9, "initial first-moment decay, adam", low=0.0, high=1.0, high_inclusive=False)
    beta2: float = option(0.999, "initial second-moment decay, adam", low=0.0, high=1.0, high_inclusive=False)
    d_coef: float = option(1.0, "prodigy: multiplier of the step size d it estimates (its authors' knob; > 1 "
                                "bolder)", low=0.0, low_inclusive=False)
    warmup_steps: int = option(0, "sf_sgd, sf_adamw: weight steps of Schedule-Free's linear lr warm-up",
                               low=0, high=MAX_COUNT)
    lr_multiplier: float | None = option(
        None, "multiply lr by this after every hyperparameter step (Random_SteppedLR)",
        low=0.0, low_inclusive=False)
    lr_bounds: tuple[float, float] = option(
        (1.0e-10, 1.0), "lr is clipped into [low, high] after each hyperparameter step",
        low=0.0, low_inclusive=False)
    gradient_clip: float | None = option(
        None, "scale the (global) weight gradient down to at most this norm before every update, as "
              "torch.nn.utils.clip_grad_norm_ does; null = no clipping", low=0.0, low_inclusive=False)


@dataclass(frozen=True)
class TuningConfig:
    method: str = option(
        "fixed", "the family of algorithm that tunes the hyperparameters: fixed keeps them (Random), implicit "
                 "differentiates through the weight update (Ours, Lorraine), unrolled through the last R weight "
                 "steps (Diff-through-Opt), baydin is the paper's hypergradient descent", choices="methods")
    hyperparameters: tuple[str, ...] = option(
        (), "hyperparameters to optimise (of optimiser.name's rule)", choices="hyperparameters")
    high_dimensional: tuple[str, ...] = option(
        (), "optimised hyperparameters that get one value per weight element", choices=("lr",))
    optimiser: str = option("adam", "hyper-optimiser, on log10 lr / log10 weight_decay / logit momentum",
                            choices=("adam", "sgd"))
    lr: float = option(0.05, "hyper-optimiser step size", low=0.0)
    rollback_distance: int = option(5, "i: Neumann-series terms of the implicit hypergradient",
                                    low=1, high=MAX_COUNT)
    unroll_steps: int | None = option(
        5, "R: weight steps differentiated through before each hyperparameter step (unrolled "
           "algorithms); null = the whole window", low=1, high=MAX_COUNT)
    reset_weights: bool = option(False, "unrolled: restart every window from the initial weights and "
                                        "optimiser state (Long Diff-through-Opt)")
    validation_data: str = option("validation", "data of the hypergradient's loss",
                                  choices=("validation", "training"))
    every_weight_step: bool = option(
        False, "a hyperparameter step after every weight step, within the same budget of H*T weight steps: "
               "the run takes H*T windows of one step (Baydin, as the paper ran it)")


@dataclass(frozen=True)
class MetaConfig:
    points: int = option(100, "learned dataset: number of points (half labelled 0, half 1)", low=2,
                         high=MAX_WIDTH)
    dimensions: int = option(2, "learned dataset: dimensions of each point", low=1, high=MAX_WIDTH)
    inner_steps: int = option(3, "SGD steps that adapt each fresh linear classifier", low=1,
                              high=MAX_COUNT)
    inner_lr: float = option(0.1, "step size of those inner SGD steps", low=0.0, low_inclusive=False)
    outer_steps: int = option(500, "outer (dataset) steps", low=1, high=MAX_COUNT)
    outer_optimiser: str = option("adam", "optimiser of the dataset", choices=("adam", "sgd"))
    outer_lr: float = option(0.05, "its step size", low=0.0, low_inclusive=False)
    evaluation_tasks: int = option(1000, "fresh classifiers adapted to the final dataset to evaluate it",
                                   low=1, high=MAX_COUNT)


@dataclass(frozen=True)
class Config:
    task: str = option("hyperparameter_optimisation", "what a run does: tune hyperparameters while "
                       "training, or learn a dataset by meta-learning (meta.*)",
                       choices=("hyperparameter_optimisation", "meta_dataset"))
    algorithm: str = option(
        "Random", "the algorithm's name (what runs is tuning.method and its settings): it labels the run's "
                  "folder <dataset>/<algorithm>, figures and tables. A name as run_group_name is", check=plain_name)
    dataset: DatasetConfig = field(default_factory=DatasetConfig, metadata=dict(doc="the data"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=dict(doc="the network"))
    loss: str = option("mse", "training and evaluation loss", choices="losses")
    optimiser: OptimiserConfig = field(default_factory=OptimiserConfig,
                                       metadata=dict(doc="weight optimiser and initial hyperparameters"))
    tuning: TuningConfig = field(default_factory=TuningConfig,
                                 metadata=dict(doc="how the hyperparameters are optimised"))
    meta: MetaConfig = field(default_factory=MetaConfig, metadata=dict(doc="the meta-learning task"))
    batch_size: int | None = option(None, "training batch size; null = the full training set", low=1,
                                    high=MAX_COUNT)
    network_weight_steps: int = option(10, "weight steps per hyperparameter step (T)", low=1,
                                       high=MAX_COUNT)
    hyperparameter_steps: int = option(400, "number of hyperparameter steps (H); H*T weight steps in all",
                                       low=1, high=MAX_COUNT)
    seed: int | None = option(None, "random seed; null draws one (recorded in config.json)", low=0,
                              high=MAX_SEED)
    device: str = option("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    dtype: str = option("float32", "precision of weights, hyperparameters and data",
                        choices=("float32", "float64"))
    threads: int | None = option(
        None, "intra-op CPU threads of each process; null = 1 for models under 1M parameters (the fastest "
              "for them, and safe on a busy machine), else this process's share of the cores. The count "
              "used is recorded in config.json; results are reproducible bit for bit at a fixed count",
        low=1, high=4096)
    log_every: int = option(10, "evaluate and log per-step scalars every this many weight steps",
                            low=1, high=MAX_COUNT)
    log_root: str = option("runs", "root folder of run directories")
    run_group_name: str | None = option(
        None, f"subfolder of log_root for this run; null = <dataset>/<algorithm>. A name, not a path: no '/', "
              f"'\\', '..' or control characters, at most {MAX_NAME} characters", check=plain_name)
    run_name: str | None = option(
        None, "suffix of the run directory's name; a name as run_group_name is", check=plain_name)

    @property
    def run_group(self) -> str:
        """The run's folder below log_root: run_group_name, or <dataset>/<algorithm> by default."""
        if self.run_group_name is not None:
            return self.run_group_name
        return "meta_dataset" if self.task == "meta_dataset" else f"{folder_name(self.dataset.name)}/{self.algorithm}"

    @property
    def total_weight_steps(self) -> int:
        return self.hyperparameter_steps * self.network_weight_steps

    @property
    def weight_step_budget(self) -> int:
        """Weight steps that train the final network: H*T, or T when every window restarts from the
        initial weights (Long Diff-through-Opt). Algorithms compared in one experiment get the same."""
        return self.network_weight_steps if self.tuning.reset_weights else self.total_weight_steps
