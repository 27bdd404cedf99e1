"""Run directories and their logs: writing them (RunLog) and reading them back (get_tags).

A run directory holds config.json (the merged config), metrics.json (final results, status, wall
time) and TensorBoard event files whose steps are global weight-step indices.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import secrets
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import google_crc32c
import numpy as np
import torch
from google.protobuf.message import DecodeError
from tensorboard.compat.proto.event_pb2 import Event

from onepass.schema import Config, ConfigError, short


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with every command-line mistake in one line on stderr (the usage is one
    --help away) and long quoted values cut short; exit code 2, as argparse."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"'([^']*)'", lambda quoted: repr(short(quoted[1])), " ".join(message.split()))
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_command(main: Callable[[], int]) -> int:
    """A script's exit code: `main()`'s, or 141 without a traceback when whoever read its output
    stopped reading (e.g. `| head`), as shell tools do."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # nothing more to flush at exit
        return 141


# -- threads ---------------------------------------------------------------------------------

_core_share: int | None = None


def share_cores(processes: int) -> int:
    """Declare that this process is one of `processes` sharing this machine's cores (a batch
    worker, a data-parallel rank); returns its share, which runs with threads: null use."""
    global _core_share
    _core_share = max(1, available_cores() // processes)
    torch.set_num_threads(_core_share)      # until a run sets its own count (train.prepare)
    return _core_share


def core_share() -> int:
    """This process's share of the cores: all of them unless `share_cores` said otherwise."""
    return _core_share or available_cores()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a cluster job's allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_output_folder(folder: Path, named: str, fix: str) -> None:
    """ConfigError "`named`: <why>; `fix`" unless files can be written below `folder`: the nearest
    existing folder of its path must be a writable folder."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "not a folder" if not existing.is_dir() else "read-only"
        raise ConfigError(f"{named}: {existing} is {problem}; {fix}")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename), so readers never see half a file."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see atomic_write)."""
    atomic_write(Path(path), lambda file: file.write(text.encode()))


def atomic_torch_save(data: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves half a checkpoint."""
    atomic_write(Path(path), lambda file: torch.save(data, file))


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write` on a new temporary file beside `path`, then rename it to `path`. The temporary
    is created exclusively under an unpredictable name (a link planted at a guessable name cannot
    redirect the write) and removed if anything fails."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())      # the rename must not land before the data
        os.chmod(temporary, 0o666 & ~_UMASK)   # as a plainly created file (mkstemp makes it private)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


EVENTS_PREFIX = "events.out.tfevents."


# ---------------------------------------------------------------------------------------------
# Reading runs back

@dataclass
class Scalar:
    steps: np.ndarray        # int64 global weight-step (or hyperparameter-step, for Last_*) indices
    values: np.ndarray       # float64
    wall_times: np.ndarray   # float64 seconds since the epoch


@dataclass
class Histogram:
    steps: np.ndarray            # int64 hyperparameter-step indices
    limits: list[np.ndarray]     # per step: the buckets' right edges
    counts: list[np.ndarray]     # per step: the number of values in each bucket


@dataclass
class Run:
    path: Path
    config: dict
    metrics: dict
    scalars: dict[str, Scalar] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)


def find_runs(directory: str | os.PathLike) -> list[Path]:
    """Every run directory (a folder with a config.json) at or below `directory`, sorted."""
    root = Path(directory)
    return sorted(p.parent for p in root.rglob("config.json"))


CACHE_NAME = ".tags_cache.npz"


class UnreadableFile(ValueError):
    """A run's file that cannot be parsed: overwritten, corrupted, not what its name says."""


class Runs(dict[str, Run]):
    """`get_tags`' answer, {run path relative to the folder: Run}, and `skipped`: (run directory,
    why) for each run left out because one of its files could not be read."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[tuple[Path, str]] = []


def get_tags(directory: str | os.PathLike, *tags: str, use_cache: bool = True) -> Runs:
    """Read every run below `directory`: each scalar tag (all of them if none are named) and every
    histogram, in full.

    Returns {run path relative to `directory`: Run}. Every recorded event is kept (no TensorBoard
    down-sampling), ordered by step; a step logged twice (by a killed run and again by its
    resumption) keeps the later value; a tag a run never logged is absent from its `scalars`.
    What a run's event files hold is cached beside them (`.tags_cache.npz`, no pickles) and read
    again only when those files change (or the cache is unreadable; a read-only folder gets none).
    A run with a corrupt config.json, metrics.json or event record (a config.json that is not a JSON
    object, a metrics.json that is not what runs write: METRICS_SHAPE) is skipped with a line on
    stderr naming the file, and listed in the answer's `skipped`. A missing folder raises
    FileNotFoundError.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such results folder")
    runs = Runs()
    for path in find_runs(root):
        try:
            runs[str(path.relative_to(root))] = read_run(path, tags, use_cache)
        except UnreadableFile as error:
            print(f"util.get_tags: skipped the run {path}: {error}", file=sys.stderr)
            runs.skipped.append((path, str(error)))
    return runs


def read_run(path: Path, tags: tuple[str, ...] = (), use_cache: bool = True) -> Run:
    """One run directory (only the scalar `tags` named, if any); UnreadableFile if a file is corrupt."""
    scalars, histograms = read_run_events(path, use_cache)
    return Run(path=path, config=read_json_object(path / "config.json"), metrics=read_metrics(path),
               scalars={tag: scalar for tag, scalar in scalars.items() if not tags or tag in tags},
               histograms=histograms)


NUMBER = (int, float)
SEED = (int, type(None))          # null: one is drawn
# What every writer of metrics.json (a finished, failed or interrupted run) puts there.
METRICS_SHAPE = {"status": str, "final?": dict, "final.*?": (*NUMBER, type(None)), "train_seconds?": NUMBER,
                 "weight_steps?": int, "weight_step_budget?": int}


def read_metrics(run_dir: Path) -> dict:
    """A run's metrics.json ({} while it has none); UnreadableFile if it is not what runs write."""
    path = run_dir / "metrics.json"
    return read_json_object(path, METRICS_SHAPE) if path.exists() else {}


def read_json_object(path: Path, shape: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """The JSON object in `path`, with values of the types `shape` gives ({dotted key: types}; a key
    ending in '?' may be absent, a '*' stands for every member of an object); UnreadableFile naming
    the file and what is wrong with it otherwise."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise UnreadableFile(f"{path}: cannot be read ({error.strerror or error})") from None
    except ValueError as error:           # JSONDecodeError, UnicodeDecodeError
        raise UnreadableFile(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UnreadableFile(f"{path}: holds {_json_kind(data)}, not a JSON object")
    require_shape(data, shape or {}, path)
    return data


def require_shape(data: dict, shape: dict[str, type | tuple[type, ...]], path: Path) -> None:
    """UnreadableFile naming `path` unless `data`, read from it, fits `shape` (see read_json_object)."""
    for key, kinds in shape.items():
        optional = key.endswith("?")
        for problem in _shape_problems(data, key.removesuffix("?").split("."), kinds, optional):
            raise UnreadableFile(f"{path}: {problem}")


def _shape_problems(data: Any, parts: list[str], kinds: type | tuple[type, ...], optional: bool,
                    name: str = "") -> Iterator[str]:
    """What keeps `data` at the key path `parts` (below `name`) from holding `kinds`."""
    if not parts:
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if not isinstance(data, kinds) or (isinstance(data, bool) and bool not in kinds):   # JSON true is no number
            expected = [_json_kind(kind) for kind in kinds if not (kind is int and float in kinds)]
            yield f"{name!r} is {_json_kind(data)}, not {' or '.join(expected)}"
        return
    if not isinstance(data, dict):
        yield f"{name!r} is {_json_kind(data)}, not {_json_kind(dict)}"
        return
    head, below = parts[0], parts[1:]
    if head != "*" and head not in data and not optional:
        yield f"no {_dotted(name, head)!r}"
    for key in (data if head == "*" else [head] if head in data else []):
        yield from _shape_problems(data[key], below, kinds, optional, _dotted(name, key))


def _dotted(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def _json_kind(value: Any) -> str:
    """What JSON calls a value (or a type of value): 'an object', 'a string', ..."""
    kind = value if isinstance(value, type) else type(value)
    names = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
             bool: "true or false", type(None): "null"}
    return names.get(kind, kind.__name__)


def read_run_events(run_dir: Path, use_cache: bool = True) -> tuple[dict[str, Scalar], dict[str, Histogram]]:
    """A run's scalars and histograms, from its cache when that matches its event files."""
    files = sorted(run_dir.glob(f"{EVENTS_PREFIX}*"))
    signature = json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache = run_dir / CACHE_NAME
    if use_cache and cache.is_file():
        cached = _read_cache(cache, signature)
        if cached is not None:
            return cached
    scalars, histograms = _parse_event_files(files)
    if use_cache:
        arrays = {"signature": np.array(signature), **_to_archive(scalars, histograms)}
        with contextlib.suppress(OSError):         # a read-only results folder: no cache, same answer
            atomic_write(cache, lambda file: np.savez(file, **arrays))
    return scalars, histograms


def _read_cache(cache: Path, signature: str) -> tuple[dict[str, Scalar], dict[str, Histogram]] | None:
    """The cached events, if the cache matches `signature`; None if not, or if it is unreadable
    (then it is only a cache: the event files are read again and it is rewritten)."""
    try:
        with np.load(cache, allow_pickle=False) as archive:
            return _from_archive(archive) if str(archive["signature"]) == signature else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        print(f"util.get_tags: ignored the unreadable cache {cache} ({type(error).__name__}: {error})",
              file=sys.stderr)
        return None


def _parse_event_files(files: list[Path]) -> tuple[dict[str, Scalar], dict[str, Histogram]]:
    """Scalars and histograms of TensorBoard event files, reading the TFRecord framing directly (a
    record cut short by a killed writer ends the file)."""
    scalar_events: dict[str, list[tuple[int, float, float]]] = {}
    histogram_events: dict[str, list[tuple[int, float, np.ndarray, np.ndarray]]] = {}
    for file in files:
        data, offset = file.read_bytes(), 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            start, end = offset + 12, offset + 12 + length
            if end + 4 > len(data):
                break
            event, offset = _decode_record(file, data, offset, start, end), end + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalar_events.setdefault(value.tag, []).append((event.step, event.wall_time, value.simple_value))
                elif value.HasField("histo"):
                    histogram_events.setdefault(value.tag, []).append(
                        (event.step, event.wall_time, np.array(value.histo.bucket_limit),
                         np.array(value.histo.bucket)))
    scalars = {}
    for tag, events in scalar_events.items():
        steps, wall_times, values = (np.array(column) for column in zip(*_latest_per_step(events), strict=True))
        scalars[tag] = Scalar(steps.astype(np.int64), values.astype(np.float64), wall_times.astype(np.float64))
    histograms = {}
    for tag, events in histogram_events.items():
        kept = _latest_per_step(events)
        histograms[tag] = Histogram(np.array([e[0] for e in kept], dtype=np.int64), [e[2] for e in kept],
                                    [e[3] for e in kept])
    return scalars, histograms


def _decode_record(file: Path, data: bytes, offset: int, start: int, end: int) -> Event:
    """The event of the complete record at `offset`, its checksums verified."""
    header_ok = struct.unpack_from("<I", data, offset + 8)[0] == masked_crc32c(data[offset:offset + 8])
    if header_ok and struct.unpack_from("<I", data, end)[0] == masked_crc32c(data[start:end]):
        try:
            return Event.FromString(data[start:end])
        except DecodeError:
            pass
    raise UnreadableFile(f"{file}: corrupt event record at byte {offset}")


def _latest_per_step(events: list[tuple]) -> list[tuple]:
    """(step, wall_time, ...) events sorted by step, the latest written one of each step."""
    latest = {event[0]: event for event in sorted(events, key=lambda event: event[1])}
    return [latest[step] for step in sorted(latest)]


def _to_archive(scalars: dict[str, Scalar], histograms: dict[str, Histogram]) -> dict[str, np.ndarray]:
    """Few, flat arrays (each archive member costs a lookup when read): every scalar's rows side
    by side with their lengths, likewise every histogram's buckets."""
    limits = [limit for histogram in histograms.values() for limit in histogram.limits]
    counts = [count for histogram in histograms.values() for count in histogram.counts]
    return {
        "scalar_tags": np.array(list(scalars), dtype=str),
        "scalar_sizes": np.array([len(scalar.steps) for scalar in scalars.values()], dtype=np.int64),
        "scalar_data": np.concatenate([np.stack([scalar.steps.astype(np.float64), scalar.values, scalar.wall_times])
                                       for scalar in scalars.values()], axis=1) if scalars else np.zeros((3, 0)),
        "histogram_tags": np.array(list(histograms), dtype=str),
        "histogram_sizes": np.array([len(histogram.steps) for histogram in histograms.values()], dtype=np.int64),
        "histogram_steps": np.concatenate([h.steps for h in histograms.values()]) if histograms else np.zeros(0),
        "bucket_sizes": np.array([len(limit) for limit in limits], dtype=np.int64),
        "bucket_limits": np.concatenate(limits) if limits else np.zeros(0),
        "bucket_counts": np.concatenate(counts) if counts else np.zeros(0),
    }


def _from_archive(archive: np.lib.npyio.NpzFile) -> tuple[dict[str, Scalar], dict[str, Histogram]]:
    arrays = {name: archive[name] for name in archive.files}     # each member read once
    data, sizes = arrays["scalar_data"], arrays["scalar_sizes"]
    scalars, end = {}, 0
    for tag, size in zip(arrays["scalar_tags"].tolist(), sizes, strict=True):
        steps, values, wall_times = data[:, end:end + size]
        scalars[tag] = Scalar(steps.astype(np.int64), values, wall_times)
        end += size
    bucket_splits = np.cumsum(arrays["bucket_sizes"])[:-1]
    limits, counts = np.split(arrays["bucket_limits"], bucket_splits), np.split(arrays["bucket_counts"], bucket_splits)
    histograms, first = {}, 0
    for tag, size in zip(arrays["histogram_tags"].tolist(), arrays["histogram_sizes"], strict=True):
        histograms[tag] = Histogram(arrays["histogram_steps"][first:first + size].astype(np.int64),
                                    limits[first:first + size], counts[first:first + size])
        first += size
    return scalars, histograms


def stack(runs: list[Run], tag: str) -> tuple[np.ndarray, np.ndarray]:
    """One tag of many runs aligned by step: (the union of their steps, values[run, step]), NaN
    where a run has no value at a step (it diverged early, or logged less often)."""
    present = [run.scalars[tag] for run in runs if tag in run.scalars]
    steps = np.unique(np.concatenate([scalar.steps for scalar in present])) if present else np.zeros(0, np.int64)
    values = np.full((len(runs), len(steps)), np.nan)
    for row, run in enumerate(runs):
        if tag in run.scalars:
            scalar = run.scalars[tag]
            values[row, np.searchsorted(steps, scalar.steps)] = scalar.values
    return steps, values


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: write those as null."""
    return value if math.isfinite(value) else None


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to `limit` characters (library messages run long)."""
    return short(" ".join(str(error).split()) or type(error).__name__, limit)


def seeded(cfg: Config) -> Config:
    """`cfg` with a seed: its own, or one drawn now (a run records it in config.json, to be repeated)."""
    return cfg if cfg.seed is not None else replace(cfg, seed=secrets.randbelow(2**31))
