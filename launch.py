"""Process management: one process, or N local ranks started by `--nproc N` (or by torchrun), and
what ends them: a signal, a failing rank, a hung one.

A command (train.py, meta_learning.py) is a `Job`: what to check before any rank starts, what one
process or rank runs, and the summary rank 0 prints. `main` does the rest alike for every job:
parses the command line, joins the process group torchrun describes, draws one seed for all ranks,
and either runs the job here (a SIGINT or SIGTERM then stops it between two windows) or spawns N
ranks and watches them. The launcher and its ranks talk through the rendezvous store: it asks them
to stop there, and a failing rank says there why, so that the launcher prints the one line that
explains the job's end.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from onepass import config, distributed, util
from onepass.schema import Config, ConfigError


class Job(Protocol):
    """What a command runs: on one process, or as each of N ranks."""
    name: str                 # the command, in its messages
    interruptible: bool       # a signal stops it between two windows, resumable

    def check(self, cfg: Config, args: argparse.Namespace) -> None:
        """Raise ConfigError for what the ranks would reject, once, before any starts."""

    def run(self, cfg: Config, args: argparse.Namespace, context: distributed.Context,
            stop_requested: Callable[[], object]) -> tuple[Path | None, dict]:
        """Run the job (as one rank of `context`); returns rank 0's run directory and the metrics."""

    def summary(self, run_dir: Path | None, cfg: Config, metrics: dict) -> str:
        """The lines rank 0 prints at the end."""


def main(job: Job, argv: list[str] | None = None) -> int:
    """The command line of `job`, run on this process, on N local ranks (--nproc N), or as a rank
    of a job torchrun started. Exit code 2 for a configuration error (one line), 1 for a failed rank,
    128 + the signal for an interrupted run; 0 otherwise (a diverged run is a result)."""
    context = distributed.SINGLE
    try:
        cfg, args = config.parse_command_line(argv)
        context = distributed.from_environment(cfg.device)     # set by torchrun; one process otherwise
        local_ranks = distributed.local_world_size(context.world_size)
        check_launch(cfg, max(args.nproc, context.world_size), max(args.nproc, local_ranks))
        if args.checkpoint_every and not args.save_state:
            raise ConfigError("--checkpoint_every: name the checkpoint file with -S FILE")
        if args.nproc > 1 and context.active:
            raise ConfigError("--nproc: already running under torchrun; let torchrun start the processes")
        distributed.init(context)
        if cfg.seed is None and not args.load_state:    # drawn once, so that every rank agrees (a
            # resumption continues its checkpoint's)
            cfg = replace(cfg, seed=distributed.broadcast_from_rank0(util.seeded(cfg).seed, context))
        if args.nproc > 1:
            job.check(cfg, args)
            return launch(job, cfg, args)
        return _run_here(job, cfg, args, context)
    except ConfigError as error:
        print(f"{job.name}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not context.active:
            raise
        report_failure(job.name, context.rank, rank_error(error), distributed.is_timeout(error))
        return 1


def _run_here(job: Job, cfg: Config, args: argparse.Namespace, context: distributed.Context) -> int:
    """`job` on this process (alone, or one rank of torchrun's). One process of its own stops cleanly
    on a signal; only the main thread may set signal handlers (main() may run elsewhere, e.g. in a thread)."""
    interruption = Interruption()
    catches = not context.active and job.interruptible and threading.current_thread() is threading.main_thread()
    try:
        with interruption if catches else contextlib.nullcontext():
            run_dir, metrics = job.run(cfg, args, context, interruption)
        distributed.shutdown(finished=True)
    finally:
        distributed.shutdown()
    if context.is_rank0:
        print(job.summary(run_dir, cfg, metrics), flush=True)
    if metrics["status"] == "interrupted":
        print(interrupted(job.name, interruption.received.name, metrics, args.save_state), file=sys.stderr)
        return interruption.exit_code()
    return 0


def check_launch(cfg: Config, world_size: int, local_world_size: int | None = None) -> None:
    """Launch settings that cannot work, as ConfigErrors before any process starts. On CUDA every
    rank has a GPU of its own: the `local_world_size` ranks on this machine (default: all) need as
    many visible GPUs."""
    local_world_size = local_world_size or world_size
    distributed.collective_timeout()       # a bad value is refused even where one process makes no use of it
    device = distributed.resolve_device(cfg.device)
    if world_size > 1 and device.type == "cuda":
        if ":" in cfg.device:
            raise ConfigError(f"device = {cfg.device!r} names one GPU; with several processes use --device cuda "
                              f"(rank r of a machine runs on its GPU r)")
        gpus = torch.cuda.device_count()
        if local_world_size > gpus:
            raise ConfigError(f"{local_world_size} processes on this machine need a GPU each, but {gpus} "
                              f"{'is' if gpus == 1 else 'are'} visible; use --nproc {gpus} or fewer, or --device cpu")


def _rank_main(rank: int, port: int, launcher: int, job: Job, cfg: Config, args: argparse.Namespace) -> None:
    """One spawned process of `--nproc N`; it ends at once, and silently, if the launcher dies.
    Ctrl-C, which reaches every process of the terminal, is the launcher's to handle: it asks the
    ranks to stop through the rendezvous store. A rank that fails reports why to the launcher."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a semaphore that a rank the launcher kills would leak (and the launcher's
    # resource tracker would say so); a rank's bar needs no lock shared with other processes.
    tqdm.set_lock(threading.RLock())
    try:
        context = join_local_group(rank, args.nproc, port, launcher, cfg.device)
        run_dir, metrics = job.run(cfg, args, context, launcher_stop)
        if context.is_rank0:
            print(job.summary(run_dir, cfg, metrics), flush=True)
            if metrics["status"] == "interrupted":
                print(interrupted(job.name, launcher_stop(now=True) or "a signal", metrics, args.save_state),
                      file=sys.stderr)
        distributed.shutdown(finished=True)
    except Exception as error:
        report_failure(job.name, rank, rank_error(error), distributed.is_timeout(error))
        distributed.exit_process(1)
    distributed.exit_process(0)


def rank_error(error: Exception) -> str:
    """What a rank's failure was, in a line (gloo's timeout message is long and names no rank)."""
    if distributed.is_timeout(error):
        return (f"no answer from another rank within {distributed.collective_timeout():g} s in a collective "
                f"operation: a rank hung or died ({distributed.TIMEOUT_VARIABLE} sets the limit)")
    return f"{type(error).__name__}: {util.one_line(error, 1000)}"


def launch(job: Job, cfg: Config, args: argparse.Namespace) -> int:
    """Run `args.nproc` local ranks; the first to fail stops the others, and one line says why.
    A SIGINT or SIGTERM asks the ranks to stop after their current window (exit 130 or 143); a
    second one abandons the run."""
    interruption = Interruption()
    catches = threading.current_thread() is threading.main_thread()
    with local_rendezvous() as store, interruption if catches else contextlib.nullcontext():
        ranks = torch.multiprocessing.spawn(_rank_main, args=(store.port, os.getpid(), job, cfg, args),
                                            nprocs=args.nproc, join=False)
        processes = ranks.processes
        try:
            if not watch(processes, store, interruption):
                print(f"{job.name}: {stop_failed_job(processes, store)}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:            # a second Ctrl-C
            for process in processes:
                process.kill()
            print(f"{job.name}: abandoned by a second SIGINT: the ranks were killed mid-window (the last periodic "
                  "checkpoint, if any, still resumes)", file=sys.stderr)
            return 128 + signal.SIGINT
    return interruption.exit_code() if interruption() else 0


def watch(processes: list, store: torch.distributed.TCPStore, interruption: Interruption) -> bool:
    """Wait until every rank has ended well (True) or one has failed (False), passing an
    interruption on to the ranks as a request to stop."""
    asked = False
    while any(process.exitcode is None for process in processes):
        if any(process.exitcode for process in processes):
            return False
        multiprocessing.connection.wait([process.sentinel for process in processes if process.exitcode is None],
                                        timeout=0.2)
        if interruption() and not asked:
            request_stop(store, interruption.received.name)
            asked = True
    return not any(process.exitcode for process in processes)


# Ranks that wait in vain for a hung one time out within moments of each other: those still running
# this long after the first are the hung ones.
TIMEOUT_GRACE = 5.0     # seconds


def stop_failed_job(processes: list, store: torch.distributed.TCPStore) -> str:
    """End a job one of whose ranks has failed; returns the line that says why it stopped."""
    failures = reported_failures(store, len(processes))
    if failures and min(failures.values(), key=lambda failure: failure.time).timed_out:
        deadline = time.monotonic() + TIMEOUT_GRACE
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    running = {rank for rank, process in enumerate(processes) if process.is_alive()}
    for rank in running:
        processes[rank].kill()        # SIGKILL: a stopped (SIGSTOP) process cannot act on SIGTERM
    for process in processes:
        process.join()
    return launch_failure(processes, reported_failures(store, len(processes)), running)


def launch_failure(processes: list, failures: dict[int, Failure], running: set[int]) -> str:
    """Why a job of local ranks stopped, from their reports and exit codes, where `running` are the
    ranks the launcher killed once the job had failed (never the cause of anything). First the ranks
    that ended without a word (a signal, an exit code): another rank's error follows from theirs.
    Then the first error reported; if it was a timeout, the ranks that never answered."""
    silent = [(rank, process.exitcode) for rank, process in enumerate(processes)
              if rank not in failures and rank not in running and process.exitcode]
    if silent:
        return "error: " + "; ".join(f"rank {rank} {exit_description(code)}" for rank, code in silent) + \
            ", so the job stopped"
    first = min(failures.values(), key=lambda failure: failure.time)
    hung = sorted(running - failures.keys())
    if first.timed_out and hung:
        names = ", ".join(map(str, hung))
        return (f"error: rank{'s' * (len(hung) > 1)} {names} stopped responding: the other ranks waited "
                f"{distributed.collective_timeout():g} s for {'them' if len(hung) > 1 else 'it'} in a collective "
                f"operation ({distributed.TIMEOUT_VARIABLE} sets the limit), so the job stopped")
    return f"error on rank {first.rank}: {first.line}"


def exit_description(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if code > 0:
        return f"exited with code {code}"
    try:
        return f"died from signal {signal.Signals(-code).name}"
    except ValueError:
        return f"died from signal {-code}"


class Interruption:
    """SIGINT and SIGTERM (Ctrl-C; what SLURM and Kubernetes send) turned into a request to stop
    at the next window boundary, while in use as a context manager; a second signal acts as if
    none were caught (abandoning the run). The previous handlers are restored on exit."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interruption:
        # A signal the process was started ignoring (e.g. SIGINT of `cmd &` in a script) stays ignored.
        self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS
                          if signal.getsignal(signum) is not signal.SIG_IGN}
        for signum in self._previous:
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
        self.received = signal.Signals(signum)

    def __call__(self) -> bool:
        return self.received is not None

    def exit_code(self) -> int:
        """The shell's code for death by the signal received: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.received


def interrupted(command: str, reason: str, metrics: dict, save_state: str | None) -> str:
    """The line that says a run stopped early, where, and how to go on."""
    resume = (f"resume with -s {save_state} -S {save_state}" if save_state
              else "no checkpoint written (-S FILE makes a run resumable)")
    return f"{command}: interrupted by {reason} after {metrics['weight_steps']} weight steps; {resume}"


@contextlib.contextmanager
def local_rendezvous() -> Iterator[dist.TCPStore]:
    """A rendezvous store for processes on this machine, held by the launching process on a port
    the system picks (no window in which another program can take the port; `store.port`)."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield store
    finally:
        del store


# A local job's launcher asks its ranks to stop through the rendezvous store (a signal sent to the
# ranks themselves might reach only some of them); each rank looks at most every STOP_POLL seconds,
# and the ranks agree on the window to stop after (see train.Learner.train_windows).
STOP_KEY = "onepass/stop"
STOP_POLL = 0.5
_launcher_store: dist.TCPStore | None = None
_last_poll = 0.0
_stop_reason: str | None = None


def request_stop(store: dist.TCPStore, reason: str) -> None:
    """Launcher side: ask the local job's ranks to stop at the next window boundary."""
    store.set(STOP_KEY, reason)


def launcher_stop(now: bool = False) -> str | None:
    """Rank side: the launcher's reason to stop (e.g. "SIGINT") once it has asked, else None.
    Looks at the store at most every STOP_POLL seconds, unless `now`."""
    global _last_poll, _stop_reason
    due = now or time.monotonic() - _last_poll >= STOP_POLL
    if _stop_reason is None and _launcher_store is not None and due:
        _last_poll = time.monotonic()
        if _launcher_store.check([STOP_KEY]):
            _stop_reason = _launcher_store.get(STOP_KEY).decode()
    return _stop_reason


# A rank of a local job that fails tells the launcher why through the store and says nothing itself:
# the launcher, which sees every rank, prints the one line that explains the job's end.
FAILURE_KEY = "onepass/failure/"


@dataclass(frozen=True)
class Failure:
    rank: int
    line: str              # what went wrong, in a line
    timed_out: bool        # it waited in vain for another rank: the cause lies elsewhere
    time: float            # when (time.time(), the same clock on every rank of the machine)


def report_failure(command: str, rank: int, line: str, timed_out: bool) -> None:
    """Rank side: tell the launcher why this rank fails; without a launcher, say it on stderr."""
    if _launcher_store is None:
        print(f"{command}: error on rank {rank}: {line}", file=sys.stderr, flush=True)
    else:
        _launcher_store.set(f"{FAILURE_KEY}{rank}", json.dumps({"line": line, "timed_out": timed_out,
                                                                "time": time.time()}))


def reported_failures(store: dist.TCPStore, world_size: int) -> dict[int, Failure]:
    """Launcher side: the failures the ranks have reported, by rank."""
    keys = {rank: f"{FAILURE_KEY}{rank}" for rank in range(world_size)}
    return {rank: Failure(rank, **json.loads(store.get(key))) for rank, key in keys.items() if store.check([key])}


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its `parent` dies (Linux; elsewhere a no-op).
    torch's spawn asks for SIGINT, which a rank may take mid-way through its exit, printing
    tracebacks, or not at all while it waits in a collective."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:            # it died before the request: nobody else will ask
            os.kill(os.getpid(), signal.SIGKILL)


def join_local_group(rank: int, world_size: int, port: int, launcher: int | None = None,
                     device: str = "cpu") -> distributed.Context:
    """Make this process rank `rank` of `world_size` on this machine, meeting at the launcher's
    `local_rendezvous` store, on its device for the configured `device` (GPU number `rank` for
    cuda); the processes share the cores, and end with the `launcher` (pid)."""
    if launcher is not None:
        die_with_parent(launcher)
    context = distributed.Context(rank, world_size, distributed.rank_device(device, rank))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    util.share_cores(world_size)
    distributed.use_device(context.device)
    global _launcher_store
    store = _launcher_store = dist.TCPStore("127.0.0.1", port, is_master=False)
    distributed.init_process_group(distributed.backend(context.device), store=store, rank=rank, world_size=world_size,
                        timeout=datetime.timedelta(seconds=distributed.collective_timeout()))
    return context
