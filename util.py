"""Run directories and their logs: writing them (RunLog) and reading them back (get_tags).

A run directory holds config.json (the merged config), metrics.json (final results, status, wall
time) and TensorBoard event files whose steps are global weight-step indices.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary


def make_run_dir(log_root: str, group: str, name: str | None) -> Path:
    """Create `log_root/group/<date>-<time>-<random>[-name]`, never reusing an existing folder."""
    parent = Path(log_root) / group
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        stem = f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        path = parent / (f"{stem}-{name}" if name else stem)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename), so readers never see half a file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(temporary, path)


def atomic_torch_save(data: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves half a checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(data, temporary)
    os.replace(temporary, path)


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


def _masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class RunLog:
    """TensorBoard event file of one run, written synchronously in the calling thread.

    All scalars of a step go into one event. Records use the TFRecord framing that TensorBoard
    reads (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload); the
    file is flushed every `flush_seconds`, so TensorBoard follows a live run without a writer
    thread competing with training for the interpreter.
    """

    def __init__(self, run_dir: Path, flush_seconds: float = 10.0):
        self.run_dir = run_dir
        # Unique, never overwritten, and in time order by name: a resumed run adds its own file
        # beside its predecessor's.
        now = time.time_ns()
        name = f"events.out.tfevents.{now // 10**9}.{socket.gethostname()}.{os.getpid()}.{now}"
        self._file = open(run_dir / name, "xb")  # noqa: SIM115 -- closed in close()
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def histogram(self, step: int, tag: str, values: torch.Tensor, bins: int = 64) -> None:
        """A TensorBoard histogram of `values`, computed with torch: numpy's histogram calls BLAS,
        whose idle threads then spin on the cores that training needs."""
        values = values.detach().reshape(-1).to(torch.float64)
        low, high = values.min().item(), values.max().item()
        if high > low:
            counts = torch.histc(values, bins=bins, min=low, max=high).tolist()
            limits = torch.linspace(low, high, bins + 1, dtype=torch.float64)[1:].tolist()
        else:
            counts, limits = [float(len(values))], [high]
        histogram = HistogramProto(min=low, max=high, num=len(values), sum=values.sum().item(),
                                   sum_squares=values.dot(values).item(), bucket_limit=limits, bucket=counts)
        summary = Summary(value=[Summary.Value(tag=tag, histo=histogram)])
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc32c(header))
                         + data + struct.pack("<I", _masked_crc32c(data)))
        if time.monotonic() - self._last_flush > self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()

    def restart_at(self, step: int) -> None:
        """Mark a resumption: TensorBoard discards earlier files' events from `step` on (what a
        killed run logged after its last checkpoint)."""
        self._write(Event(wall_time=time.time(), step=step, session_log=SessionLog(status=SessionLog.START)))

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------------------------
# Reading runs back

@dataclass
class Scalar:
    steps: np.ndarray        # int64 global weight-step (or hyperparameter-step, for Last_*) indices
    values: np.ndarray       # float64
    wall_times: np.ndarray   # float64 seconds since the epoch


@dataclass
class Run:
    path: Path
    config: dict
    metrics: dict
    scalars: dict[str, Scalar] = field(default_factory=dict)


def find_runs(directory: str | os.PathLike) -> list[Path]:
    """Every run directory (a folder with a config.json) at or below `directory`, sorted."""
    root = Path(directory)
    return sorted(p.parent for p in root.rglob("config.json"))


def get_tags(directory: str | os.PathLike, *tags: str) -> dict[str, Run]:
    """Read every run below `directory`: each scalar tag (all of them if none are named), in full.

    Returns {run path relative to `directory`: Run}. Every recorded event is kept (no TensorBoard
    down-sampling), ordered by step (a resumed run's files may interleave); a tag a run never
    logged is absent from that run's `scalars`.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    root = Path(directory)
    runs = {}
    for path in find_runs(root):
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
        accumulator.Reload()
        wanted = tags or accumulator.Tags()[SCALARS]
        scalars = {}
        for tag in wanted:
            if tag not in accumulator.Tags()[SCALARS]:
                continue
            # A step logged twice (by a killed run and again by its resumption) keeps the later value.
            latest = {e.step: e for e in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time)}
            events = [latest[step] for step in sorted(latest)]
            scalars[tag] = Scalar(np.array([e.step for e in events], dtype=np.int64),
                                  np.array([e.value for e in events], dtype=np.float64),
                                  np.array([e.wall_time for e in events], dtype=np.float64))
        metrics_file = path / "metrics.json"
        runs[str(path.relative_to(root))] = Run(
            path=path, config=json.loads((path / "config.json").read_text()),
            metrics=json.loads(metrics_file.read_text()) if metrics_file.is_file() else {},
            scalars=scalars)
    return runs


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: write those as null."""
    return value if math.isfinite(value) else None
