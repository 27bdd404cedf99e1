"""-S / -s: a run saved and resumed continues exactly as an uninterrupted one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import train
import util
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
