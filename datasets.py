"""Datasets: registry, train/validation/test splits, normalisation, minibatch streams.

Every dataset is a table of inputs and targets in a fixed order. The first `train_val_size` rows are
train+validation, the last `test_size` rows the test set. Train+validation is split contiguously,
training rows first, with `rint(n * validation_proportion)` validation rows. Normalisation
statistics come from train+validation only and are applied to all three splits.
"""
from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from onepass import distributed
from onepass.schema import ConfigError

if TYPE_CHECKING:
    from onepass.schema import Config, DatasetConfig

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"


class DatasetMissing(ConfigError):
    """A processed dataset file is absent; the message says which command creates it."""


class DatasetDamaged(ConfigError):
    """A processed dataset file that cannot be used as it is; the message says how to re-create it."""


class RawData(NamedTuple):
    inputs: np.ndarray         # rows of features, or images (n, C, H, W); for token data, train+validation tokens
    targets: np.ndarray        # (n, 1) targets or class labels; for token data, the test tokens
    test_size: int             # the last `test_size` rows are the test set (token data: unused)
    vocabulary_size: int = 0   # token data only


@dataclass(frozen=True)
class DatasetSpec:
    task: str                  # "regression", "classification" or "language_model"
    load: Callable[[str, Path], RawData]                     # (name, data_dir) -> raw data
    size: int | None = None    # rows expected (None: whatever the processed file holds)
    normalise: Callable[[np.ndarray, int], np.ndarray] | None = None   # (inputs, train_val rows) -> inputs
    raw_name: str = ""         # folder name of the raw files, for the download script


def processed_path(name: str, data_dir: Path) -> Path:
    return Path(data_dir) / f"{name}.npz"


def rebuild_command(name: str) -> str:
    """The command that (re-)creates a processed dataset file."""
    return (f"python download_and_process_data.py {name} --source ../shared/data "
            f"(or without --source to download it)")


def _damaged(name: str, path: Path, problem: str) -> DatasetDamaged:
    return DatasetDamaged(f"processed dataset '{name}' at {path} {problem}; re-create it with: "
                          f"{rebuild_command(name)}")


def _read_processed(name: str, data_dir: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Every array of `<data_dir>/<name>.npz` (no pickles), which must hold `required`."""
    path = processed_path(name, data_dir)
    if not path.is_file():
        raise DatasetMissing(f"processed dataset '{name}' not found at {path}; create it with: "
                             f"{rebuild_command(name)}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise _damaged(name, path, f"is not a readable .npz file ({type(error).__name__})") from None
    missing = [key for key in required if key not in arrays]
    if missing:
        raise _damaged(name, path, f"lacks the array(s) {', '.join(missing)}")
    return arrays


def _check_table(name: str, path: Path, inputs: np.ndarray, targets: np.ndarray) -> None:
    """Inputs: rows of numbers (or images), finite; targets: one finite number per row."""
    for what, array, ndims in (("inputs", inputs, (2, 4)), ("targets", targets, (2,))):
        if array.dtype.kind not in "fiu" or array.ndim not in ndims:
            raise _damaged(name, path, f"holds {what} of dtype {array.dtype} and shape {array.shape}, not "
                                       f"{' or '.join(f'{n}-D' for n in ndims)} numbers")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise _damaged(name, path, f"holds non-finite {what} (NaN or infinity)")
    if targets.shape != (len(inputs), 1):
        raise _damaged(name, path, f"holds targets of shape {targets.shape} for {len(inputs)} input rows, "
                                   f"not ({len(inputs)}, 1)")


def load_processed(name: str, data_dir: Path) -> RawData:
    """Read `<data_dir>/<name>.npz`, written by download_and_process_data.py (no pickles)."""
    arrays = _read_processed(name, data_dir, ("inputs", "targets"))
    path = processed_path(name, data_dir)
    _check_table(name, path, arrays["inputs"], arrays["targets"])
    test_size = arrays["test_size"] if "test_size" in arrays else UCI_SETS[name][2]
    if np.ndim(test_size) != 0 or not 0 < int(test_size) < len(arrays["inputs"]):
        raise _damaged(name, path, f"has test_size {test_size}, not a count of its {len(arrays['inputs'])} rows")
    return RawData(arrays["inputs"], arrays["targets"], int(test_size))


def load_tokens(name: str, data_dir: Path) -> RawData:
    """A processed text corpus: train+validation and test token ids, and the vocabulary's size."""
    arrays = _read_processed(name, data_dir, ("train_val", "test", "vocabulary"))
    vocabulary = arrays["vocabulary"]
    for what in ("train_val", "test"):
        tokens = arrays[what]
        if tokens.dtype.kind not in "iu" or tokens.ndim != 1 or (
                len(tokens) and not 0 <= tokens.min() <= tokens.max() < len(vocabulary)):
            raise _damaged(name, processed_path(name, data_dir), f"holds {what} that are not token ids of its "
                                                                 f"{len(vocabulary)}-word vocabulary")
    return RawData(arrays["train_val"], arrays["test"], len(arrays["test"]), len(vocabulary))


def _load_sklearn(loader: str) -> Callable[[str, Path], RawData]:
    """A set bundled with scikit-learn (sklearn.datasets.<loader>), in a fixed shuffled order."""
    def load(name: str, data_dir: Path) -> RawData:
        import sklearn.datasets
        inputs, targets = getattr(sklearn.datasets, loader)(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(inputs))
        return RawData(inputs[order], targets[order, None], SKLEARN_TEST_SIZES[name])
    return load


def normalise_channels(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[np.ndarray, int], np.ndarray]:
    """Scale 8-bit images to [0, 1], then standardise each channel with fixed statistics."""
    def normalise(images: np.ndarray, train_val_rows: int) -> np.ndarray:
        shape = (1, -1) + (1,) * (images.ndim - 2)
        return (images / 255.0 - np.reshape(mean, shape)) / np.reshape(std, shape)
    return normalise


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
SKLEARN_TEST_SIZES = {"diabetes": 44, "digits": 180}
# CIFAR-10's standard per-channel statistics of the [0, 1]-scaled training images.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

DATASETS: dict[str, DatasetSpec] = {
    "diabetes": DatasetSpec("regression", _load_sklearn("load_diabetes"), 442),
    "digits": DatasetSpec("classification", _load_sklearn("load_digits"), 1797),
    **{name: DatasetSpec("regression", load_processed, train_val + test, raw_name=raw)
       for name, (raw, train_val, test) in UCI_SETS.items()},
    "fashion_mnist": DatasetSpec("classification", load_processed, 70000, raw_name="fashion-mnist"),
    "cifar10": DatasetSpec("classification", load_processed, None, normalise_channels(CIFAR10_MEAN, CIFAR10_STD),
                           raw_name="cifar10"),
    "penn_treebank": DatasetSpec("language_model", load_tokens, raw_name="ptb"),
    "penn_treebank_small": DatasetSpec("language_model", load_tokens, raw_name="ptb"),
}


@dataclass
class Split:
    inputs: torch.Tensor
    targets: torch.Tensor
    sequential: bool = False    # rows are consecutive time steps of parallel token streams (columns)

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class Splits:
    train: Split
    validation: Split | None    # None when validation_proportion is 0
    test: Split
    task: str
    input_shape: tuple[int, ...]   # of one input row: (features,), (C, H, W), or () for tokens
    num_outputs: int               # regression targets, classes or vocabulary size
    target_std: float | None = None   # scale that unnormalises regression targets, if normalised

    @property
    def num_inputs(self) -> int:
        return self.input_shape[0]


def check_batch_size(batch_size: int | None, train: Split) -> None:
    """Refuse a batch larger than the training split: it would silently be the whole split."""
    if batch_size is not None and batch_size > len(train):
        rows = "time steps in the training streams" if train.sequential else "training rows"
        raise ConfigError(f"batch_size = {batch_size} is more than the {len(train)} {rows}: use at most "
                          f"{len(train)}, or batch_size: null for full-batch training")


def split_sizes(cfg: DatasetConfig, train_val_size: int) -> tuple[int, int]:
    """(training rows, validation rows); a ConfigError when the validation proportion takes them all."""
    validation = int(np.rint(train_val_size * cfg.validation_proportion))
    if validation >= train_val_size:
        raise ConfigError(f"dataset.validation_proportion = {cfg.validation_proportion} leaves no training rows of "
                          f"dataset '{cfg.name}' ({train_val_size} train+validation rows): lower it")
    return train_val_size - validation, validation


def standardise(train_val: np.ndarray, *arrays: np.ndarray, per_feature: bool) -> tuple[list, np.ndarray]:
    """Standardise `arrays` with the mean and std of `train_val`.

    A constant column maps to exactly 0: its computed std is rounding noise (naval's 0.998 column
    has std 2e-13), which would otherwise blow up into values of order 1.
    """
    axis = 0 if per_feature else None
    constant = train_val.max(axis=axis) == train_val.min(axis=axis)
    mean = np.where(constant, train_val.min(axis=axis), train_val.mean(axis=axis, dtype=np.float64))
    std = np.where(constant, 1.0, train_val.std(axis=axis, dtype=np.float64))
    return [((a - mean) / std).astype(a.dtype) for a in arrays], std


def standardise_features(inputs: np.ndarray, train_val_rows: int) -> np.ndarray:
    return standardise(inputs[:train_val_rows], inputs, per_feature=True)[0][0]


def make_splits(cfg: DatasetConfig, dtype: torch.dtype, device: torch.device) -> Splits:
    """Load a dataset and cut it into train / validation / test tensors on `device`."""
    spec = DATASETS[cfg.name]
    raw = spec.load(cfg.name, Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR)
    if spec.task == "language_model":
        return make_sequence_splits(cfg, raw, device)
    if spec.size is not None and len(raw.inputs) != spec.size:
        raise ConfigError(f"dataset '{cfg.name}' has {len(raw.inputs)} rows, expected {spec.size}; "
                          f"re-create it with: {rebuild_command(cfg.name)}")
    # 8-bit images become floats of the run's precision; tables are processed in float64.
    work_dtype = np.float32 if raw.inputs.dtype == np.uint8 and dtype != torch.float64 else np.float64
    inputs, targets = raw.inputs.astype(work_dtype), raw.targets.astype(np.float64)
    train_val_size = len(inputs) - raw.test_size
    target_std = None
    if cfg.normalise_inputs:
        inputs = (spec.normalise or standardise_features)(inputs, train_val_size).astype(work_dtype)
    if cfg.normalise_outputs and spec.task == "regression":
        (targets,), std = standardise(targets[:train_val_size], targets, per_feature=False)
        target_std = float(std)

    classification = spec.task == "classification"

    def split(rows: slice) -> Split:
        # Class labels become the 1-D integer vector that CrossEntropyLoss expects.
        split_targets = torch.as_tensor(targets[rows, 0], dtype=torch.long, device=device) if classification \
            else torch.as_tensor(targets[rows], dtype=dtype, device=device)
        return Split(torch.as_tensor(inputs[rows], dtype=dtype, device=device), split_targets)

    n_train, n_validation = split_sizes(cfg, train_val_size)
    return Splits(
        train=split(slice(0, n_train)),
        validation=split(slice(n_train, train_val_size)) if n_validation else None,
        test=split(slice(train_val_size, len(inputs))),
        task=spec.task, input_shape=inputs.shape[1:], target_std=target_std,
        num_outputs=int(targets.max()) + 1 if classification else targets.shape[1])


def make_sequence_splits(cfg: DatasetConfig, raw: RawData, device: torch.device) -> Splits:
    """Token streams for truncated-BPTT language modelling, as in Zaremba et al.'s setup.

    Each token sequence is cut into `sequence_streams` contiguous streams, the columns of a
    (time, stream) table; row t's target is row t + 1. Train+validation rows are split
    contiguously in time (so validation is the tail of every stream), test is its own table.
    """
    streams = cfg.sequence_streams

    def table(tokens: np.ndarray, what: str) -> torch.Tensor:
        rows = len(tokens) // streams
        if rows < 2:
            raise ConfigError(f"dataset '{cfg.name}': its {what} ({len(tokens)} tokens) is too short for "
                              f"dataset.sequence_streams = {streams}")
        return torch.as_tensor(tokens[:rows * streams], dtype=torch.long, device=device).view(streams, rows).t()

    def pairs(tokens: torch.Tensor, start: int, stop: int) -> Split:
        return Split(tokens[start:stop], tokens[start + 1:stop + 1], sequential=True)

    train_val, test = table(raw.inputs, "train+validation text"), table(raw.targets, "test text")
    n_train, n_validation = split_sizes(cfg, len(train_val) - 1)
    return Splits(
        train=pairs(train_val, 0, n_train),
        validation=pairs(train_val, n_train, n_train + n_validation) if n_validation else None,
        test=pairs(test, 0, len(test) - 1),
        task="language_model", input_shape=(), num_outputs=raw.vocabulary_size)


class Carry:
    """The recurrent state passed along a token stream: what enters the next batch."""

    def __init__(self, hidden: tuple[torch.Tensor, ...] | None = None):
        self.hidden = hidden


class Batch(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor
    fraction: float           # this rank's share of the global batch's rows (1.0 on one process)
    hidden: tuple[torch.Tensor, ...] | None = None   # token streams: the recurrent state entering the batch
    carry: Carry | None = None                       # token streams: where the state leaving it goes


def shard_batch(split: Split, context: distributed.Context) -> Batch:
    """This rank's part of a whole split: contiguous rows, or for token streams contiguous streams
    (each then starting from an empty recurrent state)."""
    if split.sequential:
        streams = _my_range(split.inputs.shape[1], context)
        fraction = (streams.stop - streams.start) / split.inputs.shape[1]
        return Batch(split.inputs[:, streams], split.targets[:, streams], fraction, None, Carry())
    if not context.active:
        return Batch(split.inputs, split.targets, 1.0)
    rows = _my_range(len(split), context)
    return Batch(split.inputs[rows], split.targets[rows], (rows.stop - rows.start) / len(split))


def _my_range(count: int, context: distributed.Context) -> slice:
    """This rank's contiguous share of `count` items (sizes differ by at most 1)."""
    mine = distributed.shard(torch.arange(count), context)
    return slice(int(mine[0]), int(mine[-1]) + 1) if len(mine) else slice(0, 0)


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
        self._whole = shard_batch(split, context)
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


class SequenceStream:
    """Consecutive chunks of `length` time steps of a token-stream Split (truncated BPTT), this
    rank's share of the streams in each. The recurrent state is carried from chunk to chunk (the
    model leaves it in `carry`, detached) and cleared when the split starts over."""

    def __init__(self, split: Split, length: int, context: distributed.Context = distributed.SINGLE):
        self.split, self.length, self.context = split, length, context
        self._whole = shard_batch(split, context)
        self._streams = _my_range(split.inputs.shape[1], context)
        self.carry = Carry()
        self._position = 0

    def __iter__(self) -> SequenceStream:
        return self

    def state_dict(self) -> dict:
        """Position and the recurrent state of every stream, gathered from all ranks (collective)."""
        hidden = self.carry.hidden
        if hidden is not None and self.context.active:
            full = [h.new_zeros(h.shape[0], self.split.inputs.shape[1], *h.shape[2:]) for h in hidden]
            for whole, mine in zip(full, hidden, strict=True):
                whole[:, self._streams] = mine
            hidden = tuple(distributed.all_reduce_(full, self.context))
        return {"position": self._position, "hidden": hidden}

    def load_state_dict(self, state: dict) -> None:
        self._position, hidden = state["position"], state["hidden"]
        device = self.split.inputs.device
        self.carry.hidden = None if hidden is None else tuple(h[:, self._streams].to(device) for h in hidden)

    def __next__(self) -> Batch:
        if self._position >= len(self.split):
            self._position, self.carry.hidden = 0, None
        rows = slice(self._position, self._position + self.length)
        self._position += self.length
        whole = self._whole
        return Batch(whole.inputs[rows], whole.targets[rows], whole.fraction, self.carry.hidden, self.carry)


def stream(split: Split, batch_size: int | None, generator: torch.Generator,
           context: distributed.Context = distributed.SINGLE) -> BatchStream | SequenceStream:
    """The minibatch stream suited to `split`: shuffled rows, or consecutive chunks of token streams."""
    if split.sequential:
        return SequenceStream(split, batch_size, context)
    return BatchStream(split, batch_size, generator, context)


# Each stream's generator is seeded with the run's seed plus its own offset: the training order must
# not depend on how often the other streams are read.
STREAM_OFFSETS = {"train": 1, "validation": 2, "hyper": 3, "test": 4}


@dataclass
class Streams:
    """A run's minibatch streams: training batches; validation and test batches for intermediate
    measurements (None: those use the whole split); the hypergradient's batches (None: no split for it)."""
    train: BatchStream | SequenceStream
    validation: BatchStream | SequenceStream | None
    hyper: BatchStream | SequenceStream | None
    test: BatchStream | SequenceStream | None

    @classmethod
    def of(cls, cfg: Config, splits: Splits, context: distributed.Context) -> Streams:
        def make(name: str, split: Split | None, batch_size: int | None = cfg.batch_size) -> BatchStream | None:
            generator = torch.Generator().manual_seed(cfg.seed + STREAM_OFFSETS[name])
            return None if split is None else stream(split, batch_size, generator, context)
        measured_validation = None if cfg.dataset.full_validation else splits.validation
        measured_test = None if cfg.dataset.test_batch_size is None else splits.test
        hyper = splits.train if cfg.tuning.validation_data == "training" else splits.validation
        return cls(make("train", splits.train), make("validation", measured_validation), make("hyper", hyper),
                   make("test", measured_test, cfg.dataset.test_batch_size))

    def named(self) -> dict[str, BatchStream | SequenceStream]:
        return {name: stream for name, stream in vars(self).items() if stream is not None}

    def state_dict(self) -> dict:
        return {name: stream.state_dict() for name, stream in self.named().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, stream in self.named().items():
            stream.load_state_dict(state[name])
