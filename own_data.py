"""A user's own data, named in a config as `dataset.name: package.module:factory`.

The factory is called with the config's `dataset` section (`schema.DatasetConfig`; `data_dir` and
any other key are the user's to use or ignore) and returns the whole table, as the registered
datasets load theirs:

    datasets.RawData(inputs, targets, test_size)      # or the plain tuple (inputs, targets, test_size)

- inputs: numbers (NumPy array, torch tensor or nested lists), one row per example: (n, features)
  for a table, (n, C, H, W) for images;
- targets: one row per example: (n,) or (n, k) floats for regression (k targets), (n,) or (n, 1)
  integer class labels 0 .. K-1 for classification (integer targets make it a classification task);
- test_size: the last `test_size` rows are the test set, 0 < test_size < n.

The framework then cuts it as it cuts every registered dataset (datasets.py): train+validation
first, its last `rint(n * dataset.validation_proportion)` rows the validation split, inputs (and,
with dataset.normalise_outputs, regression targets) standardised with train+validation statistics.
A table rather than fixed splits, so that every algorithm config's validation_proportion applies
(Random trains on train+validation, Ours holds a validation split out), as on the registered data.
Whatever else the factory returns is a one-line ConfigError saying what is wrong.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from onepass import factories, util
from onepass.schema import ConfigError, short_repr

if TYPE_CHECKING:
    from onepass.schema import DatasetConfig

RETURNS = "datasets.RawData(inputs, targets, test_size)"


def load(cfg: DatasetConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(inputs, targets as (n, k), test_size) of the user's factory, checked; a ConfigError else."""
    where = f"dataset.name = {cfg.name!r}"
    try:
        result = factories.call(factories.factory(cfg.name, RETURNS), cfg)
        return _checked(result)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def _checked(result: Any) -> tuple[np.ndarray, np.ndarray, int]:
    # RawData is a tuple, with a token-data field that stays 0 here.
    if not isinstance(result, tuple) or len(result) != 3 and (len(result) != 4 or result[3]):
        raise ConfigError(f"the factory returned {_described(result)}, not {RETURNS}")
    inputs, targets, test_size = _array(result[0], "inputs"), _array(result[1], "targets"), result[2]
    if inputs.ndim < 2 or targets.ndim not in (1, 2):
        raise ConfigError(f"the factory returned inputs of shape {inputs.shape} and targets of shape {targets.shape}: "
                          f"inputs need one row per example ((n, features) or (n, C, H, W)), targets (n,) or (n, k)")
    if len(inputs) != len(targets):
        raise ConfigError(f"the factory returned {len(inputs)} input rows but {len(targets)} target rows: "
                          f"give one target row per input row")
    if len(inputs) < 2:
        raise ConfigError(f"the factory returned {len(inputs)} rows: a dataset needs training and test rows")
    targets = targets.reshape(len(targets), -1)
    if targets.dtype.kind in "iu" and (targets.shape[1] != 1 or targets.min() < 0):
        raise ConfigError(f"the factory returned integer targets of shape {targets.shape} from {targets.min()}: "
                          f"integer targets are class labels, one per row, from 0 (floats for regression)")
    if isinstance(test_size, bool) or not isinstance(test_size, (int, np.integer)) \
            or not 0 < test_size < len(inputs):
        raise ConfigError(f"the factory returned test_size = {short_repr(test_size)}: it must be a whole number "
                          f"of test rows (the last ones), from 1 to {len(inputs) - 1} of its {len(inputs)} rows")
    return inputs, targets, int(test_size)


def _array(value: Any, what: str) -> np.ndarray:
    """`value` as a NumPy array of finite numbers (float or integer: no booleans, strings or objects)."""
    try:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"the factory's {what} are not an array ({util.one_line(error)})") from None
    if array.dtype.kind not in "fiu":
        raise ConfigError(f"the factory's {what} have dtype {array.dtype}: they must be numbers (float or "
                          f"integer; convert booleans, strings and objects)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ConfigError(f"the factory's {what} hold non-finite values (NaN or infinity): remove or impute them")
    return array


def _described(value: Any) -> str:
    kind = type(value).__name__
    return f"a {kind} of {len(value)} items" if isinstance(value, tuple) else f"a {kind}"
