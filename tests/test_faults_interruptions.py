"""Every interruption ends in a recorded status: signals, killed processes, hung ranks, broken files.

Real processes, real signals: a run stopped by SIGINT/SIGTERM, a run killed past its checkpoint and
resumed, a rank that hangs or dies, a batch worker that dies, and corrupt result files.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onepass import parallel_exec, train, util
from tests.conftest import REPO

pytestmark = pytest.mark.slow
# Only a hang takes this long, however busy the machine: the tests assert what happens, not how fast.
HANG = 600     # seconds


def command(log_root: Path, *extra: str) -> list[str]:
    return ["-c", str(REPO / "configs/diabetes.yaml"), str(REPO / "configs/Ours_LR_Momentum.yaml"), "--seed", "3",
            "--set", "model.layer_sizes=[10, 8, 1]", "--set", "batch_size=32", "--set", "dtype=float64",
            "-l", str(log_root), *extra]


def start_and_wait_for(path: Path, argv: list[str], script: Path = REPO / "train.py",
                       env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `script` in a real process; return once it has written `path` (it is training by then)."""
    process = subprocess.Popen([sys.executable, str(script), *argv], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + HANG
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()[1]
    return process


def assert_same_model(a: Path, b: Path) -> None:
    got, expected = (torch.load(path, weights_only=True) for path in (a, b))
    assert got["steps_done"] == expected["steps_done"]
    for name, value in expected["model"].items():
        assert torch.equal(got["model"][name], value), name
    for x, y in zip(got["hyperparameters"]["raw"], expected["hyperparameters"]["raw"], strict=True):
        assert torch.equal(x, y)


# -- 1. SIGINT / SIGTERM: a clean stop, a final checkpoint, a resumable run --------------------------

@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_run_stops_cleanly_and_resumes_bit_for_bit(signum, code, tmp_path):
    handled = (signal.SIGTERM, signal.SIGINT)
    before = [signal.getsignal(s) for s in handled]      # (not always the defaults: Ray installs its own)
    state, periodic, whole = tmp_path / "state.pt", tmp_path / "state.pt", tmp_path / "whole.pt"
    process = start_and_wait_for(periodic, command(tmp_path / "runs", "--hyperparameter_steps", "100000",
                                                   "-S", str(state), "--checkpoint_every", "5"))
    process.send_signal(signum)
    _, err = process.communicate(timeout=HANG)
    assert process.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    windows = torch.load(state, weights_only=True)["windows_done"]
    assert 0 < windows < 100000
    line = f"train.py: interrupted by {signum.name} after {windows * 10} weight steps; resume with -s {state}"
    assert line in err, err
    (metrics_file,) = (tmp_path / "runs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "interrupted" and metrics["weight_steps"] == windows * 10

    steps = ("--hyperparameter_steps", str(windows + 3))
    assert train.main(command(tmp_path / "elsewhere", *steps, "-s", str(state), "-S", str(state))) == 0
    assert train.main(command(tmp_path / "whole", *steps, "-S", str(whole))) == 0
    assert_same_model(state, whole)
    assert json.loads(metrics_file.read_text())["status"] == "completed"
    assert [signal.getsignal(s) for s in handled] == before              # restored after the run


ONE_RANK_LOOKS = '''
import os
import sys

from onepass import launch
from onepass import train

original = launch.launcher_stop


def launcher_stop(now=False):
    if os.environ.get("RANK") == "0" and not now:     # rank 0 never sees the request itself
        return None
    return original(now)


launch.launcher_stop = launcher_stop   # module level: spawned ranks import this file too
if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
'''


@pytest.mark.parametrize("signum,code,group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],
                         ids=["ctrl-c to the terminal's process group", "SIGTERM to the launcher"])
def test_a_signalled_nproc_job_stops_every_rank_after_the_same_window(signum, code, group, tmp_path):
    """Ctrl-C reaches the launcher and every rank at once; `kill` the launcher alone. Either way the
    ranks stop after one and the same window, even when only one of them has seen the launcher's
    request (here rank 1); the run is recorded as interrupted, its checkpoint resumes, and the
    launcher says so in one line, with no traceback."""
    driver, state = tmp_path / "one_rank_looks.py", tmp_path / "state.pt"
    driver.write_text(ONE_RANK_LOOKS)
    argv = [sys.executable, str(driver), *command(tmp_path / "runs", "--hyperparameter_steps", "100000",
                                                  "-S", str(state), "--checkpoint_every", "5", "--nproc", "2")]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + HANG
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()[1]
    os.killpg(process.pid, signum) if group else process.send_signal(signum)
    _, err = process.communicate(timeout=HANG)
    assert process.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Warning" not in err, err
    windows = torch.load(state, weights_only=True)["windows_done"]
    assert f"train.py: interrupted by {signum.name} after {windows * 10} weight steps; resume with" in err, err
    (metrics_file,) = (tmp_path / "runs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "interrupted" and metrics["weight_steps"] == windows * 10
    assert train.main(command(tmp_path / "runs", "--hyperparameter_steps", str(windows + 2), "-s", str(state),
                              "--nproc", "2")) == 0


# -- 5. Results: one corrupt file costs one run, not the folder ------------------------------------

def test_a_corrupt_run_is_skipped_with_a_warning_naming_its_file(tmp_path, capsys):
    assert train.main(command(tmp_path / "one", "--hyperparameter_steps", "3")) == 0
    (run,) = (path.parent for path in (tmp_path / "one").rglob("config.json"))
    results = tmp_path / "results"
    for name in ("good", "bad_metrics", "bad_events", "bad_cache"):
        shutil.copytree(run, results / name)
    util.get_tags(results)                                   # writes every run's cache
    (results / "bad_metrics" / "metrics.json").write_text('{"status": "compl')
    (events,) = (results / "bad_events").glob("events.out.tfevents.*")
    data = bytearray(events.read_bytes())
    data[len(data) // 2] ^= 0xFF
    events.write_bytes(bytes(data))
    (results / "bad_cache" / util.CACHE_NAME).write_bytes(b"not an archive")
    capsys.readouterr()

    runs = util.get_tags(results)
    err = capsys.readouterr().err
    assert sorted(runs) == ["bad_cache", "good"]                 # a cache is rebuilt, not a reason to skip
    assert runs["bad_cache"].scalars.keys() == runs["good"].scalars.keys()
    assert sorted(path.name for path, _ in runs.skipped) == ["bad_events", "bad_metrics"]
    assert str(results / "bad_metrics" / "metrics.json") in err and str(events) in err
    assert str(results / "bad_cache" / util.CACHE_NAME) in err
    assert len(err.splitlines()) == 3, err

    from onepass import paper_plots
    assert paper_plots.main([str(results), "--out", str(tmp_path / "paper")]) == 0
    report = (tmp_path / "paper" / "report.md").read_text()
    assert f"the run {results / 'bad_metrics'}" in report and f"the run {results / 'bad_events'}" in report


def test_get_tags_on_a_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such results folder"):
        util.get_tags(tmp_path / "nowhere")


# -- 2. A run killed past its checkpoint and resumed: each step once, on both axes, in TensorBoard ----

def tensorboard_scalars(log_root: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar of the one run below `log_root`, as TensorBoard's reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (run,) = (path.parent for path in log_root.rglob("config.json"))
    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_shows_each_step_once_after_a_kill_and_a_resumption(tmp_path):
    periodic = tmp_path / "periodic.pt"
    steps = ("--hyperparameter_steps", "1000")
    process = start_and_wait_for(periodic, command(tmp_path / "killed", *steps, "-S", str(periodic),
                                                   "--checkpoint_every", "300"))
    (events,) = (tmp_path / "killed").rglob("events.out.tfevents.*")
    at_checkpoint, deadline = events.stat().st_size, time.monotonic() + HANG
    while events.stat().st_size < at_checkpoint + 30_000 and time.monotonic() < deadline:
        time.sleep(0.01)                  # until it has written windows past its checkpoint
    process.kill()
    process.wait(timeout=HANG)
    assert torch.load(periodic, weights_only=True)["windows_done"] == 300

    assert train.main(command(tmp_path / "elsewhere", *steps, "-s", str(periodic))) == 0
    assert train.main(command(tmp_path / "whole", *steps)) == 0
    resumed, uninterrupted = tensorboard_scalars(tmp_path / "killed"), tensorboard_scalars(tmp_path / "whole")
    assert resumed.keys() == uninterrupted.keys() and "Last_Hyperparameter/Lr" in resumed
    for tag, points in resumed.items():
        assert [step for step, _ in points] == [step for step, _ in uninterrupted[tag]], tag
    for tag in ("Last_Hyperparameter/Lr", "Last_Loss/Validation", "Loss/Training"):
        assert resumed[tag] == uninterrupted[tag], tag


# -- 3. Distributed: a hung or killed rank, a killed launcher ----------------------------------------

FAULTY_DRIVER = '''
import os
import signal
import sys
import time

from onepass import train

original = train.Learner.train_step


def train_step(self, stepper):
    if self.context.rank == 1 and self.record.steps_done == 25:
        if os.environ["FAULT"] == "hang":
            if "MARK" in os.environ:       # tells the test that rank 1 hangs now
                open(os.environ["MARK"], "w").close()
            time.sleep(1000)
        else:
            os.kill(os.getpid(), signal.Signals[os.environ["FAULT"]])
    return original(self, stepper)


train.Learner.train_step = train_step   # module level: spawned ranks import this file too
if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
'''


def faulty_job(tmp_path, fault: str, *extra: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a 2-rank job whose rank 1, at step 25, hangs (`fault`
    "hang") or receives the signal named `fault` (e.g. "SIGKILL")."""
    driver = tmp_path / "faulty_driver.py"
    driver.write_text(FAULTY_DRIVER)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "FAULT": fault, "ONEPASS_COLLECTIVE_TIMEOUT": "3",
           "MARK": str(tmp_path / "hanging")}
    return [str(driver), *command(tmp_path / "runs", "--nproc", "2", *extra)], env


def run_faulty_job(tmp_path, fault: str) -> subprocess.CompletedProcess:
    argv, env = faulty_job(tmp_path, fault)
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=HANG, env=env)


HUNG_RANK_1 = ("train.py: error: rank 1 stopped responding: the other ranks waited 3 s for it in a collective "
               "operation (ONEPASS_COLLECTIVE_TIMEOUT sets the limit), so the job stopped\n")


def test_a_hung_rank_ends_the_job_when_the_collective_times_out(tmp_path):
    result = run_faulty_job(tmp_path, "hang")
    assert result.returncode == 1 and result.stderr == HUNG_RANK_1, result.stderr


def test_a_killed_rank_is_named_with_its_signal(tmp_path):
    result = run_faulty_job(tmp_path, "SIGKILL")
    assert result.returncode == 1, result.stderr
    assert result.stderr == "train.py: error: rank 1 died from signal SIGKILL, so the job stopped\n"


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status            # a zombie has ended


def test_the_ranks_of_a_killed_launcher_end_with_it_silently(tmp_path):
    """Even rank 0, waiting in a collective for the hung rank 1, ends at once and says nothing."""
    argv, env = faulty_job(tmp_path, "hang")
    env["ONEPASS_COLLECTIVE_TIMEOUT"] = "600"
    launcher = start_and_wait_for(tmp_path / "hanging", argv[1:], script=Path(argv[0]), env=env)
    ranks = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                text=True).stdout.split()]
    assert len(ranks) >= 2
    launcher.kill()
    try:
        _, err = launcher.communicate(timeout=HANG)    # every rank has closed its end of stderr
        deadline = time.monotonic() + HANG              # and is exiting
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in ranks)
        assert "Traceback" not in err and "error on rank" not in err, err
    finally:
        for pid in filter(alive, ranks):
            os.kill(pid, signal.SIGKILL)


# -- 4. Batches: a worker that dies costs its run, not the batch -------------------------------------

DYING_WORKER_DRIVER = '''
import os
import signal
import sys

from onepass import parallel_exec
from onepass import train
from onepass import launch

original = train.train


def train_or_die(cfg, *args, **kwargs):
    if cfg.seed == int(os.environ["KILL_SEED"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(cfg, *args, **kwargs)


train.train = train_or_die      # module level: the pool's spawned workers import this file too
if __name__ == "__main__":
    sys.exit(parallel_exec.main(sys.argv[1:]))
'''


def test_a_batch_records_the_run_whose_worker_died_and_goes_on(tmp_path):
    driver = tmp_path / "dying_worker_driver.py"
    driver.write_text(DYING_WORKER_DRIVER)
    points = parallel_exec.iterations(4, seed=0)
    short = ("hyperparameter_steps=5", "model.layer_sizes=[10, 8, 1]", "batch_size=64")
    result = subprocess.run(
        [sys.executable, str(driver), "-l", str(tmp_path), "-d", "diabetes", "-a", "Random", "--generator",
         "iterations", "--count", "4", "--seed", "0", "--workers", "2", *(f"--set={value}" for value in short)],
        cwd=REPO, capture_output=True, text=True, timeout=HANG,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "KILL_SEED": str(points[1]["seed"])})
    assert result.returncode == 1, result.stderr
    assert "3 completed, 1 failed" in result.stdout, result.stderr
    jobs = parallel_exec.make_jobs(["diabetes"], ["Random"], points, short)
    metrics = [json.loads((job.run_dir(tmp_path) / "metrics.json").read_text()) for job in jobs]
    assert [m["status"] for m in metrics] == ["completed", "failed", "completed", "completed"]
    assert "worker process running this job" in metrics[1]["error"]
    assert "died from signal SIGKILL" in metrics[1]["error"]
