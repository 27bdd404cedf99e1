"""Datasets: registry, train/validation/test splits, normalisation, minibatch streams.

Every dataset is a table of inputs and targets in a fixed order. The first `train_val_size` rows are
train+validation, the last `test_size` rows the test set. Train+validation is split contiguously,
training rows first, with `rint(n * validation_proportion)` validation rows. Normalisation
statistics come from train+validation only and are applied to all three splits.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from algorithms import distributed
from config import ConfigError

if TYPE_CHECKING:
    from config import DatasetConfig

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"


class DatasetMissing(ConfigError):
    """A processed dataset file is absent; the message says which command creates it."""


@dataclass(frozen=True)
class DatasetSpec:
    task: str                      # "regression" or "classification"
    train_val_size: int
    test_size: int
    load: Callable[[str, Path], tuple[np.ndarray, np.ndarray]]   # (name, data_dir) -> (inputs, targets)
    raw_name: str = ""             # folder name of the raw files, for the download script

    @property
    def size(self) -> int:
        return self.train_val_size + self.test_size


def processed_path(name: str, data_dir: Path) -> Path:
    return Path(data_dir) / f"{name}.npz"


def load_processed(name: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read `<data_dir>/<name>.npz`, written by download_and_process_data.py (no pickles)."""
    path = processed_path(name, data_dir)
    if not path.is_file():
        raise DatasetMissing(f"processed dataset '{name}' not found at {path}; create it with: "
                             f"python download_and_process_data.py {name} --source ../shared/data "
                             f"(or without --source to download it)")
    with np.load(path, allow_pickle=False) as archive:
        return archive["inputs"], archive["targets"]


def load_diabetes(name: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled diabetes regression set (442 x 10), in a fixed shuffled order."""
    from sklearn.datasets import load_diabetes as sklearn_diabetes
    inputs, targets = sklearn_diabetes(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(inputs))
    return inputs[order], targets[order, None]


def load_digits(name: str, data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), in a fixed shuffled order."""
    from sklearn.datasets import load_digits as sklearn_digits
    inputs, targets = sklearn_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(inputs))
    return inputs[order], targets[order, None]


# The UCI regression sets as distributed by Gal & Ghahramani, with the original's split sizes.
UCI_SETS = {
    "uci_boston": ("bostonHousing", 455, 51),
    "uci_concrete": ("concrete", 927, 103),
    "uci_energy": ("energy", 692, 76),
    "uci_kin8nm": ("kin8nm", 7373, 819),
    "uci_naval": ("naval-propulsion-plant", 10741, 1193),
    "uci_power": ("power-plant", 8611, 957),
    "uci_wine": ("wine-quality-red", 1439, 160),
    "uci_yacht": ("yacht", 277, 31),
}

DATASETS: dict[str, DatasetSpec] = {
    "diabetes": DatasetSpec("regression", 398, 44, load_diabetes),
    "digits": DatasetSpec("classification", 1617, 180, load_digits),
    **{name: DatasetSpec("regression", train_val, test, load_processed, raw)
       for name, (raw, train_val, test) in UCI_SETS.items()},
}


@dataclass
class Split:
    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class Splits:
    train: Split
    validation: Split | None    # None when validation_proportion is 0
    test: Split
    task: str
    num_inputs: int
    num_outputs: int               # regression targets, or classes
    target_std: float | None    # scale that unnormalises regression targets, if normalised


def split_sizes(train_val_size: int, validation_proportion: float) -> tuple[int, int]:
    validation = int(np.rint(train_val_size * validation_proportion))
    return train_val_size - validation, validation


def standardise(train_val: np.ndarray, *arrays: np.ndarray, per_feature: bool) -> tuple[list, np.ndarray]:
    """Standardise `arrays` with the mean and std of `train_val`.

    A constant column maps to exactly 0: its computed std is rounding noise (naval's 0.998 column
    has std 2e-13), which would otherwise blow up into values of order 1.
    """
    axis = 0 if per_feature else None
    constant = train_val.max(axis=axis) == train_val.min(axis=axis)
    mean = np.where(constant, train_val.min(axis=axis), train_val.mean(axis=axis))
    std = np.where(constant, 1.0, train_val.std(axis=axis))
    return [(a - mean) / std for a in arrays], std


def make_splits(cfg: DatasetConfig, dtype: torch.dtype, device: torch.device) -> Splits:
    """Load a dataset and cut it into train / validation / test tensors on `device`."""
    spec = DATASETS[cfg.name]
    inputs, targets = spec.load(cfg.name, Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR)
    if len(inputs) != spec.size:
        raise ConfigError(f"dataset '{cfg.name}' has {len(inputs)} rows, expected {spec.size}; "
                         f"re-create it with download_and_process_data.py")
    inputs, targets = inputs.astype(np.float64), targets.astype(np.float64)
    train_val = slice(0, spec.train_val_size)
    target_std = None
    if cfg.normalise_inputs:
        (inputs,), _ = standardise(inputs[train_val], inputs, per_feature=True)
    if cfg.normalise_outputs and spec.task == "regression":
        (targets,), std = standardise(targets[train_val], targets, per_feature=False)
        target_std = float(std)

    classification = spec.task == "classification"

    def split(rows: slice) -> Split:
        # Class labels become the 1-D integer vector that CrossEntropyLoss expects.
        split_targets = torch.as_tensor(targets[rows, 0], dtype=torch.long, device=device) if classification \
            else torch.as_tensor(targets[rows], dtype=dtype, device=device)
        return Split(torch.as_tensor(inputs[rows], dtype=dtype, device=device), split_targets)

    n_train, n_validation = split_sizes(spec.train_val_size, cfg.validation_proportion)
    return Splits(
        train=split(slice(0, n_train)),
        validation=split(slice(n_train, spec.train_val_size)) if n_validation else None,
        test=split(slice(spec.train_val_size, spec.size)),
        task=spec.task, num_inputs=inputs.shape[1], target_std=target_std,
        num_outputs=int(targets.max()) + 1 if classification else targets.shape[1])


class Batch(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor
    fraction: float           # this rank's share of the global batch's rows (1.0 on one process)


def shard_batch(inputs: torch.Tensor, targets: torch.Tensor, context: distributed.Context) -> Batch:
    """This rank's contiguous rows of a global batch (all of them on one process)."""
    if not context.active:
        return Batch(inputs, targets, 1.0)
    rows = distributed.shard(torch.arange(len(inputs)), context)
    start, stop = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
    return Batch(inputs[start:stop], targets[start:stop], (stop - start) / len(inputs))


class BatchStream:
    """Endless minibatches from a Split: a fresh random order every epoch, this rank's shard of each.

    Every rank draws the same global batch (the generator is seeded alike everywhere) and keeps its
    contiguous part. With `batch_size=None` (or at least the split's size) every global batch is
    the whole split, in a fixed order, so full-batch training does no indexing work at all.
    """

    def __init__(self, split: Split, batch_size: int | None, generator: torch.Generator,
                 context: distributed.Context = distributed.SINGLE):
        self.split = split
        self.full_batch = batch_size is None or batch_size >= len(split)
        self.batch_size = len(split) if self.full_batch else batch_size
        self.generator = generator
        self.context = context
        self._whole = shard_batch(split.inputs, split.targets, context)
        self._order = torch.empty(0, dtype=torch.long)
        self._position = 0

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self._order, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order, self._position = state["order"].to(self.split.inputs.device), state["position"]

    def __next__(self) -> Batch:
        if self.full_batch:
            return self._whole
        if self._position >= len(self._order):
            self._order = torch.randperm(len(self.split), generator=self.generator).to(self.split.inputs.device)
            self._position = 0
        rows = self._order[self._position:self._position + self.batch_size]
        self._position += self.batch_size
        mine = distributed.shard(rows, self.context)
        return Batch(self.split.inputs[mine], self.split.targets[mine], len(mine) / len(rows))
