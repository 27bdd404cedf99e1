"""GPUs without a GPU: the launch checks, the backend and device of each rank, and the device check
script, on this CPU machine (torch.cuda is monkeypatched where a GPU must seem present)."""
from __future__ import annotations

import datetime

import pytest
import torch

from onepass import config, distributed, launch
from onepass.config import ConfigError
from tests.conftest import REPO, run_cli


def cfg_on(device: str) -> config.Config:
    return config.load_from([str(REPO / "configs" / "diabetes.yaml"), str(REPO / "configs" / "Random.yaml")],
                            overrides=[f"device={device}"])


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch):
    """Make torch.cuda report `count` GPUs (current: GPU 0); returns the setter."""
    def have(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return have


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_nproc_on_cuda_without_cuda_is_a_one_line_error():
    """Bug: touching CUDA (set_device, NCCL) before the launch checks: a traceback on a CPU machine."""
    result = run_cli("train.py", "-c", "configs/diabetes.yaml", "configs/Random.yaml", "--nproc", "2", "-d", "cuda")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "train.py: error: device = 'cuda', but CUDA is not available here; use --device cpu"]


def test_more_ranks_than_gpus_is_refused(gpus):
    """Bug: a missing or off-by-one GPU count check (ranks would share or lack a GPU, and NCCL fail
    late), or one that counts every node's ranks against this node's GPUs."""
    gpus(1)
    with pytest.raises(ConfigError, match=r"^2 processes on this machine need a GPU each, but 1 is visible; "
                                          r"use --nproc 1 or fewer, or --device cpu$"):
        launch.check_launch(cfg_on("cuda"), 2)
    gpus(2)
    launch.check_launch(cfg_on("cuda"), 2)
    launch.check_launch(cfg_on("auto"), 2)
    launch.check_launch(cfg_on("cuda"), 4, local_world_size=2)       # torchrun: 2 nodes of 2 GPUs
    with pytest.raises(ConfigError, match="but 2 are visible"):
        launch.check_launch(cfg_on("cuda"), 3)
    with pytest.raises(ConfigError, match="names one GPU; with several processes use --device cuda"):
        launch.check_launch(cfg_on("cuda:1"), 2)
    launch.check_launch(cfg_on("cuda:1"), 1)
    launch.check_launch(cfg_on("cpu"), 8)                             # gloo: no GPU needed


def test_resolve_device_names_the_gpu(gpus, monkeypatch):
    """Bug: an unindexed 'cuda' device (its RNG state and NCCL's device are then ambiguous), or a
    GPU number beyond those visible accepted until a CUDA error."""
    gpus(2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed.resolve_device("cuda") == torch.device("cuda", 1)
    assert distributed.resolve_device("auto") == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="only 2 GPU"):
        distributed.resolve_device("cuda:2")
    gpus(0)
    assert distributed.resolve_device("auto") == torch.device("cpu")


def test_backend_and_device_of_each_rank(gpus, monkeypatch):
    """Bug: gloo (or NCCL) whatever the device; every rank on GPU 0; the global RANK instead of
    LOCAL_RANK choosing the GPU (GPU 3 on a node of 2 under multi-node torchrun)."""
    assert distributed.backend(torch.device("cpu")) == "gloo"
    assert distributed.backend(torch.device("cuda", 1)) == "nccl"
    gpus(2)
    assert distributed.rank_device("cuda", 1) == torch.device("cuda", 1)
    assert distributed.rank_device("auto", 1) == torch.device("cuda", 1)
    assert distributed.rank_device("cuda:1", 0) == torch.device("cuda", 1)
    assert distributed.rank_device("cpu", 1) == torch.device("cpu")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.from_environment("cuda") == distributed.Context(3, 4, torch.device("cuda", 1))
    gpus(0)
    assert distributed.rank_device("auto", 1) == torch.device("cpu")
    assert distributed.from_environment("auto").device == torch.device("cpu")


def test_a_spawned_rank_joins_nccl_on_its_own_gpu(monkeypatch):
    """Bug: the launcher's ranks hard-wired to gloo, or all set to GPU 0 (NCCL then fails or hangs)."""
    joined, current = {}, []
    monkeypatch.setattr(distributed.dist, "TCPStore", lambda *args, **kwargs: "store")
    monkeypatch.setattr(distributed, "init_process_group", lambda backend, **options: joined.update(
        backend=backend, **options))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(distributed.util, "share_cores", lambda world_size: None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "")
    context = launch.join_local_group(1, 2, 1234, None, "cuda")
    assert context == distributed.Context(1, 2, torch.device("cuda", 1))
    assert (joined["backend"], joined["rank"], joined["world_size"]) == ("nccl", 1, 2)
    assert current == [torch.device("cuda", 1)]
    assert isinstance(joined["timeout"], datetime.timedelta)
    joined.clear()
    current.clear()
    assert launch.join_local_group(1, 2, 1234, None, "cpu").device == torch.device("cpu")
    assert joined["backend"] == "gloo" and current == []


def test_objects_are_broadcast_from_the_rank_device(monkeypatch):
    """Bug: broadcast_object_list without the rank's device (NCCL cannot send a CPU tensor)."""
    calls = []

    def broadcast(box, src, device=None):
        calls.append(device)
        box[0] = "from rank 0"
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", broadcast)
    assert distributed.broadcast_from_rank0("mine", distributed.Context(1, 2, torch.device("cuda", 1))) == "from rank 0"
    assert calls == [torch.device("cuda", 1)]


def test_device_check_script_shows_its_help_and_refuses_without_cuda():
    """Bug: the device check no longer imports (a renamed module or function it uses)."""
    result = run_cli("bench/device_check.py", "--help")
    assert result.returncode == 0 and "--device" in result.stdout, result.stderr
    if not torch.cuda.is_available():
        result = run_cli("bench/device_check.py", "--device", "cuda")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_device_check_runs_on_the_cpu(tmp_path):
    """Bug: the device check's comparisons broken (a config key renamed, a metric dropped) so that
    it would fail, or pass vacuously, on the first GPU machine."""
    out = tmp_path / "report.md"
    result = run_cli("bench/device_check.py", "--device", "cpu", "--parts", "devices", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = out.read_text()
    assert report.count("PASS") == 8 + 1 and "Overall: PASS" in report, report
