"""Config files: YAML read safely (no anchors, aliases, duplicate keys or unbounded values), files
built on others with `extends:`, and deep merging that remembers which file or flag set each key,
so that config.py's errors can name where a bad value came from.
"""
from __future__ import annotations

import copy
import functools
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from onepass.schema import QUOTE_LENGTH, ConfigError, short, short_repr

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
        if isinstance(value, dict) and isinstance(merged.get(key, {}), dict):
            # Key by key, a new section too: a file that extends another names only what it sets,
            # not the section (whose other keys an earlier file may have set).
            merged[key] = deep_merge(merged.get(key, {}), value, source, sources, path)
        else:
            merged[key] = value
            _forget_below(sources, path)
            sources[path] = source
    return merged


def _forget_below(sources: dict, path: tuple) -> None:
    for stale in [p for p in sources if p[:len(path)] == path and p != path]:
        del sources[stale]


def source_of(sources: dict, path: tuple) -> str:
    """The file or flag that set `path` (or a section above it), or "defaults"."""
    for end in range(len(path), 0, -1):
        if path[:end] in sources:
            return sources[path[:end]]
    return "defaults"
