"""Many independent training runs: every algorithm from the same initialisations, resumable.

    python parallel_exec.py -l runs/mine -d uci_energy -a Random Ours_LR_Momentum --count 5 --seed 0
    python parallel_exec.py -l runs/mine -d uci_energy -a DiffThroughOpt --generator replay --source runs/mine

A batch is a list of jobs (config files + overrides). The generator draws initialisations
(hyperparameters and a seed); each one runs once per dataset and algorithm, so every algorithm
starts from the same points. Each job logs into `<root>/<group>/<config hash>`, named by a stable
hash of its complete config: re-running the same command skips the runs that finished (completed
or diverged), re-runs unfinished and failed ones in place, and never duplicates one, even after
the whole batch was killed. A run that raises, or whose worker process dies (killed, out of
memory), is recorded in its directory (metrics.json with status "failed", error.txt) and the batch
goes on. A file named STOP in the root, or Ctrl-C, stops
the batch once the runs in progress have finished.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import traceback
from collections import Counter
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from onepass import config, factories, own_data, results_table, run_files, util
from onepass.algorithms.weight_update import RULES
from onepass.config import ConfigError
from onepass.progress import Progress
from onepass.schema import folder_name

CONFIGS = Path(__file__).resolve().parent / "configs"
OWN_DATA = CONFIGS / "own" / "data.yaml"      # the defaults under data of the user's own
FINISHED = ("completed", "diverged")
# Keys that say where a run logs, not what it computes: left out of its identity.
LOCATION_KEYS = ("log_root", "run_group_name", "run_name")
MULTIPLIER = "optimiser.lr_multiplier"      # a fixed lr schedule: only for the algorithm that has one
# The paper's ranges of initial hyperparameters (lr and weight decay as log10).
LOG10_LR, LOG10_WEIGHT_DECAY, MOMENTUM = (-6.0, -1.0), (-7.0, -2.0), (0.0, 1.0)


@dataclass(frozen=True)
class Job:
    """One training run: config files merged in order, then `key=value` overrides."""
    files: tuple[str, ...]
    overrides: tuple[str, ...]
    group: str                  # its folder below the batch's root, e.g. "uci_energy/Random"

    def config(self, root: Path) -> config.Config:
        return config.load_from(list(self.files), overrides=[*self.overrides, f"log_root={root}"])

    def run_dir(self, root: Path) -> Path:
        return root / self.group / config_hash(config.to_dict(self.config(root)))


def config_hash(values: dict) -> str:
    """A stable 12-hex-digit name for a complete config (its log location aside)."""
    identity = {key: value for key, value in values.items() if key not in LOCATION_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def status_of(run_dir: Path) -> str | None:
    """completed / diverged / failed for a run that got that far, else None (never ran, killed, or
    its metrics.json is damaged: it runs again)."""
    try:
        return util.read_metrics(run_dir).get("status")
    except util.UnreadableFile:
        return None


# -------------------------------------------------------------------------------------------------
# Initialisations: lists of {config key: value}, each run once per dataset and algorithm.

def natural_sgd(count: int, seed: int, log10_lr: tuple[float, float] = LOG10_LR,
                log10_weight_decay: tuple[float, float] = LOG10_WEIGHT_DECAY) -> list[dict]:
    """The paper's ranges: log10 lr ~ U[-6, -1], log10 weight decay ~ U[-7, -2] (or the ranges
    given), momentum ~ U[0, 1), an lr multiplier ~ U[0.95, 1.01] (used by Random_SteppedLR only),
    and a model seed."""
    rng = np.random.default_rng(seed)
    return [{"optimiser.lr": 10 ** rng.uniform(*log10_lr),
             "optimiser.weight_decay": 10 ** rng.uniform(*log10_weight_decay),
             "optimiser.momentum": rng.uniform(*MOMENTUM), MULTIPLIER: rng.uniform(0.95, 1.01),
             "seed": int(rng.integers(2**31))} for _ in range(count)]


REPLAYED = {"optimiser.lr": util.NUMBER, "optimiser.weight_decay": util.NUMBER, "optimiser.momentum": util.NUMBER,
            "seed": util.SEED}


def replay(folder: Path, algorithm: str | None = None) -> list[dict]:
    """The initialisations of the runs below `folder` (of one algorithm, if named), each once. A run
    that failed before its config was merged (no algorithm) has none; a damaged config.json is an
    UnreadableFile (replaying around it would silently drop an initialisation)."""
    points = {}
    for config_file in sorted(Path(folder).rglob("config.json")):
        try:
            values = util.read_json_object(config_file, {"algorithm?": str})
            if "algorithm" not in values or algorithm not in (None, values["algorithm"]):
                continue
            util.require_shape(values, REPLAYED, config_file)
        except util.UnreadableFile as error:
            raise util.UnreadableFile(f"--source {folder}: {error}; repair or delete that run") from None
        point = {key: _lookup(values, key) for key in REPLAYED}
        points[json.dumps(point, sort_keys=True)] = point
    if not points:
        raise ConfigError(f"--source {folder}: no runs to replay there")
    return list(points.values())


def sensitivity(points: list[dict], total_steps: int = 4000, largest: int = 10) -> list[tuple[str, dict]]:
    """Every (T, i) with 1 <= i <= T <= `largest`, for every point: T weight steps per
    hyperparameter step, i Neumann terms, and about `total_steps` weight steps in all."""
    return [(f"Update{steps}_Rollback{terms}",
             point | {"network_weight_steps": steps, "hyperparameter_steps": total_steps // steps,
                      "tuning.rollback_distance": terms})
            for steps in range(1, largest + 1) for terms in range(1, steps + 1) for point in points]


def iterations(count: int, seed: int) -> list[dict]:
    """Numbered repetitions that differ only in their seed (the configs' own hyperparameters)."""
    rng = np.random.default_rng(seed)
    return [{"seed": int(rng.integers(2**31))} for _ in range(count)]


def _lookup(values: dict, dotted: str) -> object:
    for part in dotted.split("."):
        values = values[part]
    return values


def unused_settings(files: tuple[str, ...], extra: tuple[str, ...] = ()) -> set[str]:
    """The optimiser settings a point may carry that the run of `files` and `extra` has no use for:
    another update rule's hyperparameters (momentum under Adam, beta1 under SGD; the rule is that
    of the merged config, the weight_update.RULES entry of its optimiser.name), and the lr
    multiplier unless the algorithm follows a fixed lr schedule (its config sets one)."""
    cfg = config.load_from(list(files), overrides=list(extra))
    kept = {f"optimiser.{name}" for name in RULES[cfg.optimiser.name].hyperparameters}
    if cfg.optimiser.lr_multiplier is not None:
        kept.add(MULTIPLIER)
    every = {f"optimiser.{name}" for rule in RULES.values() for name in rule.hyperparameters} | {MULTIPLIER}
    return every - kept


def dataset_configs(dataset: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(config files, overrides) of a dataset named on a command line: configs/NAME.yaml, or for data
    of the user's own (`module.path:factory`, own_data.py) the defaults of OWN_DATA with that name."""
    if factories.is_factory_name(dataset):
        return (str(OWN_DATA),), (f"dataset.name={dataset}",)
    return (str(CONFIGS / f"{dataset}.yaml"),), ()


def check_names(datasets: list[str], algorithms: list[str]) -> None:
    """Every dataset and algorithm has its config; data of the user's own (module:factory) imports."""
    for name in datasets + algorithms:
        if name in datasets and factories.is_factory_name(name):
            try:
                factories.factory(name, own_data.RETURNS)
            except ConfigError as error:
                raise ConfigError(f"dataset {name!r}: {error}") from None
        elif not (CONFIGS / f"{name}.yaml").is_file():
            raise ConfigError(f"no config configs/{name}.yaml")


def make_jobs(datasets: list[str], algorithms: list[str], points: list[dict | tuple[str, dict]],
              extra: tuple[str, ...] = (), prefix: str = "") -> list[Job]:
    """Every point for every dataset and algorithm; a point may carry its own subgroup name. A
    point's value for an optimiser setting the algorithm's rule does not have is left out (see
    `unused_settings`): one draw of lr, weight decay and momentum serves SGD and Adam alike."""
    if any(item.partition("=")[0].strip() == "dataset.name" for item in extra):
        raise ConfigError("--set dataset.name: name the datasets themselves (parallel_exec.py -d NAME, run_all.py "
                          "--datasets NAME; a registered name or module.path:factory), so that each run is grouped "
                          "under the data it trained on")
    jobs = []
    for dataset in datasets:
        base, named = dataset_configs(dataset)
        for algorithm in algorithms:
            files, dataset_extra = (*base, str(CONFIGS / f"{algorithm}.yaml")), named + tuple(extra)
            unused = unused_settings(files, dataset_extra)
            for point in points:
                subgroup, values = point if isinstance(point, tuple) else ("", point)
                values = {key: value for key, value in values.items() if key not in unused}
                group = "/".join(part for part in (prefix, folder_name(dataset), algorithm, subgroup) if part)
                overrides = tuple(f"{key}={value!r}" for key, value in values.items()) + dataset_extra
                jobs.append(Job(files, overrides, group))
    return jobs


# -------------------------------------------------------------------------------------------------
# Running

RUNNING_ELSEWHERE = "running elsewhere"    # a job whose run another process holds: left to it


def start_afresh(run_dir: Path) -> bool:
    """Clear an unfinished or failed earlier attempt at a run, to run it again; False, and nothing
    removed, when another process holds the directory (the run is in progress there)."""
    if run_dir.exists():
        if run_files.held_elsewhere(run_dir):
            return False
        shutil.rmtree(run_dir)
    return True


def run_job(job: Job, root: Path) -> tuple[str, str]:
    """Run one job in this process; returns (status, run directory). Never raises for a failed run."""
    from onepass import train
    run_dir = job.run_dir(root)
    if not start_afresh(run_dir):
        return RUNNING_ELSEWHERE, str(run_dir)          # another batch on this folder runs it now
    try:
        _, metrics = train.train(job.config(root), run_dir=run_dir, show_progress=False)
        return metrics["status"], str(run_dir)
    except run_files.RunDirInUse:        # another batch started it a moment ago: its run, not a failure here
        return RUNNING_ELSEWHERE, str(run_dir)
    except Exception as error:      # recorded, and the batch goes on
        return record_failure(job, root, f"{type(error).__name__}: {error}", traceback.format_exc())


def record_failure(job: Job, root: Path, error: str, details: str) -> tuple[str, str]:
    """Mark the job's run as failed (metrics.json, with the `details` in error.txt)."""
    run_dir = job.run_dir(root)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(details)
    if not (run_dir / "config.json").is_file():
        util.write_json(run_dir / "config.json", {"files": job.files, "overrides": job.overrides})
    util.write_json(run_dir / "metrics.json", {"status": "failed", "error": error})
    return "failed", str(run_dir)


_started = None     # in a worker: where it says which job it starts


def _worker_init(workers: int, started: multiprocessing.SimpleQueue) -> None:
    """Workers leave Ctrl-C to the parent (which lets them finish) and share the cores."""
    global _started
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    util.share_cores(workers)
    _started = started


def _run_reported(job: Job, root: Path) -> tuple[str, str]:
    _started.put((os.getpid(), job))
    return run_job(job, root)


class WorkerPool:
    """A pool of spawned worker processes that outlives the death of one (a SIGKILL, the OOM
    killer, a crash in native code). The executor then breaks and fails every job in progress; the
    workers say which job they start, so the job whose worker died is told from those that were
    only stopped with it (by SIGTERM, from the executor)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.context = multiprocessing.get_context("spawn")
        self.started = self.context.SimpleQueue()
        self._open()

    def _open(self) -> None:
        self.executor = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=self.context, initializer=_worker_init, initargs=(self.workers, self.started))
        self.job_of: dict[int, Job] = {}                             # worker pid -> the job it started last
        self.processes: dict[int, multiprocessing.Process] = {}

    def submit(self, job: Job, root: Path) -> concurrent.futures.Future:
        future = self.executor.submit(_run_reported, job, root)
        self.processes |= {process.pid: process for process in multiprocessing.active_children()}
        self._read_started()
        return future

    def _read_started(self) -> None:
        while not self.started.empty():
            pid, job = self.started.get()
            self.job_of[pid] = job

    def deaths(self) -> dict[Job, str]:
        """After the pool broke: the jobs whose worker died, and how; then a fresh pool."""
        self.executor.shutdown(wait=True)
        self._read_started()
        died = {}
        for pid, job in self.job_of.items():
            code = self.processes[pid].exitcode if pid in self.processes else None
            if code and code != -signal.SIGTERM:
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                died[job] = f"WorkerDied: the worker process running this job (pid {pid}) died from {how}"
        self._open()
        return died

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def pending(jobs: list[Job], root: Path) -> tuple[list[Job], int]:
    """The jobs still to run, and how many are already finished. Refuses a batch with a bad config
    (before anything runs) or with two jobs that are the same run."""
    todo, done, seen = [], 0, {}
    for job in jobs:
        run_dir = job.run_dir(root)           # validates the job's config
        if run_dir in seen:
            raise ConfigError(f"two jobs are the same run ({job.group}: {' '.join(job.overrides)})")
        seen[run_dir] = job
        if status_of(run_dir) in FINISHED:
            done += 1
        else:
            todo.append(job)
    return todo, done


def after_break(pool: WorkerPool, running: dict[concurrent.futures.Future, Job], root: Path) -> tuple[list[str],
                                                                                                        list[Job]]:
    """The broken pool's jobs in progress: the statuses of those recorded as failed (their worker
    died; all of them if no death can be told apart), and those to run again."""
    deaths = pool.deaths()
    if not any(job in deaths for job in running.values()):
        deaths = dict.fromkeys(running.values(), "WorkerDied: a worker process died while this job ran")
    failed = [record_failure(job, root, deaths[job], deaths[job] + "\n")[0] for job in running.values()
              if job in deaths]
    return failed, [job for job in running.values() if job not in deaths]


def tally(counts: Counter, running: int) -> str:
    """'12 completed  1 failed  2 running': where a batch stands, for its progress lines."""
    return "  ".join([*(f"{n} {status}" for status, n in counts.items() if n), f"{running} running"])


def run_batch(jobs: list[Job], root: Path, workers: int | None = None, show_progress: bool = True,
              name: str = "batch") -> Counter:
    """Run every unfinished job on a local pool of `workers` processes; returns the count of each
    final status (skipped for runs finished before). A job whose worker process dies is recorded
    as failed, and the batch goes on in a fresh pool. Progress: a bar on a terminal, else a line
    at least every 30 s."""
    root = Path(root)
    todo, done = pending(jobs, root)
    counts = Counter(skipped=done)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    progress = Progress(len(jobs), done, name, "run", enabled=show_progress)
    running: dict[concurrent.futures.Future, Job] = {}
    progress.status = lambda: tally(counts, len(running))

    def count(status: str) -> None:
        counts[status] += 1
        progress.update(1)

    queue: Iterator[Job] = iter(todo)
    pool = WorkerPool(workers)
    stopping = False
    try:
        while True:
            while not stopping and len(running) < workers:
                job = next(queue, None)
                if job is None or (root / "STOP").exists():
                    stopping = stopping or job is not None
                    break
                running[pool.submit(job, root)] = job
            if not running:
                break
            finished, _ = concurrent.futures.wait(running, timeout=progress.every,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
            progress.tick()             # a line when due, even while every run takes long
            if any(isinstance(future.exception(), BrokenProcessPool) for future in finished):
                failed, again = after_break(pool, running, root)
                running.clear()
                for status in failed:
                    count(status)
                queue = itertools.chain(again, queue)
                continue
            for future in finished:
                del running[future]
                count(future.result()[0])
    except KeyboardInterrupt:
        progress.write("stopping: waiting for the runs in progress to finish (Ctrl-C again to abandon them)")
        for future in concurrent.futures.as_completed(running):
            count(future.result()[0])
    finally:
        pool.close()
    progress.close()
    counts["not run"] = len(jobs) - sum(counts.values())
    return counts


# -------------------------------------------------------------------------------------------------
# Ray: a cluster for plain batches (Ray Tune's ASHA and population-based training: ray_tune.py)

REPO = Path(__file__).resolve().parent
RAY_INSTALL = "install it with `make ray` (or `pip install -e '.[ray]'`)"


def import_ray(needed_by: str, module: str = "ray") -> ModuleType:
    """`module` (ray or one of its submodules, e.g. ray.tune) for the feature `needed_by`. Ray is an
    optional extra: without it, a ConfigError naming the install command (the scripts print it on
    one line and exit 2)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"{needed_by} needs Ray, an optional extra that is not installed ({error}): "
                          f"{RAY_INSTALL}") from None


def connect_to_ray(address: str) -> None:
    """Join a running Ray cluster ("auto": the one `ray start` made on this machine); its workers
    import this repository from the same path (a shared file system on a real cluster)."""
    ray = import_ray("a Ray cluster")
    if not ray.is_initialized():
        try:
            ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
                     log_to_driver=False, configure_logging=False)
        except ConnectionError as error:
            raise ConfigError(f"--ray_address {address}: no Ray cluster there ({error}); start one with "
                              f"`ray start --head`") from None


def run_batch_on_ray(jobs: list[Job], root: Path, address: str = "auto", show_progress: bool = True) -> Counter:
    """`run_batch` on a Ray cluster: one task (one CPU) per unfinished job."""
    ray = import_ray("--backend ray")
    connect_to_ray(address)
    root = Path(root).resolve()
    todo, done = pending(jobs, root)
    counts = Counter(skipped=done)
    remote_job = ray.remote(num_cpus=1)(run_job)
    progress = Progress(len(jobs), done, "batch on Ray", "run", enabled=show_progress)
    running = []
    progress.status = lambda: tally(counts, len(running))
    for job in todo:
        if (root / "STOP").exists():
            break
        running.append(remote_job.remote(job, root))
    while running:
        finished, running = ray.wait(running, num_returns=1)
        counts[ray.get(finished[0])[0]] += 1
        progress.update(1)
    progress.close()
    counts["not run"] = len(jobs) - sum(counts.values())
    return counts


def summary(counts: Counter, root: Path) -> str:
    parts = [f"{counts[key]} {key}" for key in ("completed", "diverged", "failed", "skipped", RUNNING_ELSEWHERE,
                                                "not run") if counts[key]]
    return f"{', '.join(parts) or 'nothing to do'}; results in {root}"


def main(argv: list[str] | None = None) -> int:
    parser = util.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-l", "--log_root", type=Path, required=True, metavar="DIR", help="results folder")
    parser.add_argument("-d", "--datasets", nargs="+", required=True, metavar="NAME",
                        help="dataset configs (configs/NAME.yaml), or data of your own as module.path:factory "
                             "(over configs/own/data.yaml)")
    parser.add_argument("-a", "--algorithms", nargs="+", required=True, metavar="NAME",
                        help="algorithm configs (configs/NAME.yaml)")
    parser.add_argument("--generator", choices=["natural_sgd", "replay", "sensitivity", "iterations"],
                        default="natural_sgd", help="where the initialisations come from (default natural_sgd)")
    parser.add_argument("--count", type=config.positive_int, default=1, help="initialisations to draw (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    parser.add_argument("--source", type=Path, metavar="DIR", help="replay: the results folder to replay")
    parser.add_argument("--workers", type=config.positive_int, help="processes (default: the number of cores)")
    parser.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="local process pool (default), or the tasks of a running Ray cluster")
    parser.add_argument("--ray_address", default="auto", help="with --backend ray: the cluster (default auto)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run, as train.py's --set; repeatable")
    args = parser.parse_args(argv)
    try:
        util.check_output_folder(args.log_root, f"-l {args.log_root}", "choose another with -l DIR")
        check_names(args.datasets, args.algorithms)
        if args.generator == "replay":
            if args.source is None:
                raise ConfigError("--generator replay needs --source DIR")
            points = replay(args.source)
        elif args.generator == "iterations":
            points = iterations(args.count, args.seed)
        else:
            points = natural_sgd(args.count, args.seed)
            if args.generator == "sensitivity":
                points = sensitivity(points)
        jobs = make_jobs(args.datasets, args.algorithms, points, tuple(args.overrides))
        if args.backend == "ray":
            counts = run_batch_on_ray(jobs, args.log_root, args.ray_address)
        else:
            counts = run_batch(jobs, args.log_root, args.workers)
    except (ConfigError, util.UnreadableFile) as error:     # a bad flag, or a damaged file it names
        print(f"parallel_exec.py: error: {error}", file=sys.stderr)
        return 2
    print(f"\n{results_table.render(args.log_root, 'parallel_exec.py')}\n\n{summary(counts, args.log_root)}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(util.run_command(main))
