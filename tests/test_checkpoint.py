"""-S / -s: a run saved and resumed continues exactly as an uninterrupted one."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from onepass import download_and_process_data, train, util
from tests.conftest import REPO


def command(algorithm: str, log_root, *extra: str) -> list[str]:
    return ["-c", str(REPO / "configs/diabetes.yaml"), str(REPO / f"configs/{algorithm}.yaml"), "--seed", "3",
            "--set", "model.layer_sizes=[10, 8, 1]", "--set", "batch_size=32", "--set", "dtype=float64",
            "-l", str(log_root), *extra]


@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "DiffThroughOpt"])
def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(algorithm, tmp_path):
    whole, first, second = tmp_path / "whole.pt", tmp_path / "first.pt", tmp_path / "second.pt"
    assert train.main(command(algorithm, tmp_path / "a", "--hyperparameter_steps", "12", "-S", str(whole))) == 0
    assert train.main(command(algorithm, tmp_path / "b", "--hyperparameter_steps", "5", "-S", str(first))) == 0
    assert train.main(command(algorithm, tmp_path / "elsewhere", "--hyperparameter_steps", "12",
                              "-s", str(first), "-S", str(second))) == 0

    expected, got = (torch.load(path, weights_only=True) for path in (whole, second))
    assert got["steps_done"] == expected["steps_done"] == 120
    for name, value in expected["model"].items():
        assert torch.equal(got["model"][name], value), name
    for a, b in zip(got["hyperparameters"]["raw"], expected["hyperparameters"]["raw"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(got["algorithm"]["rule_state"]["exp_avg"], expected["algorithm"]["rule_state"]["exp_avg"],
                    strict=True):
        assert torch.equal(a, b)

    # The resumed run logged on in the first run's directory: one continuous trajectory.
    assert not (tmp_path / "elsewhere").exists()
    resumed = next(iter(util.get_tags(tmp_path / "b").values()))
    uninterrupted = next(iter(util.get_tags(tmp_path / "a").values()))
    for tag in ("Last_Hyperparameter/Lr", "Last_Hyperparameter/Momentum"):
        np.testing.assert_array_equal(resumed.scalars[tag].steps, np.arange(12))
        np.testing.assert_array_equal(resumed.scalars[tag].values, uninterrupted.scalars[tag].values)
    assert resumed.metrics["weight_steps"] == 120
    # Its time and segments count the whole run, not the last segment only.
    first_seconds = torch.load(first, weights_only=True)["train_seconds"]
    assert (resumed.metrics["segments"], uninterrupted.metrics["segments"]) == (2, 1)
    assert resumed.metrics["train_seconds"] > first_seconds > 0


def test_checkpoint_from_another_config_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "state.pt"
    assert train.main(command("Ours_LR", tmp_path / "a", "--hyperparameter_steps", "2", "-S", str(checkpoint))) == 0
    capsys.readouterr()
    code = train.main(command("Ours_LR", tmp_path / "a", "--hyperparameter_steps", "4", "-s", str(checkpoint),
                              "--set", "optimiser.lr=0.5", "--set", "tuning.rollback_distance=3"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "different config" in err and "optimiser.lr, tuning.rollback_distance" in err


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train.main(command("Ours_LR", tmp_path / "a", "-s", str(tmp_path / "nope.pt"))) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_run_killed_mid_way_resumes_from_its_periodic_checkpoint(tmp_path):
    """SIGKILL after a periodic checkpoint, resume with -s: the same final state and logs as a run
    that was never interrupted (what the killed run logged past its checkpoint is superseded)."""
    periodic, final, whole = tmp_path / "periodic.pt", tmp_path / "final.pt", tmp_path / "whole.pt"
    steps = ("--hyperparameter_steps", "300")
    killed_command = command("Ours_LR_Momentum", tmp_path / "killed", *steps, "-S", str(periodic),
                             "--checkpoint_every", "7")
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *killed_command], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not periodic.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, process.stderr.read().decode()
    interrupted_at = torch.load(periodic, weights_only=True)["windows_done"]
    assert 0 < interrupted_at < 300 and interrupted_at % 7 == 0

    assert train.main(command("Ours_LR_Momentum", tmp_path / "elsewhere", *steps, "-s", str(periodic),
                              "-S", str(final))) == 0
    assert train.main(command("Ours_LR_Momentum", tmp_path / "whole", *steps, "-S", str(whole))) == 0
    got, expected = (torch.load(path, weights_only=True) for path in (final, whole))
    for name, value in expected["model"].items():
        assert torch.equal(got["model"][name], value), name
    for a, b in zip(got["hyperparameters"]["raw"], expected["hyperparameters"]["raw"], strict=True):
        assert torch.equal(a, b)

    resumed = next(iter(util.get_tags(tmp_path / "killed").values()))
    uninterrupted = next(iter(util.get_tags(tmp_path / "whole").values()))
    assert resumed.metrics["status"] == "completed"
    for tag in ("Last_Hyperparameter/Lr", "Loss/Training", "Last_Loss/Validation"):
        np.testing.assert_array_equal(resumed.scalars[tag].steps, uninterrupted.scalars[tag].steps)
        np.testing.assert_array_equal(resumed.scalars[tag].values, uninterrupted.scalars[tag].values)


def test_checkpoint_every_needs_a_checkpoint_file(tmp_path, capsys):
    assert train.main(command("Ours_LR", tmp_path / "a", "--checkpoint_every", "5")) == 2
    assert "-S FILE" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_language_model_resumes_with_its_hidden_state_bit_for_bit(tmp_path, shared_data):
    """Penn Treebank (its small offline variant): the truncated-BPTT state is part of the checkpoint."""
    data = tmp_path / "data"
    assert download_and_process_data.main(["penn_treebank_small", "--source", str(shared_data),
                                           "--out", str(data)]) == 0

    def lstm(log_root, *extra: str) -> list[str]:
        return ["-c", str(REPO / "configs/penn_treebank_small.yaml"), str(REPO / "configs/Ours_LR_Momentum.yaml"),
                "--seed", "3", "--network_weight_steps", "4", "--set", "model.embedding_size=8", "--set",
                "model.hidden_size=8", "--set", f"dataset.data_dir={data}", "--set", "batch_size=35",
                "--set", "dataset.test_batch_size=35", "-l", str(log_root), *extra]

    whole, first, second = tmp_path / "whole.pt", tmp_path / "first.pt", tmp_path / "second.pt"
    assert train.main(lstm(tmp_path / "a", "--hyperparameter_steps", "4", "-S", str(whole))) == 0
    assert train.main(lstm(tmp_path / "b", "--hyperparameter_steps", "2", "-S", str(first))) == 0
    saved = torch.load(first, weights_only=True)
    assert all(h.shape == (2, 40, 8) for h in saved["streams"]["train"]["hidden"])
    assert train.main(lstm(tmp_path / "b", "--hyperparameter_steps", "4", "-s", str(first), "-S", str(second))) == 0
    expected, got = (torch.load(path, weights_only=True) for path in (whole, second))
    for name, value in expected["model"].items():
        assert torch.equal(got["model"][name], value), name
    for a, b in zip(got["streams"]["train"]["hidden"], expected["streams"]["train"]["hidden"], strict=True):
        assert torch.equal(a, b)
