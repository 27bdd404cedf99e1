"""Shared fixtures: the repository, the raw data beside it, processed UCI data, a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from onepass import download_and_process_data

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# The device of the ground-truth tests' learners (test_hypergradients, test_loop_ground_truth):
# cpu, or cuda where bench/device_check.sh runs them on a GPU.
TEST_DEVICE = os.environ.get("ONEPASS_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "uci").is_dir():
        pytest.fail(f"raw data not found at {SHARED_DATA}: the tests need ../shared/data beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """All eight UCI sets processed by the download script from the local raw copy."""
    out = tmp_path_factory.mktemp("data")
    assert download_and_process_data.main(["--source", str(shared_data), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def workload_data(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Fashion-MNIST and Penn Treebank's small variant from the raw files, and a 60-image CIFAR-10
    copy in the real file format, processed by the download script."""
    from tests.test_download import write_cifar_batches
    out = tmp_path_factory.mktemp("workloads")
    write_cifar_batches(out / "raw" / "cifar-10-batches-py", 10)
    assert download_and_process_data.main(["fashion_mnist", "penn_treebank_small", "--source", str(shared_data),
                                           "--out", str(out)]) == 0
    # The full Penn Treebank's training text is not available offline: the validation text stands in.
    ptb = out / "raw" / "ptb"
    ptb.mkdir(parents=True)
    for name, stand_in in [("train", "valid"), ("valid", "valid"), ("test", "test")]:
        (ptb / f"ptb.{name}.txt").write_bytes((shared_data / "ptb" / f"ptb.{stand_in}.txt").read_bytes())
    assert download_and_process_data.main(["cifar10", "penn_treebank", "--source", str(out / "raw"),
                                           "--out", str(out)]) == 0
    return out


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a repository script as a user would, in a real subprocess (in `env`, if given, instead
    of this process's environment)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
