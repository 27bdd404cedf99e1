"""A user's own code named in a config as `module.path:callable` (`model.name`, `dataset.name`).

The callable is imported when the config is validated and called when the run is built; every way
this can fail (no such module, a module that raises, no such attribute, not callable, the callable
raising) is a one-line ConfigError, so that a mistake never shows as a traceback or a half-made run.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

from onepass import util
from onepass.schema import ConfigError

FACTORY_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_factory_name(name: str) -> bool:
    """Whether `name` has the form `module.path:attribute` of a user's factory."""
    return FACTORY_NAME.fullmatch(name) is not None


def _importable_from_working_directory() -> None:
    """`python train.py` puts the script's folder on sys.path, not the working directory (as `python
    -m` would): a module beside the user's configs must import all the same. Appended, so that it
    never shadows an installed module of the same name."""
    folder = os.getcwd()
    if folder not in sys.path:
        sys.path.append(folder)


def _import(module_name: str) -> Any:
    _importable_from_working_directory()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name) \
                and module_name[len(error.name):len(error.name) + 1] in ("", "."):
            raise ConfigError(f"no module named {error.name!r} (is it installed, on PYTHONPATH, or in the "
                              f"working directory?)") from None
        raise ConfigError(f"importing {module_name!r} failed: {type(error).__name__}: {error}") from None
    except Exception as error:      # the user's module raised while being imported
        raise ConfigError(f"importing {module_name!r} failed: {type(error).__name__}: {util.one_line(error)}") from None


def factory(name: str, returns: str) -> Callable[..., Any]:
    """The callable a `module.path:attribute` name refers to; a ConfigError naming what was not
    found. `returns` says what the callable must return, for the message about a non-callable."""
    if not is_factory_name(name):
        raise ConfigError(f"{name!r} is not of the form module.path:factory")
    module_name, _, attribute = name.partition(":")
    target = _import(module_name)
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{name!r} is a {type(target).__name__}, not a callable that returns {returns}")
    return target


def call(make: Callable[..., Any], *arguments: Any) -> Any:
    """make(*arguments), the user's code: an exception it raises becomes one line saying where."""
    try:
        return make(*arguments)
    except Exception as error:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        raise ConfigError(f"the factory raised {type(error).__name__}: {util.one_line(error)} "
                          f"({frame.filename}, line {frame.lineno})") from None
