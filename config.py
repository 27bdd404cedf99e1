"""Configuration: YAML files deep-merged in order, command-line overrides, validation.

A run is described by a frozen `Config` (nested dataclasses of schema.py). Values are in natural units
(`lr: 1.0e-3`, never its log10). Sources are applied in this order, later winning:

    defaults  <-  -c a.yaml b.yaml ...  <-  named flags (--seed, --batch_size, ...)  <-  --set k=v

Dicts merge key by key; scalars and lists are replaced. Every problem (missing file, malformed
YAML, unknown key, wrong type, value out of range, unknown name) raises `ConfigError` with one line
naming where the bad value came from, before anything else happens. Reading and merging the files
(with where each key came from) is config_files.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from typing import Any

from onepass import algorithms, datasets, models, util
from onepass.algorithms.hyperparameters import TRANSFORMS
from onepass.algorithms.peers import INSTALL as PEERS_INSTALL
from onepass.algorithms.weight_update import RULES
from onepass.config_files import deep_merge, parse_yaml_value, read_yaml_file, source_of
from onepass.schema import MAX_COUNT, Config, ConfigError, OptimiserConfig, short, short_repr


def valid_names(choices: str | tuple[str, ...]) -> list[str]:
    """The names a key accepts: its own tuple, or those of the registry schema.py names."""
    if isinstance(choices, tuple):
        return list(choices)
    if choices == "hyperparameters":
        return list(TRANSFORMS)           # in their documented order
    registries = {"datasets": datasets.DATASETS, "models": models.MODELS, "activations": models.ACTIVATIONS,
                  "losses": models.LOSSES, "methods": algorithms.METHODS, "rules": RULES}
    return sorted(registries[choices])


# ---------------------------------------------------------------------------------------------
# Building the dataclasses, with validation

def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def all_keys(cls: type = Config, prefix: tuple = ()) -> list[tuple]:
    """Every leaf key path of the schema, in declaration order."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], prefix + (f.name,))
        else:
            keys.append(prefix + (f.name,))
    return keys


def _initials(name: str) -> str:
    return "".join(word[0] for word in name.split("_") if word)


def _did_you_mean(path: tuple, siblings: list[str]) -> str:
    key = str(path[-1])
    elsewhere = [k for k in all_keys() if k[-1] == key]
    if elsewhere:   # the right key in the wrong section
        return f" (did you mean '{_dotted(elsewhere[0])}'?)"
    # An abbreviation (wd, learning_rate -> lr) or a near-miss spelling.
    close = [s for s in siblings if _initials(key) == s or _initials(s) == key] \
        or difflib.get_close_matches(key, siblings, n=1)
    if close:
        return f" (did you mean '{_dotted(path[:-1] + (close[0],))}'?)"
    return ""


def _build(cls: type, values: dict, sources: dict, prefix: tuple = ()) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            path = prefix + (key,)
            raise ConfigError(f"{source_of(sources, path)}: unknown key '{short(_dotted(path))}'"
                              + _did_you_mean(path, names))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        path, value = prefix + (f.name,), values[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source_of(sources, path)}: '{_dotted(path)}' must be a mapping "
                                  f"of its sub-keys, got {short_repr(value)}")
            kwargs[f.name] = _build(hints[f.name], value, sources, path)
        else:
            kwargs[f.name] = _check_value(value, hints[f.name], f.metadata, path, sources)
    return cls(**kwargs)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if args[-1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    return annotation.__name__


def _coerce(value: Any, annotation: Any) -> Any:
    """Convert a YAML value to `annotation`, or raise TypeError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, inner[0])
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise TypeError
        return tuple(_coerce(v, args[0]) for v in value)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _to_float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (bool, str) and type(value) is annotation:
        return value
    raise TypeError


def _to_float(number: int | float) -> float:
    try:
        return float(number)
    except OverflowError:       # an integer beyond float's range: refused as not finite
        return math.inf


def _check_value(value: Any, annotation: Any, meta: dict, path: tuple, sources: dict) -> Any:
    where = f"{source_of(sources, path)}: {_dotted(path)}"
    try:
        value = _coerce(value, annotation)
    except TypeError:
        raise ConfigError(f"{where} must be {_type_name(annotation)}, got {short_repr(value)}") from None
    if value is None:
        return value
    for item in value if isinstance(value, tuple) else (value,):
        _check_range(item, meta, where, value)
    problem = meta.get("check") and meta["check"](value)
    if problem:
        raise ConfigError(f"{where} = {short_repr(value)}: {problem}")
    choices = meta.get("choices")
    for item in value if isinstance(value, tuple) else (value,):
        if choices is not None and item not in valid_names(choices):
            _check_unregistered(item, choices, where)
    return value


def _check_unregistered(item: Any, choices: str | tuple[str, ...], where: str) -> None:
    """A name outside the registry: a model may be a user's `module.path:factory`, which must import;
    anything else is unknown."""
    if choices == "models" and isinstance(item, str) and models.is_factory_name(item):
        try:
            models.factory(item)
        except ConfigError as error:
            raise ConfigError(f"{where} = {short_repr(item)}: {error}") from None
        return
    also = ", or module.path:factory (a model of your own)" if choices == "models" else ""
    raise ConfigError(f"{where}: unknown name {short_repr(item)}; valid: {', '.join(valid_names(choices))}{also}")


def _check_range(item: Any, meta: dict, where: str, value: Any) -> None:
    if isinstance(item, float) and not math.isfinite(item):     # NaN passes every comparison below
        raise ConfigError(f"{where} = {short_repr(value)} must be a finite number")
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (item < low if meta["low_inclusive"] else item <= low)
    too_high = high is not None and (item > high if meta["high_inclusive"] else item >= high)
    if too_low or too_high:
        left = "[" if meta["low_inclusive"] else "("
        right = "]" if meta["high_inclusive"] else ")"
        valid = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"{where} = {short_repr(value)} is out of range: valid range is {valid}")


def _check_consistency(cfg: Config) -> None:
    """Constraints that involve more than one key."""
    low, high = cfg.optimiser.lr_bounds
    if low >= high:
        raise ConfigError(f"optimiser.lr_bounds = {list(cfg.optimiser.lr_bounds)}: low must be below high")
    _check_tuning(cfg)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device = {short_repr(cfg.device)}: valid values are auto, cpu, cuda or cuda:N")


def _check_peer(cfg: Config) -> None:
    """A learning-rate-free optimiser of its own package (algorithms/peers.py) runs with fixed
    hyperparameters, and only where its package is installed."""
    rule = RULES[cfg.optimiser.name]
    if rule.differentiable:
        return
    if cfg.tuning.method != "fixed":
        raise ConfigError(f"optimiser.name = {cfg.optimiser.name!r} is {rule.package}'s own optimiser, with no "
                          f"differentiable form: it runs with fixed hyperparameters (tuning.method: fixed), not "
                          f"tuning.method {cfg.tuning.method}")
    if not rule.available():
        raise ConfigError(f"optimiser.name = {cfg.optimiser.name!r} needs the {rule.package} package: {PEERS_INSTALL}")


def _check_tuning(cfg: Config) -> None:
    _check_peer(cfg)
    tuning, rule = cfg.tuning, RULES[cfg.optimiser.name]
    for name in tuning.hyperparameters:
        if name not in rule.hyperparameters:
            raise ConfigError(f"tuning.hyperparameters: '{name}' is not a hyperparameter of optimiser.name = "
                              f"{cfg.optimiser.name!r} (it has {', '.join(rule.hyperparameters)})")
        if getattr(cfg.optimiser, name) <= 0:
            raise ConfigError(f"optimiser.{name} = {getattr(cfg.optimiser, name)}: an optimised hyperparameter "
                              f"must start above 0 (it is optimised as its log10 or logit)")
    for name in tuning.high_dimensional:
        if name not in tuning.hyperparameters:
            raise ConfigError(f"tuning.high_dimensional: '{name}' must also be in tuning.hyperparameters")
    if cfg.optimiser.lr_multiplier is not None and "lr" in tuning.hyperparameters:
        raise ConfigError("optimiser.lr_multiplier: a fixed lr schedule cannot be combined with an optimised lr")
    family = algorithms.METHODS[tuning.method]
    family.check_config(tuning, name=cfg.algorithm, window_steps=cfg.network_weight_steps)
    optimises = family.optimises
    if optimises != bool(tuning.hyperparameters):
        raise ConfigError(f"algorithm {cfg.algorithm} (tuning.method {tuning.method}) " + (
            "optimises hyperparameters: name them in tuning.hyperparameters" if optimises else
            "keeps its hyperparameters fixed: tuning.hyperparameters must be empty, or tuning.method one that "
            "optimises them"))
    if optimises and tuning.validation_data == "validation" and cfg.dataset.validation_proportion == 0:
        raise ConfigError(f"{cfg.algorithm} optimises on validation data, but dataset.validation_proportion "
                          f"is 0: set it above 0 (or tuning.validation_data: training)")


def _one_step_windows(cfg: Config) -> Config:
    """tuning.every_weight_step: the H windows of T steps become H*T windows of one step, so that
    the algorithm trains for the budget every other algorithm of the experiment gets."""
    if not cfg.tuning.every_weight_step or cfg.network_weight_steps == 1:
        return cfg
    if cfg.total_weight_steps > MAX_COUNT:
        raise ConfigError(f"tuning.every_weight_step: hyperparameter_steps * network_weight_steps = "
                          f"{cfg.total_weight_steps} windows is out of range: valid range is [1, {MAX_COUNT}]")
    return dataclasses.replace(cfg, network_weight_steps=1, hyperparameter_steps=cfg.total_weight_steps)


def build_config(values: dict, sources: dict | None = None) -> Config:
    """Validate a nested dict (as merged from YAML) into a Config."""
    cfg = _one_step_windows(_build(Config, values, sources or {}))
    _check_consistency(cfg)
    _check_unused_by_rule(cfg, sources or {})
    return cfg


REQUESTS = ("--", "onepass.tune(")    # sources that are a user's own settings: flags, --set, tune's keywords


def _check_unused_by_rule(cfg: Config, sources: dict) -> None:
    """Refuse another rule's hyperparameter (momentum under adam, beta1 under sgd) that the user set
    or that the file choosing the rule sets: the rule would ignore it. A dataset config's SGD starting
    values stay allowed under `--set optimiser.name=adam`."""
    rule, defaults = RULES[cfg.optimiser.name], OptimiserConfig()
    chooser = source_of(sources, ("optimiser", "name"))
    others = {name for other in RULES.values() for name in other.hyperparameters} - set(rule.hyperparameters)
    for name in sorted(others):
        source, value = source_of(sources, ("optimiser", name)), getattr(cfg.optimiser, name)
        asked = source == chooser or source.startswith(REQUESTS)
        if not asked or value == getattr(defaults, name):
            continue
        users = [other for other, candidate in RULES.items() if name in candidate.hyperparameters]
        raise ConfigError(f"{source}: optimiser.{name} = {value} is not used by optimiser.name = "
                          f"{cfg.optimiser.name!r} (it has {', '.join(rule.hyperparameters)}): remove it, or "
                          f"set optimiser.name to {' or '.join(repr(user) for user in users)}")


def to_dict(cfg: Config) -> dict:
    """The config as plain JSON/YAML-friendly data (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(cfg))


# ---------------------------------------------------------------------------------------------
# Command line

# Named flags: (flags, dotted key, type, help).
_FLAGS = [
    (("-d", "--device"), "device", str, "auto, cpu, cuda or cuda:N"),
    (("--batch_size",), "batch_size", int, "training batch size"),
    (("--network_weight_steps",), "network_weight_steps", int, "weight steps per hyperparameter step"),
    (("--hyperparameter_steps",), "hyperparameter_steps", int, "number of hyperparameter steps"),
    (("--seed",), "seed", int, "random seed"),
    (("-l", "--log_root"), "log_root", str, "root folder of run directories"),
    (("-g", "--run_group_name"), "run_group_name", str, "subfolder of the log root (a name, not a path)"),
    (("-n", "--run_name"), "run_name", str, "suffix of the run directory's name (a name, not a path)"),
]


def _keys_help() -> str:
    lines = ["config keys (YAML, or --set KEY=VALUE; natural units):"]
    defaults = to_dict(Config())
    for path in all_keys():
        cls, default = Config, defaults
        for part in path[:-1]:
            cls = typing.get_type_hints(cls)[part]
            default = default[part]
        f = next(f for f in dataclasses.fields(cls) if f.name == path[-1])
        annotation = typing.get_type_hints(cls)[path[-1]]
        choices = f.metadata.get("choices")
        extra = f"; one of: {', '.join(valid_names(choices))}" if choices else ""
        lines.append(f"  {_dotted(path)} ({_type_name(annotation)}, default {json.dumps(default[path[-1]])})")
        lines.append(f"      {f.metadata['doc']}{extra}")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = util.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a network while tuning its hyperparameters, from YAML configs.",
        epilog=_keys_help() + "\n\nexample:\n  python train.py -c configs/uci_energy.yaml configs/Random.yaml "
               "--set model.layer_sizes=[8,100,1]")
    parser.add_argument("-c", "--config", nargs="+", action="extend", default=[], metavar="YAML",
                        help="config files (at least one), deep-merged in order (later wins)")
    for flags, key, kind, text in _FLAGS:
        parser.add_argument(*flags, dest=key, type=kind, default=None, help=f"sets {key}: {text}")
    parser.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                        help="data-parallel processes on this machine (gloo on CPU); batch_size stays the "
                             "global batch. Under torchrun, leave this out")
    parser.add_argument("-S", "--save_state", metavar="FILE",
                        help="write a checkpoint of the complete training state to FILE at the end")
    parser.add_argument("--checkpoint_every", type=positive_int, metavar="K",
                        help="with -S FILE, also write FILE (atomically) every K hyperparameter steps, so that "
                             "a killed run can be resumed with -s FILE")
    parser.add_argument("-s", "--load_state", metavar="FILE",
                        help="resume from a checkpoint: same config (hyperparameter_steps may grow), "
                             "logging on in its run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set any key, e.g. --set optimiser.lr=1e-2 (VALUE is YAML); repeatable")
    return parser


def load(argv: list[str] | None = None) -> Config:
    """Parse the command line into a validated Config (argparse exits 2 on a malformed command)."""
    return parse_command_line(argv)[0]


def parse_command_line(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The validated Config, and the parsed arguments (for the options that are not config keys)."""
    args = build_parser().parse_args(argv)
    cfg = load_from(args.config, {key: getattr(args, key) for _, key, _, _ in _FLAGS}, args.overrides)
    if not args.config:     # the defaults alone would silently train some dataset
        raise ConfigError("-c: no config files: name a dataset config (and an algorithm config), "
                          "e.g. -c configs/diabetes.yaml configs/Random.yaml")
    return cfg, args


def load_from(files: list[str], flags: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Merge `files`, then `flags` ({dotted key: value or None}), then 'key=value' overrides."""
    values, sources, dataset_file = {}, {}, None
    for path in files:
        file_sources: dict = {}
        content = read_yaml_file(path, file_sources)
        dataset_file = _check_one_dataset(path, content, dataset_file, values)
        values = deep_merge(values, content, path, sources)
        sources.update(file_sources)       # a key set by an extended file names that file
    for key, value in (flags or {}).items():
        if value is not None:
            values = deep_merge(values, nest(key, value), f"--{key}", sources)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {short(item)}: expected KEY=VALUE, e.g. --set optimiser.lr=1e-2")
        source = f"--set {short(key.strip())}"
        values = deep_merge(values, nest(key.strip(), parse_yaml_value(text, source)), source, sources)
    return build_config(values, sources)


def _dataset_name(values: dict) -> Any:
    return values["dataset"].get("name") if isinstance(values.get("dataset"), dict) else None


def _check_one_dataset(path: str, content: dict, dataset_file: str | None, values: dict) -> str | None:
    """The file that names the dataset so far. A second file naming another dataset is refused: it is
    usually meant as the algorithm config (`-c uci_energy.yaml diabetes.yaml` would train diabetes
    with Random)."""
    name = _dataset_name(content)
    if name is None:
        return dataset_file
    if dataset_file is not None and name != _dataset_name(values):
        raise ConfigError(f"-c {path}: a second dataset config (dataset '{short(str(name))}', after {dataset_file}): "
                          f"give one dataset config, then an algorithm config (one that sets 'algorithm', e.g. "
                          f"configs/Ours_LR.yaml)")
    return path


def nest(dotted: str, value: Any) -> dict:
    """{"a": {"b": value}} from "a.b" and value."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value
