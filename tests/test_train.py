"""End-to-end runs: TensorBoard files read back, metrics, reproducibility, divergence, the quickstart."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from onepass import config, measure, progress, run_files, train, util
from tests.conftest import REPO, run_cli


def run(tmp_path, *files, overrides=(), data_dir=None):
    """Train in-process from shipped configs; returns (run directory, metrics)."""
    extra = [f"dataset.data_dir={data_dir}"] if data_dir else []
    cfg = config.load_from([str(REPO / "configs" / f) for f in files],
                           overrides=[f"log_root={tmp_path / 'runs'}", *extra, *overrides])
    return train.train(cfg)


def only_run(directory):
    runs = util.get_tags(directory)
    assert len(runs) == 1
    return next(iter(runs.values()))


def test_short_run_logs_every_tag_at_weight_step_indices(tmp_path, data_dir):
    run_dir, metrics = run(tmp_path, "uci_energy.yaml", "Random_Validation.yaml", data_dir=data_dir,
                           overrides=["hyperparameter_steps=5", "log_every=10", "seed=0"])
    record = only_run(tmp_path / "runs")
    splits = ("Training", "Validation", "Test")
    per_step = [f"{m}/{s}" for m in ("Loss", "Unnormalised_Loss") for s in splits] + \
        ["Hyperparameter/Lr", "Hyperparameter/Weight_Decay", "Hyperparameter/Momentum"]
    assert set(record.scalars) == set(per_step) | {f"Last_{tag}" for tag in per_step}
    for tag in per_step:
        np.testing.assert_array_equal(record.scalars[tag].steps, [0, 10, 20, 30, 40, 50])
        np.testing.assert_array_equal(record.scalars[f"Last_{tag}"].steps, [0, 1, 2, 3, 4])
        assert np.isfinite(record.scalars[tag].values).all()
        assert (np.diff(record.scalars[tag].wall_times) >= 0).all()
    for tag in ("Loss/Training", "Loss/Validation", "Unnormalised_Loss/Test"):   # Last_ at h = step (h+1)T
        np.testing.assert_array_equal(record.scalars[f"Last_{tag}"].values, record.scalars[tag].values[1:])
    losses = record.scalars["Loss/Training"].values
    assert losses[-1] < losses[0]                                   # it learns
    scale = record.scalars["Unnormalised_Loss/Test"].values / record.scalars["Loss/Test"].values
    np.testing.assert_allclose(scale, scale[0], rtol=1e-5)          # target units: a fixed std^2
    assert record.scalars["Hyperparameter/Momentum"].values[0] == pytest.approx(0.6224593312)
    assert record.config == json.loads((run_dir / "config.json").read_text())
    assert record.config["algorithm"] == "Random_Validation" and record.config["seed"] == 0
    assert record.metrics["status"] == "completed" and record.metrics["weight_steps"] == 50
    assert record.metrics["final"]["Loss/Test"] == pytest.approx(record.scalars["Loss/Test"].values[-1])


def test_random_trains_on_train_plus_validation_and_logs_no_validation(tmp_path, data_dir):
    run(tmp_path, "uci_energy.yaml", "Random.yaml", data_dir=data_dir, overrides=["hyperparameter_steps=2"])
    record = only_run(tmp_path / "runs")
    assert not any("Validation" in tag for tag in record.scalars)
    assert record.metrics["final"]["Loss/Training"] is not None


def test_get_tags_selects_tags_and_keeps_every_event(tmp_path):
    run(tmp_path, "diabetes.yaml", "Random.yaml", overrides=["hyperparameter_steps=300", "log_every=1"])
    record = only_run(tmp_path / "runs")
    selected = util.get_tags(tmp_path / "runs", "Loss/Test", "Last_Loss/Test", "No/Such_Tag")
    assert set(next(iter(selected.values())).scalars) == {"Loss/Test", "Last_Loss/Test"}
    assert len(record.scalars["Loss/Test"].steps) == 3001          # every step, no down-sampling
    assert len(record.scalars["Last_Loss/Test"].steps) == 300


def test_classification_logs_accuracy(tmp_path):
    run(tmp_path, "digits.yaml", "Random_TrainingSetOnly.yaml", overrides=["hyperparameter_steps=60", "seed=0"])
    record = only_run(tmp_path / "runs")
    for split in ("Training", "Validation", "Test"):
        for prefix in ("", "Last_"):
            accuracy = record.scalars[f"{prefix}Accuracy/{split}"].values
            assert ((accuracy >= 0) & (accuracy <= 1)).all()
    assert record.metrics["final"]["Accuracy/Test"] > 0.8


@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_and_threads_reproduce_bit_for_bit(tmp_path, threads):
    overrides = ["hyperparameter_steps=30", "seed=7", "log_every=1", f"threads={threads}",
                 "model.layer_sizes=[64, 256, 10]"]
    run(tmp_path / "a", "digits.yaml", "Ours_LR_Momentum.yaml", overrides=overrides)
    run(tmp_path / "b", "digits.yaml", "Ours_LR_Momentum.yaml", overrides=overrides)
    run(tmp_path / "c", "digits.yaml", "Ours_LR_Momentum.yaml", overrides=[*overrides[:-1], "seed=8"])
    first, second, other = (only_run(tmp_path / name / "runs") for name in "abc")
    assert first.config["threads"] == threads
    for tag, scalar in first.scalars.items():
        np.testing.assert_array_equal(scalar.values, second.scalars[tag].values)
    assert first.metrics["final"] == second.metrics["final"]
    assert first.metrics["final"]["Loss/Test"] != other.metrics["final"]["Loss/Test"]


def test_default_threads_are_one_for_small_models_and_the_core_share_for_large_ones(monkeypatch):
    small = train.prepare(config.load_from([str(REPO / "configs/diabetes.yaml")]))
    assert small.cfg.threads == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(util, "_core_share", None)
    monkeypatch.setattr(util, "available_cores", lambda: 6)
    assert util.share_cores(4) == 1 and util.share_cores(2) == 3
    large = train.prepare(config.load_from([str(REPO / "configs/diabetes.yaml")],
                                           overrides=["model.layer_sizes=[10, 1000, 1000, 1]"]))
    assert large.cfg.threads == 3 and torch.get_num_threads() == 3
    chosen = train.prepare(config.load_from([str(REPO / "configs/diabetes.yaml")], overrides=["threads=2"]))
    assert chosen.cfg.threads == 2 and torch.get_num_threads() == 2


def test_learner_does_exactly_the_sgd_steps_of_a_plain_torch_loop(data_dir):
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml"), str(REPO / "configs/Random.yaml")],
                           overrides=[f"dataset.data_dir={data_dir}", "dtype=float64", "seed=3",
                                      "hyperparameter_steps=20", "optimiser.weight_decay=1e-3"])
    setup = train.prepare(cfg)
    model = setup.model
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    metrics = train.Learner(setup).run()

    reference = train.prepare(cfg).model        # the same seed builds the same initial weights
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)
    optimiser = torch.optim.SGD(reference.parameters(), lr=cfg.optimiser.lr, momentum=cfg.optimiser.momentum,
                                weight_decay=cfg.optimiser.weight_decay)
    inputs, targets = setup.splits.train.inputs, setup.splits.train.targets
    for _ in range(cfg.total_weight_steps):
        optimiser.zero_grad()
        torch.nn.functional.mse_loss(reference(inputs), targets).backward()
        optimiser.step()
    for trained, expected in zip(model.parameters(), reference.parameters(), strict=True):
        assert trained.dtype == torch.float64
        torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    assert metrics["weight_steps"] == 200


def test_stepped_lr_multiplies_after_each_window_and_clips(tmp_path):
    run(tmp_path / "a", "diabetes.yaml", "Random_SteppedLR.yaml", overrides=["hyperparameter_steps=6"])
    lrs = only_run(tmp_path / "a" / "runs").scalars["Last_Hyperparameter/Lr"].values
    np.testing.assert_allclose(lrs, 1e-3 * 0.99 ** np.arange(6), rtol=1e-6)
    run(tmp_path / "b", "diabetes.yaml", "Random_SteppedLR.yaml",
        overrides=["hyperparameter_steps=6", "optimiser.lr_multiplier=3", "optimiser.lr_bounds=[1e-10, 0.02]"])
    lrs = only_run(tmp_path / "b" / "runs").scalars["Last_Hyperparameter/Lr"].values
    np.testing.assert_allclose(lrs, [1e-3, 3e-3, 9e-3, 0.02, 0.02, 0.02], rtol=1e-6)


def test_divergence_stops_cleanly_with_status_diverged(tmp_path, data_dir):
    result = run_cli("train.py", "-c", "configs/uci_energy.yaml", "configs/Random.yaml", "--seed", "0",
                     "--set", "optimiser.lr=50", "--set", f"dataset.data_dir={data_dir}",
                     "-l", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "diverged after 10 weight steps" in result.stdout
    record = only_run(tmp_path / "runs")
    assert record.metrics["status"] == "diverged" and record.metrics["weight_steps"] == 10
    assert record.metrics["final"]["Loss/Test"] is None           # NaN is written as null
    assert math.isnan(record.scalars["Loss/Test"].values[-1])


def test_run_directories_never_collide(tmp_path):
    made = {run_files.make_run_dir(str(tmp_path), "group", "same") for _ in range(200)}
    assert len(made) == 200 and all(path.is_dir() for path in made)


def test_float64_runs_in_float64(tmp_path):
    cfg = config.load_from([str(REPO / "configs/diabetes.yaml")], overrides=["dtype=float64"])
    setup = train.prepare(cfg)
    assert {p.dtype for p in setup.model.parameters()} == {torch.float64}
    assert setup.splits.train.inputs.dtype == torch.float64


@pytest.mark.slow
def test_full_uci_energy_random_run_reads_back(tmp_path, data_dir):
    result = run_cli("train.py", "-c", "configs/uci_energy.yaml", "configs/Random.yaml",
                     "--set", f"dataset.data_dir={data_dir}", "-l", str(tmp_path / "runs"), "-g", "energy")
    assert result.returncode == 0, result.stderr
    record = only_run(tmp_path / "runs" / "energy")
    assert record.metrics["weight_steps"] == 4000 and record.metrics["status"] == "completed"
    assert record.scalars["Loss/Test"].steps[-1] == 4000
    assert len(record.scalars["Last_Loss/Training"].steps) == 400
    assert record.scalars["Unnormalised_Loss/Test"].values[-1] < record.scalars["Unnormalised_Loss/Test"].values[0]


@pytest.mark.slow
def test_quickstart_command(tmp_path):
    """The README's first Quickstart command, as make runs it (logs redirected to a temporary folder)."""
    result = run_cli("train.py", "-c", "configs/diabetes.yaml", "configs/Ours_LR_Momentum.yaml", "-l", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Ours_LR_Momentum on diabetes: completed after 4000 weight steps" in out
    assert "loss in target units" in out and "hyperparameters" in out and "tensorboard --logdir" in out
    record = only_run(tmp_path)
    assert str(record.path) in out
    assert record.metrics["final"]["Loss/Test"] < 0.8      # clearly better than predicting the mean (1.0)
    lrs = record.scalars["Last_Hyperparameter/Lr"].values
    assert lrs[-1] != lrs[0]                               # the hyperparameters were tuned


ALGORITHM_CONFIGS = {
    # algorithm: the hyperparameters it tunes (the others must stay fixed)
    "Ours_LR": ("Lr", "Weight_Decay"),
    "Ours_LR_Momentum": ("Lr", "Weight_Decay", "Momentum"),
    "Ours_HDLR_Momentum": ("Lr", "Weight_Decay", "Momentum"),
    "Lorraine": ("Weight_Decay",),
    "Baydin": ("Lr",),
    "Baydin_Exact": ("Lr",),
    "DiffThroughOpt": ("Lr", "Weight_Decay", "Momentum"),
    "LongDiffThroughOpt_UCI_Standalone": ("Lr", "Weight_Decay", "Momentum"),
}


@pytest.mark.parametrize("algorithm", ALGORITHM_CONFIGS)
def test_every_algorithm_runs_from_its_config_and_logs_its_hyperparameters(algorithm, tmp_path, data_dir):
    steps = ["hyperparameter_steps=40"] if algorithm != "LongDiffThroughOpt_UCI_Standalone" else \
        ["hyperparameter_steps=3", "network_weight_steps=20"]
    run(tmp_path, "uci_energy.yaml", f"{algorithm}.yaml", data_dir=data_dir,
        overrides=[*steps, "seed=0", "optimiser.weight_decay=1e-3"])
    record = only_run(tmp_path / "runs")
    assert record.metrics["status"] == "completed" and record.config["algorithm"] == algorithm
    for name in ("Lr", "Weight_Decay", "Momentum"):
        trajectory = record.scalars[f"Last_Hyperparameter/{name}"].values
        assert np.isfinite(trajectory).all()
        assert (len(np.unique(trajectory)) > 1) == (name in ALGORITHM_CONFIGS[algorithm]), (name, trajectory)
    assert np.isfinite(record.scalars["Loss/Test"].values).all()


def test_per_element_learning_rates_are_logged_as_histograms(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator
    run_dir, _ = run(tmp_path, "uci_energy.yaml", "Ours_HDLR_Momentum.yaml", data_dir=data_dir,
                     overrides=["hyperparameter_steps=5"])
    accumulator = EventAccumulator(str(run_dir), size_guidance={HISTOGRAMS: 0})
    accumulator.Reload()
    histograms = accumulator.Histograms("Hyperparameter/Lr")
    assert [h.step for h in histograms] == [0, 1, 2, 3, 4]
    assert histograms[0].histogram_value.num == 8 * 50 + 50 + 50 + 1     # one lr per weight element
    assert histograms[-1].histogram_value.max > histograms[-1].histogram_value.min


def test_hypergradients_are_logged_with_each_hyperparameter_step(tmp_path):
    """With plain SGD on log10 lr, each logged hypergradient is the step the lr took, over -step size."""
    run(tmp_path, "diabetes.yaml", "Ours_LR_Momentum.yaml",
        overrides=["hyperparameter_steps=6", "tuning.optimiser=sgd", "tuning.lr=0.01", "dtype=float64"])
    record = only_run(tmp_path / "runs")
    lrs = record.scalars["Last_Hyperparameter/Lr"].values
    logged = record.scalars["Last_Hypergradient/Lr"].values
    assert len(logged) == 6 and np.all(logged != 0)
    np.testing.assert_allclose(logged[:-1], -np.diff(np.log10(lrs)) / 0.01, rtol=1e-3)
    assert {"Last_Hypergradient/Weight_Decay", "Last_Hypergradient/Momentum"} <= set(record.scalars)


def test_runs_are_named_by_dataset_and_algorithm_and_compare_in_the_hparams_tab(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    run_dir, _ = run(tmp_path, "diabetes.yaml", "Ours_LR.yaml", overrides=["hyperparameter_steps=3", "seed=4"])
    assert run_dir.parent == tmp_path / "runs" / "diabetes" / "Ours_LR"
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["algorithm"].string_value == "Ours_LR" and hparams["seed"].number_value == 4
    assert hparams["initial_lr"].number_value == pytest.approx(1e-3)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert {"Loss/Test", "Loss/Validation", "Unnormalised_Loss/Test", "Hyperparameter/Lr"} <= set(metrics)
    assert set(metrics) <= set(accumulator.Tags()["scalars"])       # each is a logged scalar


def test_progress_is_a_line_every_few_seconds_when_not_on_a_terminal(capsys):
    shown = progress.Progress(total=100, initial=0, name="Ours_LR on diabetes", unit="step", every=0.0)
    shown.update(10, lambda: "loss 0.5  lr 0.001")
    shown.update(10, lambda: "loss 0.25  lr 0.002")
    shown.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("Ours_LR on diabetes: step 20/100  loss 0.25  lr 0.002") and "s to go" in lines[1]
    quiet = progress.Progress(total=100, initial=0, name="x", unit="step", every=0.0, enabled=False)
    quiet.update(10)
    assert capsys.readouterr().err == ""


def test_slow_progress_says_seconds_per_step_not_zero_steps_per_second(capsys, monkeypatch):
    """Was '0 steps/s' for a Penn Treebank window of minutes on a CPU."""
    clock = iter([0.0, 250.0])      # started, then 10 steps 250 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    shown = progress.Progress(total=30, initial=0, name="Random on penn_treebank", unit="step", every=30.0)
    shown.update(10)
    assert capsys.readouterr().err == "Random on penn_treebank: step 10/30  25 s/step  8 min to go\n"


@pytest.mark.parametrize("algorithm", ["Baydin", "Ours_LR_Momentum"])
def test_held_out_sets_are_measured_as_often_for_one_step_windows_as_for_ten(algorithm, tmp_path, monkeypatch):
    """Was a whole-split measurement at the end of every window: ten times as many for Baydin's
    one-step windows, which its wall time then paid for. Each algorithm measures every log_every
    steps; Baydin still logs its learning rate after every window."""
    calls = []
    measure_held_out = measure.Meter.held_out
    monkeypatch.setattr(measure.Meter, "held_out", lambda meter, *a, **k: calls.append(1) or measure_held_out(
        meter, *a, **k))
    run(tmp_path, "diabetes.yaml", f"{algorithm}.yaml", overrides=["hyperparameter_steps=3", "seed=0"])
    record = only_run(tmp_path / "runs")
    windows = 30 if algorithm == "Baydin" else 3
    assert len(calls) == 3 + 1                                   # steps 0, 10, 20, then the final split
    assert len(record.scalars["Last_Hyperparameter/Lr"].steps) == windows
    assert list(record.scalars["Last_Loss/Test"].steps) == [windows // 3 - 1, 2 * windows // 3 - 1, windows - 1]
