"""parallel_exec.py and run_all.py: many runs from shared initialisations, resumable, on real processes."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from onepass import parallel_exec, progress, ray_tune, run_all, run_files
from tests.conftest import REPO

SHORT = ("hyperparameter_steps=5", "model.layer_sizes=[10, 8, 1]", "batch_size=64")


def statuses(root) -> list[str]:
    return sorted(parallel_exec.status_of(path.parent) or "unfinished" for path in root.rglob("config.json"))


def test_initialisations_are_seeded_and_in_the_papers_ranges():
    points = parallel_exec.natural_sgd(200, seed=3)
    assert points == parallel_exec.natural_sgd(200, seed=3) and points != parallel_exec.natural_sgd(200, seed=4)
    assert parallel_exec.natural_sgd(5, seed=3) == points[:5]          # a quick look is a subset
    lr, wd, momentum, multiplier = (np.array([p[key] for p in points]) for key in (
        "optimiser.lr", "optimiser.weight_decay", "optimiser.momentum", "optimiser.lr_multiplier"))
    assert 1e-6 <= lr.min() and lr.max() <= 1e-1 and 1e-7 <= wd.min() and wd.max() <= 1e-2
    assert 0 <= momentum.min() and momentum.max() < 1 and 0.95 <= multiplier.min() and multiplier.max() <= 1.01
    assert np.log10(lr).std() > 1     # uniform in log space, not clustered


def test_every_algorithm_starts_from_the_same_points(tmp_path):
    points = parallel_exec.natural_sgd(3, seed=0)
    jobs = parallel_exec.make_jobs(["diabetes"], ["Random", "Random_SteppedLR", "Ours_LR_Momentum"], points, SHORT)
    configs = [job.config(tmp_path) for job in jobs]
    by_algorithm = {}
    for cfg in configs:
        by_algorithm.setdefault(cfg.algorithm, []).append(
            (cfg.optimiser.lr, cfg.optimiser.weight_decay, cfg.optimiser.momentum, cfg.seed))
    assert by_algorithm["Random"] == by_algorithm["Random_SteppedLR"] == by_algorithm["Ours_LR_Momentum"]
    multipliers = {cfg.algorithm: cfg.optimiser.lr_multiplier for cfg in configs}
    assert multipliers["Random"] is None and 0.95 <= multipliers["Random_SteppedLR"] <= 1.01
    assert len({job.run_dir(tmp_path) for job in jobs}) == 9


def test_batch_runs_then_skips_what_finished_and_records_failures(tmp_path):
    points = parallel_exec.natural_sgd(2, seed=0)
    jobs = parallel_exec.make_jobs(["diabetes"], ["Random", "Ours_LR_Momentum"], points, SHORT)
    broken = parallel_exec.make_jobs(["uci_energy"], ["Random"], points[:1],
                                     (f"dataset.data_dir={tmp_path / 'nowhere'}",))
    counts = parallel_exec.run_batch(jobs + broken, tmp_path, workers=2, show_progress=False)
    assert counts["completed"] == 4 and counts["failed"] == 1
    failed = broken[0].run_dir(tmp_path)
    assert "not found" in json.loads((failed / "metrics.json").read_text())["error"]
    assert "DatasetMissing" in (failed / "error.txt").read_text()

    again = parallel_exec.run_batch(jobs + broken, tmp_path, workers=2, show_progress=False)
    assert again["skipped"] == 4 and again["failed"] == 1 and again["completed"] == 0
    assert statuses(tmp_path) == ["completed"] * 4 + ["failed"]          # no duplicates


def test_stop_file_stops_the_batch_before_new_runs(tmp_path):
    jobs = parallel_exec.make_jobs(["diabetes"], ["Random"], parallel_exec.natural_sgd(3, seed=0), SHORT)
    (tmp_path / "STOP").touch()
    counts = parallel_exec.run_batch(jobs, tmp_path, workers=1, show_progress=False)
    assert counts["not run"] == 3 and not list(tmp_path.rglob("config.json"))


def test_replay_reads_back_the_initialisations_of_a_folder(tmp_path):
    points = parallel_exec.natural_sgd(2, seed=0)
    parallel_exec.run_batch(parallel_exec.make_jobs(["diabetes"], ["Random_SteppedLR"], points, SHORT), tmp_path,
                            workers=1, show_progress=False)
    replayed = parallel_exec.replay(tmp_path)
    expected = [{key: p[key] for key in ("optimiser.lr", "optimiser.weight_decay", "optimiser.momentum", "seed")}
                for p in points]
    assert sorted(replayed, key=str) == sorted(expected, key=str)


def test_sensitivity_grid_covers_every_t_and_i():
    experiment = run_all.EXPERIMENTS["sensitivity"]
    names = [name for name, _ in experiment.settings]
    assert len(names) == 55 and "Update10_Rollback10" in names and "Update3_Rollback4" not in names


@pytest.mark.slow
def test_run_all_survives_sigkill_and_restarts_without_duplicates_or_losses(tmp_path, data_dir):
    """`run_all.py uci_energy --reps 2`: killed mid-way, then run again to the end."""
    command = [sys.executable, "run_all.py", "uci_energy", "--reps", "2", "--workers", "2", "-l", str(tmp_path),
               "--set", "hyperparameter_steps=40", "--set", f"dataset.data_dir={data_dir}"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    batch = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len([s for s in statuses(tmp_path) if s == "completed"]) < 3 and time.monotonic() < deadline:
        assert batch.poll() is None, "the batch ended before it could be killed"
        time.sleep(0.05)
    os.killpg(batch.pid, signal.SIGKILL)          # the whole batch: parent and workers
    batch.wait()
    before = statuses(tmp_path)
    assert 3 <= before.count("completed") < 18

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert statuses(tmp_path) == ["completed"] * 18        # 9 algorithms x 2 initialisations, each once
    assert f"{before.count('completed')} skipped" in result.stdout
    runs = {}
    for config_file in tmp_path.rglob("config.json"):
        values = json.loads(config_file.read_text())
        runs.setdefault(values["algorithm"], set()).add((values["optimiser"]["lr"], values["seed"]))
    assert len(runs) == 9 and len({frozenset(points) for points in runs.values()}) == 1   # the same 2 points


def test_run_all_lists_experiments_with_run_counts(tmp_path):
    result = subprocess.run([sys.executable, "run_all.py", "--list", "-l", str(tmp_path), "--workers", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert lines["uci"].split()[1] == str(8 * 9 * 200) and lines["fashion_mnist"].split()[1] == str(9 * 100)
    assert lines["sensitivity"].split()[1] == str(2 * 55 * 100)
    assert "after fashion_mnist" in lines["fashion_mnist_BatchNorm"]


def test_list_estimates_from_a_calibration_that_calibrate_stores(tmp_path, data_dir, monkeypatch, capsys):
    assert run_all.main(["--calibrate", "uci_yacht", "-l", str(tmp_path), "--workers", "1",
                         "--set", f"dataset.data_dir={data_dir}"]) == 0
    table = json.loads((tmp_path / "calibration.json").read_text())
    assert len(table["kinds"]) == 9 and all(kind["seconds_per_step"] > 0 for kind in table["kinds"].values())
    assert table["machine"]["cores"] >= 1 and table["machine"]["workers"] == 1
    capsys.readouterr()

    def no_training(*_):
        raise AssertionError("--list must not train anything")
    monkeypatch.setattr(run_all, "calibrate", no_training)
    assert run_all.main(["--list", "-l", str(tmp_path), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "calibration.json") in out.splitlines()[0]
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert lines["uci_yacht"][1] == "1800" and lines["uci_yacht"][3] in ("s", "min", "h")
    assert "untimed" not in lines["uci_yacht"]


def test_bayesopt_proposes_within_the_ranges_and_resumes_exactly(tmp_path):
    from onepass import bayesopt
    folder = tmp_path / "sequence"
    first = bayesopt.optimise("diabetes", folder, seed=0, cap=10.0, initial=2, guided=3, extra=SHORT)
    assert len(first) == 5 and sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["00", "01", "02", "03",
                                                                                            "04"]
    for point, loss in first:
        assert all(low <= point[name] <= high for name, (low, high) in bayesopt.BOUNDS.items())
        assert np.isfinite(loss)
    # The GP's proposals differ from one another (it is not stuck on one point).
    assert len({round(point["log10_lr"], 6) for point, _ in first[2:]}) == 3

    # Kill it during the fourth run (the run left without metrics.json): the rerun finishes it as
    # an uninterrupted sequence would have.
    (folder / "03" / "metrics.json").unlink()
    shutil.rmtree(folder / "04")
    assert bayesopt.optimise("diabetes", folder, seed=0, cap=10.0, initial=2, guided=3, extra=SHORT) == first
    assert len(list(folder.rglob("config.json"))) == 5


def test_bayesopt_counts_a_diverged_run_as_the_cap(tmp_path):
    from onepass import bayesopt
    history = bayesopt.optimise("diabetes", tmp_path, seed=0, cap=123.0, initial=1, guided=1,
                                extra=(*SHORT, "optimiser.lr=1e6"))      # every run diverges
    assert [loss for _, loss in history] == [123.0, 123.0]
    assert all(parallel_exec.status_of(tmp_path / k) == "diverged" for k in ("00", "01"))


# Ray is an optional extra (`make ray`; CI installs it): without it its tests skip, and asking for a
# Ray feature is a one-line error.
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is an optional extra, not installed here: `make ray` installs it (CI does)")


@pytest.mark.parametrize("command, error", [
    (["parallel_exec.py", "-d", "diabetes", "-a", "Random", "--backend", "ray"],
     "parallel_exec.py: error: --backend ray needs Ray"),
    (["run_all.py", "asha"], "run_all.py: error: ASHA needs Ray"),
], ids=["backend_ray", "asha"])
def test_a_ray_feature_without_ray_is_a_one_line_error(command, error, tmp_path):
    """Ray hidden as if not installed (a `ray` package first on the path that fails to import as a
    missing one does): exit 2 and one line naming the install command, not a traceback."""
    hidden = tmp_path / "without_ray" / "ray"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name=\"ray\")\n")
    result = subprocess.run([sys.executable, *command, "-l", str(tmp_path / "runs")], cwd=REPO, capture_output=True,
                            text=True, timeout=300,
                            env=os.environ | {"PYTHONPATH": f"{hidden.parent}{os.pathsep}{REPO}"})
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(error), result.stderr
    assert "`make ray`" in result.stderr and "pip install -e '.[ray]'" in result.stderr


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster, as `ray start --head` makes one."""
    ray = Path(sys.executable).parent / "ray"
    started = subprocess.run([str(ray), "start", "--head", "--num-cpus", "2", "--disable-usage-stats"],
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    yield
    import ray as ray_module
    ray_module.shutdown()
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)


@needs_ray
@pytest.mark.slow
def test_a_batch_runs_on_a_ray_cluster(ray_cluster, tmp_path):
    command = [sys.executable, "parallel_exec.py", "-l", str(tmp_path), "-d", "diabetes", "-a", "Random",
               "Ours_LR_Momentum", "--count", "2", "--backend", "ray", *[x for o in SHORT for x in ("--set", o)]]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4 completed" in result.stdout and statuses(tmp_path) == ["completed"] * 4
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "4 skipped" in again.stdout and statuses(tmp_path) == ["completed"] * 4


@needs_ray
@pytest.mark.slow
def test_asha_and_pbt_search_on_ray_tune(ray_cluster, tmp_path):
    extra = ("dataset.validation_proportion=0.2", "model.layer_sizes=[10, 8, 1]", "batch_size=64")
    asha = ray_tune.tune_search("asha", "diabetes", "Ours_LR_Momentum", 4, tmp_path, steps=30,
                                extra=(*extra, "hyperparameter_steps=3"))
    assert len(asha) == 4 and not any(result.error for result in asha)
    assert all(result.metrics["training_iteration"] <= 30 for result in asha)
    assert np.isfinite(asha.get_best_result().metrics["validation_loss"])

    pbt = ray_tune.tune_search("pbt", "diabetes", "Random_TrainingSetOnly", 4, tmp_path, steps=40,
                               perturbation_interval=10, extra=(*extra, "hyperparameter_steps=4"))
    assert len(pbt) == 4 and not any(result.error for result in pbt)
    assert all(result.metrics["training_iteration"] == 40 for result in pbt)
    restored = list((tmp_path / "pbt_diabetes_Random_TrainingSetOnly").rglob("restored_at_step_*.json"))
    assert restored, "no trial continued from another's checkpoint"
    record = json.loads(restored[0].read_text())
    assert record["hyperparameters_after"]["Hyperparameter/Lr"] > 0


def test_calibration_errors_are_one_line(tmp_path, capsys):
    """A bad --set is an error, not a silently empty table; a damaged table is refused by --list."""
    assert run_all.main(["--calibrate", "uci_yacht", "-l", str(tmp_path), "--set", "no_such_key=1"]) == 2
    assert not (tmp_path / "calibration.json").exists()
    (tmp_path / "calibration.json").write_text('{"kinds": ')
    assert run_all.main(["--list", "-l", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no_such_key" in err[0] and "not a calibration table" in err[1]


def test_a_batch_off_a_terminal_says_where_it_stands_while_runs_go_on(tmp_path, capsys, monkeypatch):
    """Was silent for hours under nohup: the bar only drew on a terminal, and nothing was said
    between two runs' ends."""
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.2)
    first, second = parallel_exec.natural_sgd(2, seed=0)
    jobs = parallel_exec.make_jobs(["diabetes"], ["Random"], [first], SHORT) + parallel_exec.make_jobs(
        ["diabetes"], ["Random"], [second], (*SHORT, "hyperparameter_steps=400"))    # seconds: lines while it runs
    counts = parallel_exec.run_batch(jobs, tmp_path, workers=1, name="quick look")
    lines = capsys.readouterr().err.splitlines()
    assert counts["completed"] == 2
    assert any(line.startswith("quick look: run 0/2  1 running") for line in lines), lines    # before any end
    assert any(line.startswith("quick look: run 1/2  1 completed  1 running") for line in lines), lines


def test_a_run_that_another_batch_holds_is_left_to_it(tmp_path):
    """Was wiped: a second batch on the same folder removed an unfinished run's directory and
    started it again, under the process still writing it."""
    first, second = parallel_exec.make_jobs(["diabetes"], ["Random"], parallel_exec.natural_sgd(2, seed=0), SHORT)
    busy = first.run_dir(tmp_path)
    busy.mkdir(parents=True)
    (busy / "events.out.tfevents.1.host").write_bytes(b"being written")
    with run_files.hold_run_dir(busy):                  # as the run in progress in the other batch does
        counts = parallel_exec.run_batch([first, second], tmp_path, workers=1, show_progress=False)
        assert (busy / "events.out.tfevents.1.host").read_bytes() == b"being written"
    assert counts["running elsewhere"] == 1 and counts["completed"] == 1
    assert not (busy / "metrics.json").exists()
    assert "1 running elsewhere" in parallel_exec.summary(counts, tmp_path)
