"""A distributed environment set by hand ends in one line, exit code 2 and nothing written, whether
a value cannot describe a rank of the job (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, ONEPASS_COLLECTIVE_TIMEOUT) or the ranks cannot meet (a rank that never
arrives, two processes claiming rank 0); and a failed job of several ranks says why in one line,
naming a stopped rank as hung, never by the signal the launcher sent it.

Real processes: train.py run with the environment a user would set."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.test_distributed import FAILING_DRIVER
from tests.test_faults_interruptions import FAULTY_DRIVER, HANG, HUNG_RANK_1, faulty_job

RUN = ["train.py", "-c", "configs/diabetes.yaml", "configs/Random.yaml", "--set", "hyperparameter_steps=2"]
VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "ONEPASS_COLLECTIVE_TIMEOUT")


def environment(**variables: str) -> dict[str, str]:
    """This process's environment with the distributed variables replaced by `variables`."""
    return {name: value for name, value in os.environ.items() if name not in VARIABLES} | variables


def run(tmp_path: Path, *extra: str, script: list[str] = RUN, **variables: str) -> subprocess.CompletedProcess:
    return run_cli(*script, "-l", str(tmp_path / "runs"), *extra, timeout=HANG, env=environment(**variables))


def assert_one_line(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("train.py: error"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def start(argv: list[str], variables: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(**variables))


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=HANG)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- 1. values that cannot describe a rank of the job, refused before anything starts ---------------

RANKS = "must be a whole number from 0 to 1"
BAD_ENVIRONMENTS = {
    "no meeting point": ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set"),
    "no MASTER_ADDR": ({"WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "WORLD_SIZE=2 but MASTER_ADDR not set"),
    "rank not a number": ({"RANK": "abc", "WORLD_SIZE": "2"}, f"RANK=abc: {RANKS}"),
    "rank out of range": ({"RANK": "2", "WORLD_SIZE": "2"}, f"RANK=2: {RANKS}"),
    "rank without a world": ({"RANK": "1"}, "RANK=1: must be 0"),
    "no processes": ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be a whole number at least 1"),
    "more local ranks than ranks": ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3"),
    "local rank not a number": ({"LOCAL_RANK": "x"}, "LOCAL_RANK=x: must be 0"),
    "local rank out of range": ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "2"}, f"LOCAL_RANK=2: {RANKS}"),
    "port out of range": ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
                          "MASTER_PORT=70000: must be a whole number from 1 to 65535"),
}


@pytest.mark.parametrize("case", BAD_ENVIRONMENTS)
def test_a_bad_distributed_environment_is_one_line_exit_2(case, tmp_path):
    variables, fragment = BAD_ENVIRONMENTS[case]
    assert_one_line(run(tmp_path, **variables), 2, fragment)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value,nproc", [("1e300", "2"), ("1e-9", "2"), ("1e300", "1"), ("0.5", "1"),
                                         ("100000", "1"), ("nan", "1"), ("inf", "1"), ("-3", "1"), ("ten", "1")])
def test_a_collective_timeout_outside_a_second_to_a_day_is_refused(value, nproc, tmp_path):
    """Bug: 1e300 and 1e-9 accepted; the job then failed pointing at an error line never printed."""
    result = run(tmp_path, "--nproc", nproc, ONEPASS_COLLECTIVE_TIMEOUT=value)
    assert_one_line(result, 2, f"ONEPASS_COLLECTIVE_TIMEOUT={value}: must be a number of seconds from 1 to 86400")
    assert not (tmp_path / "runs").exists()


# -- 2. ranks that cannot meet: one line within the timeout -------------------------------------------

def meeting(port: int, **variables: str) -> dict[str, str]:
    return {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "ONEPASS_COLLECTIVE_TIMEOUT": "1"} | variables


@pytest.mark.slow
def test_a_rank_that_never_arrives_is_named_within_the_timeout(tmp_path):
    port = free_port()
    result = run(tmp_path, **meeting(port, RANK="0"))
    assert_one_line(result, 2, f"WORLD_SIZE=2: not every rank joined rank 0 at 127.0.0.1:{port} within 1 s")
    result = run(tmp_path, **meeting(port, RANK="1"))
    assert_one_line(result, 2, f"RANK=1: no rank 0 answered at MASTER_ADDR:MASTER_PORT=127.0.0.1:{port} within 1 s")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_processes_claiming_rank_0_are_each_told_in_one_line(tmp_path):
    """One holds the port and waits in vain for rank 1; the other finds the port taken."""
    variables = meeting(free_port(), RANK="0", ONEPASS_COLLECTIVE_TIMEOUT="10")   # both start within it
    argv = [sys.executable, *RUN, "-l", str(tmp_path / "runs")]
    results = [finish(process) for process in [start(argv, variables) for _ in range(2)]]
    results.sort(key=lambda result: "already in use" not in result.stderr)
    assert_one_line(results[0], 2, f"MASTER_PORT={variables['MASTER_PORT']} is already in use", "RANK")
    assert_one_line(results[1], 2, "WORLD_SIZE=2: not every rank joined rank 0")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_rank_started_by_hand_that_fails_mid_run_is_one_line_on_each_rank(tmp_path):
    """Rank 1 raises; rank 0 loses its peer. Each says so in a line, with no traceback."""
    driver = tmp_path / "failing_driver.py"
    driver.write_text(FAILING_DRIVER)
    variables = meeting(free_port(), ONEPASS_COLLECTIVE_TIMEOUT="10", PYTHONPATH=str(REPO))
    argv = [sys.executable, str(driver), *RUN[1:], "-l", str(tmp_path / "runs"), "--set", "hyperparameter_steps=10"]
    rank0, rank1 = (finish(process) for process in [start(argv, variables | {"RANK": str(rank)}) for rank in (0, 1)])
    assert_one_line(rank1, 1, "train.py: error on rank 1: RuntimeError: injected failure on rank 1")
    assert_one_line(rank0, 1, "train.py: error on rank 0: ")


# -- 3. a stopped rank of --nproc: hung, not killed ---------------------------------------------------

@pytest.mark.slow
def test_a_stopped_rank_is_named_as_hung_not_by_the_launchers_signal(tmp_path):
    """Bug: a SIGSTOPped rank, which the launcher then killed, was reported "died from signal SIGKILL"."""
    argv, env = faulty_job(tmp_path, "SIGSTOP")
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=HANG, env=env)
    assert result.returncode == 1 and result.stderr == HUNG_RANK_1, result.stderr


# Rank 2 reaches the collective that rank 1 never reaches 1.5 s after rank 0, so it times out later.
LATE_RANK_2 = '''
import time

from onepass import train

late = train.Learner.train_step


def train_step(self, stepper):
    if self.context.rank == 2 and self.record.steps_done == 25:
        time.sleep(1.5)
    return late(self, stepper)


train.Learner.train_step = train_step
'''


@pytest.mark.slow
def test_of_three_ranks_the_hung_one_is_named_not_one_that_waited_for_it(tmp_path):
    """Ranks 0 and 2 time out waiting for rank 1, rank 2 later: the launcher, which hears of rank 0
    first, must not take rank 2, still waiting, for a hung rank too."""
    argv, env = faulty_job(tmp_path, "hang", "--nproc", "3")
    Path(argv[0]).write_text(LATE_RANK_2 + FAULTY_DRIVER)
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=HANG, env=env)
    assert result.returncode == 1 and result.stderr == HUNG_RANK_1, result.stderr
