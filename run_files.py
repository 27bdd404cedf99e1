"""A run's directory: made under the log root, held by one process at a time, logged into, closed.

A run writes only here: `config.json` when it starts, TensorBoard events as it goes (`RunLog`,
cut back to a checkpoint's position when a run resumes), `metrics.json` when it ends, however it
ends. Only rank 0 of a distributed run has a run directory.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import socket
import stat
import struct
import time
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import torch
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

from onepass import config, distributed, util
from onepass.schema import Config, ConfigError, short_repr
from onepass.util import EVENTS_PREFIX


def make_run_dir(log_root: str, group: str, name: str | None) -> Path:
    """Create `log_root/group/<date>-<time>-<random>[-name]`, never reusing an existing folder."""
    parent = Path(log_root) / group
    _refuse_escape(log_root, group, name)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        stem = f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        path = parent / (f"{stem}-{name}" if name else stem)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _refuse_escape(log_root: str, group: str, name: str | None) -> None:
    """Behind the config's own check of the names: a group that leads out of log_root (absolute, or
    through '..') or a name that is more than one folder name would write elsewhere."""
    first = below(Path(log_root), os.path.join(group, "stamp"))      # (the group may be log_root itself)
    if first is None:
        raise ConfigError(f"run group {short_repr(group)} leads out of log_root {log_root}")
    stamped = below(Path(log_root), os.path.join(group, f"stamp-{name or ''}"))
    if stamped is None or stamped.parent != first.parent:
        raise ConfigError(f"run_name {short_repr(name)} is not a name: it would make a path")


def below(root: Path, relative: str, follow_links: bool = False) -> Path | None:
    """`root / relative` as an absolute path if it lies below `root` (not `root` itself), else None:
    absolute, through '..' or, with `follow_links`, through a link, it would lead elsewhere. The one
    rule for every path a config or a checkpoint names below a folder."""
    absolute = Path.resolve if follow_links else (lambda path: Path(os.path.abspath(path)))
    root, path = absolute(root), absolute(root / relative)
    return path if path != root and path.is_relative_to(root) else None


LOCK_NAME = ".lock"


class RunDirInUse(ConfigError):
    """A run directory that another process holds (see hold_run_dir)."""


def hold_run_dir(run_dir: Path) -> BinaryIO:
    """An exclusive lock on `run_dir` for this process (its pid written in the lock file), until the
    returned file is closed or the process ends; ConfigError at once if another process holds it
    (two runs logging into one directory would cut back and overwrite each other's files)."""
    descriptor = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    lock = os.fdopen(descriptor, "r+b")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n".encode())
        lock.flush()
        return lock
    except BlockingIOError:
        holder = lock.read(20).decode(errors="replace").strip() or "unknown"
        lock.close()
        raise RunDirInUse(f"run directory {run_dir} is in use by another process (pid {holder}); wait for it to "
                          f"end, or stop it") from None
    except BaseException:
        lock.close()
        raise


def held_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds `run_dir` now: a run in progress there, which nothing may remove."""
    try:
        with hold_run_dir(run_dir):
            return False
    except RunDirInUse:
        return True
    except OSError:                 # unwritable, or a link at the lock's name: no run holds it
        return False


class RunLog:
    """TensorBoard event file of one run, written synchronously in the calling thread.

    All scalars of a step go into one event. Records use the TFRecord framing that TensorBoard
    reads (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload); the
    file is flushed every `flush_seconds`, so TensorBoard follows a live run without a writer
    thread competing with training for the interpreter.
    """

    def __init__(self, run_dir: Path, flush_seconds: float = 10.0, lock: BinaryIO | None = None):
        self.run_dir = run_dir
        self._lock = lock          # hold_run_dir's, released by `release`
        # Unique, never overwritten, and in time order by name: a resumed run adds its own file
        # beside its predecessor's.
        now = time.time_ns()
        self.name = f"{EVENTS_PREFIX}{now // 10**9}.{socket.gethostname()}.{os.getpid()}.{now}"
        self._file = open(run_dir / self.name, "xb")  # noqa: SIM115 -- closed in close()
        self._bytes = 0
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def hparams(self, values: dict[str, float | int | str | bool], metrics: list[str]) -> None:
        """TensorBoard's HParams record of this run: its settings, and the scalar tags whose last
        values compare runs in the HParams tab."""
        from torch.utils.tensorboard.summary import hparams
        for summary in hparams(values, dict.fromkeys(metrics, 0.0)):
            self._write(Event(wall_time=time.time(), summary=summary))

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
        crc = util.masked_crc32c
        record = header + struct.pack("<I", crc(header)) + data + struct.pack("<I", crc(data))
        self._file.write(record)
        self._bytes += len(record)
        if time.monotonic() - self._last_flush > self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()
        if os.fstat(self._file.fileno()).st_nlink == 0:     # writes to a removed file succeed, and are lost
            raise FileNotFoundError(errno.ENOENT, "its event file was removed mid-run", str(self.run_dir / self.name))

    def position(self) -> dict[str, str | int]:
        """Where the log is, on disk (it is flushed), for a checkpoint: see `discard_events_after`."""
        if not self._file.closed:
            self.flush()
        return {"file": self.name, "bytes": self._bytes}

    def restart_at(self, step: int) -> None:
        """Mark a resumption: TensorBoard discards earlier files' events from `step` on (what a
        killed run logged after its last checkpoint)."""
        self._write(Event(wall_time=time.time(), step=step, session_log=SessionLog(status=SessionLog.START)))

    def close(self) -> None:
        self._file.close()

    def release(self) -> None:
        """Close the log and let other processes have its run directory."""
        self.close()
        if self._lock is not None:
            self._lock.close()


def _not_an_event_file(path: Path, why: str) -> ConfigError:
    return ConfigError(f"{path}: the event file the checkpoint names is not the run's own regular file ({why}); "
                       f"resuming cuts it back, never through a link: remove it, or put the run's file back")


def discard_events_after(run_dir: Path, position: dict | None) -> None:
    """Cut a run's event files back to a checkpoint's `position` (RunLog.position, checked by the
    caller): what a killed run logged after its checkpoint, and any file a later segment began, are
    superseded by a run resumed from it. TensorBoard's own purge on restart (`restart_at`) drops steps
    from one step on, right for the weight-step axis but not for the Last_* tags on the
    hyperparameter-step axis. Only a regular file of the run directory is cut, never through a link."""
    if position is None:
        return                                   # an older checkpoint: `restart_at` alone
    kept = run_dir / position["file"]
    try:
        descriptor = os.open(kept, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as error:                     # ELOOP: a link; EISDIR, ENXIO: a folder, a fifo
        raise _not_an_event_file(kept, "a symbolic link" if error.errno == errno.ELOOP else error.strerror) from None
    try:
        found = os.fstat(descriptor)
        if not stat.S_ISREG(found.st_mode):
            raise _not_an_event_file(kept, "not a file")
        if found.st_size > position["bytes"]:
            os.ftruncate(descriptor, position["bytes"])
    finally:
        os.close(descriptor)
    for file in run_dir.glob(f"{EVENTS_PREFIX}*"):
        if file.name > kept.name:                # names are in time order
            file.unlink()




def check_outputs(cfg: Config, save_state: str | None) -> None:
    """Refuse, before anything runs, a log root or checkpoint file that cannot be written."""
    util.check_output_folder(Path(cfg.log_root), f"log_root = {cfg.log_root}", "choose another with -l DIR")
    if save_state:
        target = Path(save_state)
        if target.is_dir():
            raise ConfigError(f"-S {save_state}: is a folder; name a file in it, e.g. -S {target / 'state.pt'}")
        if not target.parent.is_dir():
            raise ConfigError(f"-S {save_state}: no folder {target.parent}; create it or choose another file")
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"-S {save_state}: the folder {target.parent} is not writable; choose another file")


def open_run(cfg: Config, context: distributed.Context, run_dir: Path | None = None,
             resumes: dict | None = None) -> tuple[Path | None, RunLog | None]:
    """Rank 0's run directory (a new one unless given), held by this process alone until its log is
    released, and its TensorBoard log; nothing elsewhere. A directory without a config.json (a new
    one, or one chosen by the caller) gets one. `resumes`: the log position of the checkpoint a
    resumption continues, to which the event files are cut back. A directory this call created is
    removed again if it fails (a full disk)."""
    if not context.is_rank0:
        return run_dir, None
    above = Path(cfg.log_root) / cfg.run_group if run_dir is None else run_dir.parent
    existing = next(folder for folder in (above, *above.parents) if folder.exists())
    new = run_dir is None or not run_dir.exists()
    try:
        if run_dir is None:
            run_dir = make_run_dir(cfg.log_root, cfg.run_group, cfg.run_name)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, _open_log(cfg, run_dir, resumes)
    except OSError as error:
        if new:
            _remove_new(run_dir, above, existing)
        raise ConfigError(f"log_root = {cfg.log_root}: could not write the run directory {run_dir or above} "
                          f"({error.strerror or error}); {WRITE_ADVICE.get(error.errno, 'check its permissions')}, "
                          f"or choose another log root with -l DIR") from None


# What to do when a run directory cannot be written, by the error's errno.
WRITE_ADVICE = {errno.ENOSPC: "free some space", errno.EFBIG: "free some space", errno.EDQUOT: "free some space",
                errno.ELOOP: "remove the symbolic link planted in it (the run never writes through one)"}


def _open_log(cfg: Config, run_dir: Path, resumes: dict | None) -> RunLog:
    lock = hold_run_dir(run_dir)
    try:
        discard_events_after(run_dir, resumes)
        if not (run_dir / "config.json").is_file():
            util.write_json(run_dir / "config.json", config.to_dict(cfg))
        return RunLog(run_dir, lock=lock)
    except BaseException:
        lock.close()
        raise


def _remove_new(run_dir: Path | None, above: Path, existing: Path) -> None:
    """Remove a run directory this process created, and the folders above it that it created and
    that are still empty (others' runs may have appeared in them since)."""
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    for folder in (above, *above.parents):
        if folder == existing:
            return
        with contextlib.suppress(OSError):
            folder.rmdir()


def close_run(run_dir: Path | None, log: RunLog | None, metrics: dict, cfg: Config,
              context: distributed.Context) -> dict:
    """Record the metrics and release the run directory (only then: it is the run's until they are
    written)."""
    metrics |= {"seed": cfg.seed, "threads": cfg.threads, "run_dir": str(run_dir), "world_size": context.world_size}
    if log is not None:
        log.close()
        util.write_json(run_dir / "metrics.json", metrics)
        log.release()
    return metrics


def write_failure(run_dir: Path | None, error: OSError) -> ConfigError:
    """The one line for a write that failed mid-run: a removed run directory, log root or event file
    (RunLog.flush notices), a full disk."""
    if error.errno == errno.ENOENT:
        return ConfigError(f"{run_dir}: the run directory (or a folder above it, or its event file) was removed "
                           f"mid-run, so its logs are lost; run again, or resume from a checkpoint with -s FILE")
    return ConfigError(f"{error.filename or run_dir}: could not write ({error.strerror or error}); "
                       f"{WRITE_ADVICE.get(error.errno, 'check its permissions')} and resume from the last "
                       f"checkpoint (-s FILE), or run again")


