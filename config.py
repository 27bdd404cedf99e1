"""Configuration: YAML files deep-merged in order, command-line overrides, validation.

A run is described by a frozen `Config` (nested dataclasses of schema.py). Values are in natural units
(`lr: 1.0e-3`, never its log10). Sources are applied in this order, later winning:

    defaults  <-  -c a.yaml b.yaml ...  <-  named flags (--seed, --batch_size, ...)  <-  --set k=v

Dicts merge key by key; scalars and lists are replaced. Every problem (missing file, malformed
YAML, unknown key, wrong type, value out of range, unknown name) raises `ConfigError` with one line
naming where the bad value came from, before anything else happens.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import json
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

import algorithms
import datasets
import models
import util
from algorithms.hyperparameters import TRANSFORMS
from algorithms.weight_update import RULES
from schema import MAX_COUNT, QUOTE_LENGTH, Config, ConfigError, OptimiserConfig, short, short_repr


def valid_names(choices: str | tuple[str, ...]) -> list[str]:
    """The names a key accepts: its own tuple, or those of the registry schema.py names."""
    if isinstance(choices, tuple):
        return list(choices)
    if choices == "hyperparameters":
        return list(TRANSFORMS)           # in their documented order
    registries = {"datasets": datasets.DATASETS, "models": models.MODELS, "activations": models.ACTIVATIONS,
                  "losses": models.LOSSES, "algorithms": algorithms.ALGORITHMS, "rules": RULES}
    return sorted(registries[choices])


# ---------------------------------------------------------------------------------------------
# YAML reading

MAX_DEPTH = 32             # nesting levels of a YAML value (configs use three or four)


class _Refused(yaml.MarkedYAMLError):
    """Well-formed YAML that a config may not use."""


INT_DIGITS = sys.get_int_max_str_digits() or 4300    # 0 means no limit


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 insists on a dot: `1.0e-3`), and
    refuses what would make a config ambiguous or unbounded: anchors and aliases (a few lines of
    nested aliases expand to gigabytes), duplicate keys (silently last-wins) and deep nesting
    (composed recursively: a RecursionError)."""
    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(problem="anchors and aliases (&name, *name) are not allowed in configs",
                           problem_mark=event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            plain = isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge"
            key = self.construct_object(key_node) if plain else None
            if key is not None and key in seen:
                raise _Refused(problem=f"duplicate key {short_repr(key)}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # Python refuses to convert (or print) decimal integers this long; hexadecimal ones would
        # convert, then fail wherever the value is quoted
        if len(node.value) > INT_DIGITS:
            raise _Refused(problem=f"an integer of {len(node.value)} characters is too long (at most {INT_DIGITS})",
                           problem_mark=node.start_mark)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def _yaml_problem(error: yaml.YAMLError, source: str, lines: bool = True) -> str:
    """One line for a YAML error: where (with the line, when known and `lines`) and what."""
    mark = getattr(error, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark and lines else source
    problem = short(getattr(error, "problem", None) or str(error).splitlines()[0], 2 * QUOTE_LENGTH)
    return f"{where}: {problem}" if isinstance(error, _Refused) else f"{where}: malformed YAML: {problem}"


def parse_yaml_value(text: str, source: str) -> Any:
    try:
        return copy.deepcopy(_parse_yaml(text))
    except _Refused as error:
        raise ConfigError(_yaml_problem(error, source, lines=False)) from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: could not parse {short_repr(text)} as YAML") from error


@functools.lru_cache(maxsize=4096)
def _parse_yaml(text: str) -> Any:
    """Parsed once per text: batches load thousands of configs from a few files and overrides."""
    return yaml.load(text, Loader=_Loader)


def read_yaml_file(path: str, sources: dict, _seen: tuple = ()) -> dict:
    """Read one config file, recording in `sources` which file set each key. A file may build on
    others, named relative to itself in `extends: [a.yaml, ...]`: they are merged first."""
    content = _read_one_yaml(path)
    merged: dict = {}
    for base in _bases(path, content.pop("extends", [])):
        base_path = str(Path(path).parent / base)
        if not Path(base_path).exists():
            raise ConfigError(f"{path}: extends: no such config file {short_repr(base)}")
        if Path(base_path).resolve() in _seen + (Path(path).resolve(),):
            raise ConfigError(f"{path}: 'extends' goes round in a circle through {short(base)}")
        merged = deep_merge(merged, read_yaml_file(base_path, sources, _seen + (Path(path).resolve(),)),
                            base_path, {})
    return deep_merge(merged, content, path, sources)


def _bases(path: str, bases: Any) -> list[str]:
    """The files named by `extends:`, a file name or a list of them."""
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: extends must be a file name or a list of file names, got {short_repr(bases)}")
    return bases


def _read_one_yaml(path: str) -> dict:
    try:
        content = copy.deepcopy(_parse_yaml(_read_text(path)))
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_problem(error, path)) from error
    if content is None or content == {}:
        raise ConfigError(f"{path}: empty config (no keys)")
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return content


def _read_text(path: str) -> str:
    """The file's text, or a ConfigError saying why there is none."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not file.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config file (not UTF-8 text)") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file: {error.strerror or error}") from None


# ---------------------------------------------------------------------------------------------
# Merging with provenance: every leaf remembers which file or flag set it.

def deep_merge(base: dict, update: dict, source: str, sources: dict, prefix: tuple = ()) -> dict:
    """Merge `update` into a copy of `base`: dicts merge, anything else is replaced."""
    merged = dict(base)
    for key, value in update.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, source, sources, path)
        else:
            merged[key] = value
            _forget_below(sources, path)
            sources[path] = source
    return merged


def _forget_below(sources: dict, path: tuple) -> None:
    for stale in [p for p in sources if p[:len(path)] == path and p != path]:
        del sources[stale]


def _source_of(sources: dict, path: tuple) -> str:
    for end in range(len(path), 0, -1):
        if path[:end] in sources:
            return sources[path[:end]]
    return "defaults"


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
            raise ConfigError(f"{_source_of(sources, path)}: unknown key '{short(_dotted(path))}'"
                              + _did_you_mean(path, names))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        path, value = prefix + (f.name,), values[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{_source_of(sources, path)}: '{_dotted(path)}' must be a mapping "
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
    where = f"{_source_of(sources, path)}: {_dotted(path)}"
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


def _check_tuning(cfg: Config) -> None:
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
    algorithms.ALGORITHMS[cfg.algorithm].check_config(cfg)
    optimises = algorithms.ALGORITHMS[cfg.algorithm].optimises
    if optimises != bool(tuning.hyperparameters):
        raise ConfigError(f"algorithm {cfg.algorithm} " + (
            "optimises hyperparameters: name them in tuning.hyperparameters" if optimises else
            "keeps its hyperparameters fixed: tuning.hyperparameters must be empty"))
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
    chooser = _source_of(sources, ("optimiser", "name"))
    others = {name for other in RULES.values() for name in other.hyperparameters} - set(rule.hyperparameters)
    for name in sorted(others):
        source, value = _source_of(sources, ("optimiser", name)), getattr(cfg.optimiser, name)
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
