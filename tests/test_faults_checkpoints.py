"""Resuming from a checkpoint that is edited, damaged or raced, and run folders that go away: each ends
in one line on stderr naming the input (exit 2) with nothing written, or, mid-run, in a recorded status."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onepass import config, run_files, train
from onepass.schema import ConfigError
from tests.conftest import REPO


def command(log_root: Path, *extra: str, seed: str | None = "3") -> list[str]:
    seeded = ["--seed", seed] if seed is not None else []
    return ["-c", str(REPO / "configs/diabetes.yaml"), str(REPO / "configs/Ours_LR.yaml"), *seeded,
            "--set", "model.layer_sizes=[10, 8, 1]", "--hyperparameter_steps", "2", "-l", str(log_root), *extra]


def run(*argv: str, **popen: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **popen)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("train.py: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` and its bytes (a link as its target's name), but the run directories'
    lock files, which hold the pid of the last process to take them."""
    return {str(p.relative_to(folder)): os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
            for p in sorted(folder.rglob("*")) if (p.is_symlink() or p.is_file()) and p.name != run_files.LOCK_NAME}


@pytest.fixture
def first(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A finished 2-window run with its checkpoint: (checkpoint, log root, run directory)."""
    checkpoint, runs = tmp_path / "ck.pt", tmp_path / "runs"
    assert train.main(command(runs, "-S", str(checkpoint))) == 0
    (metrics,) = runs.rglob("metrics.json")
    return checkpoint, runs, metrics.parent


def edited(checkpoint: Path, changes: dict[str, object]) -> Path:
    """The checkpoint with each dotted field of `changes` set to its value, written beside it."""
    state = torch.load(checkpoint, weights_only=True)
    for field, value in changes.items():
        *parents, last = field.split(".")
        inner = state
        for key in parents:
            inner = inner[key]
        inner[last] = value
    path = checkpoint.with_name("edited.pt")
    torch.save(state, path)
    return path


# ---- 1, 2: the checkpoint's bookkeeping ----

@pytest.mark.parametrize(("field", "value"), [
    ("events.bytes", -1), ("events.file", "../../victim"), ("steps_done", "20"), ("windows_done", True),
    ("logged_at", -3), ("segments", 0), ("train_seconds", float("nan")), ("run_dir", 5),
    ("window_hyperparameters", [1.0]), ("config.seed", -1), ("streams.train.position", -5),
    ("algorithm.rule_state.step", -1), ("steps_done", 10**9), ("windows_done", 10**9), ("logged_at", 21),
])
def test_a_bookkeeping_field_of_the_wrong_type_or_range_is_one_line_naming_it(first, field, value):
    checkpoint, runs, _ = first
    path, before = edited(checkpoint, {field: value}), snapshot(runs)
    result = run(*command(runs, "--hyperparameter_steps", "3", "-s", str(path)))
    one_line_error(result, f"-s {path}: its ", field, "re-create it with -S FILE")
    assert snapshot(runs) == before


def test_a_checkpoint_claiming_more_windows_than_the_config_asks_for_is_refused(first):
    checkpoint, runs, _ = first
    path = edited(checkpoint, {"windows_done": 10**9, "steps_done": 10**10, "logged_at": 10**10})
    before = snapshot(runs)
    one_line_error(run(*command(runs, "--hyperparameter_steps", "3", "-s", str(path))),
                   "has done 1000000000 hyperparameter steps (windows_done), more than hyperparameter_steps = 3")
    assert snapshot(runs) == before


def test_resuming_with_fewer_hyperparameter_steps_than_done_is_refused(first):
    checkpoint, runs, _ = first
    before = snapshot(runs)
    result = run(*command(runs, "--hyperparameter_steps", "1", "-s", str(checkpoint)))
    one_line_error(result, "done 2 hyperparameter steps", "--hyperparameter_steps 2 or more")
    assert snapshot(runs) == before


# ---- 3: the seed ----

def test_resuming_with_another_seed_is_refused(first):
    checkpoint, runs, _ = first
    before = snapshot(runs)
    result = run(*command(runs, "--hyperparameter_steps", "3", "-s", str(checkpoint), seed="4"))
    one_line_error(result, "different config", "differing keys: seed")
    assert snapshot(runs) == before


def test_a_resumption_without_a_seed_continues_and_records_the_checkpoints(tmp_path):
    checkpoint, runs = tmp_path / "ck.pt", tmp_path / "runs"
    assert run(*command(runs, "-S", str(checkpoint), seed=None)).returncode == 0     # a drawn seed
    (run_dir,) = {p.parent for p in runs.rglob("config.json")}
    drawn = json.loads((run_dir / "config.json").read_text())["seed"]
    result = run(*command(runs, "--hyperparameter_steps", "3", "-s", str(checkpoint), seed=None))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["seed"], metrics["weight_steps"], metrics["segments"]) == (drawn, 30, 2)


# ---- 4: one process per run directory ----

def hold(run_dir: Path) -> object:
    """Hold the run directory as another run would (its lock, with this process's pid)."""
    lock = open(run_dir / run_files.LOCK_NAME, "w")     # noqa: SIM115 -- closed by the caller
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def test_a_run_directory_in_use_is_refused_at_once(first):
    checkpoint, runs, run_dir = first
    with hold(run_dir):
        before = snapshot(runs)
        result = run(*command(runs, "--hyperparameter_steps", "3", "-s", str(checkpoint)))
        one_line_error(result, f"run directory {run_dir} is in use by another process (pid {os.getpid()})")
        assert snapshot(runs) == before


def test_a_run_into_a_given_directory_in_use_is_refused_before_writing(tmp_path):
    """As a batch re-runs a run in place: the directory is the run's only once it holds it."""
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    cfg = config.load_from([str(REPO / "configs/diabetes.yaml"), str(REPO / "configs/Ours_LR.yaml")],
                           overrides=["hyperparameter_steps=1", f"log_root={tmp_path / 'runs'}"])
    with hold(run_dir), pytest.raises(ConfigError, match=f"is in use by another process \\(pid {os.getpid()}\\)"):
        train.train(cfg, run_dir=run_dir, show_progress=False)
    assert [p.name for p in run_dir.iterdir()] == [run_files.LOCK_NAME]


def test_two_concurrent_resumptions_of_one_checkpoint_the_second_is_refused(first):
    checkpoint, runs, run_dir = first
    lock = run_dir / run_files.LOCK_NAME
    resuming = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                                 *command(runs, "--hyperparameter_steps", "100000", "-s", str(checkpoint))],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(events := sorted(run_dir.glob("events.out.tfevents.*"))) < 2 and time.monotonic() < deadline:
            assert resuming.poll() is None, resuming.stderr.read()     # until the resumption logs
            time.sleep(0.01)
        assert lock.read_text() == f"{resuming.pid}\n"
        second = run(*command(runs, "--hyperparameter_steps", "3", "-s", str(checkpoint)))
        one_line_error(second, f"is in use by another process (pid {resuming.pid})")
        assert sorted(run_dir.glob("events.out.tfevents.*")) == events
    finally:
        resuming.send_signal(signal.SIGTERM)
        assert resuming.wait(timeout=60) == 128 + signal.SIGTERM, resuming.stderr.read()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"


# ---- 5: no link followed ----

def test_resuming_does_not_truncate_through_a_link_at_the_event_files_name(first, tmp_path):
    checkpoint, runs, run_dir = first
    victim = tmp_path / "victim.bin"
    victim.write_bytes(os.urandom(100_000))
    name = torch.load(checkpoint, weights_only=True)["events"]["file"]
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(victim)
    before, content = snapshot(runs), victim.read_bytes()
    result = run(*command(runs, "--hyperparameter_steps", "3", "-s", str(checkpoint)))
    one_line_error(result, str(run_dir / name), "symbolic link")
    assert victim.read_bytes() == content and snapshot(runs) == before


def test_a_link_planted_at_the_lock_file_is_refused_with_the_right_advice(first, tmp_path):
    """Was refused with 'free some space': the lock file is opened without following a link."""
    checkpoint, runs, run_dir = first
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run_dir / run_files.LOCK_NAME).unlink(missing_ok=True)
    (run_dir / run_files.LOCK_NAME).symlink_to(victim)
    before = snapshot(runs)
    result = run(*command(runs, "--hyperparameter_steps", "3", "-s", str(checkpoint)))
    one_line_error(result, "remove the symbolic link planted in it")
    assert victim.read_text() == "precious" and snapshot(runs) == before


# ---- 6: a sibling run that differs only by its seed ----

def test_a_checkpoint_naming_a_sibling_of_another_seed_does_not_log_there(first):
    checkpoint, runs, run_dir = first
    assert train.main(command(runs, seed="4")) == 0
    (sibling,) = {p.parent for p in runs.rglob("metrics.json")} - {run_dir}
    path, before = edited(checkpoint, {"run_dir": str(sibling.relative_to(runs))}), snapshot(runs)
    result = run(*command(runs, "--hyperparameter_steps", "3", "-s", str(path)))
    one_line_error(result, f"-s {path}", str(sibling), "another run")
    assert snapshot(runs) == before


# ---- 7: run folders that go away, a full disk ----

def training(runs: Path, checkpoint: Path) -> subprocess.Popen:
    """A long run, once it has written its first periodic checkpoint (so its folder is there)."""
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                                *command(runs, "--hyperparameter_steps", "100000", "-S", str(checkpoint),
                                         "--checkpoint_every", "1")],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    return process


def ended_in_one_line(process: subprocess.Popen, *fragments: str) -> None:
    code = process.wait(timeout=120)
    one_line_error(subprocess.CompletedProcess(process.args, code, "", process.stderr.read()), *fragments)


@pytest.mark.parametrize("removed", ["run directory", "log root"])
def test_a_run_whose_folder_is_removed_mid_run_ends_in_one_line(tmp_path, removed):
    runs, checkpoint = tmp_path / "runs", tmp_path / "ck.pt"
    process = training(runs, checkpoint)
    (run_dir,) = {p.parent for p in runs.rglob("config.json")}
    folder = run_dir if removed == "run directory" else runs
    while folder.exists():           # (the run may write its failure there while it is being removed)
        shutil.rmtree(folder, ignore_errors=True)
    ended_in_one_line(process, f"{run_dir}: the run directory (or a folder above it, or its event file) was removed")
    assert not run_dir.exists()                    # nothing re-creates it
    assert torch.load(checkpoint, weights_only=True)["windows_done"] > 0


def test_a_run_whose_event_file_is_removed_mid_run_records_its_failure(tmp_path):
    runs, checkpoint = tmp_path / "runs", tmp_path / "ck.pt"
    process = training(runs, checkpoint)
    (events,) = runs.rglob("events.out.tfevents.*")
    events.unlink()
    ended_in_one_line(process, f"{events.parent}: the run directory (or a folder above it, or its event file) was")
    metrics = json.loads((events.parent / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "removed mid-run" in metrics["error"] and metrics["weight_steps"] > 0


def full_disk() -> None:
    """In the child: every write past 0 bytes fails with EFBIG, as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def test_a_log_root_on_a_full_disk_is_one_line_and_leaves_no_run_directory(tmp_path):
    # (joblib, imported with the data's libraries, would warn that its semaphore probe hit the limit too)
    result = run(*command(tmp_path / "runs"), preexec_fn=full_disk, env=os.environ | {"JOBLIB_MULTIPROCESSING": "0"})
    one_line_error(result, f"log_root = {tmp_path / 'runs'}: could not write the run directory",
                   os.strerror(errno.EFBIG), "free some space")
    assert not (tmp_path / "runs").exists()
