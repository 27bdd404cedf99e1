"""Data of the user's own, named in a config as `dataset.name: module.path:factory` (own_data.py):
train.py and parallel_exec.py on a factory module in the working directory, the cut into splits, and
one-line errors for every way a factory can be wrong."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from onepass import config, datasets, run_all, train, util
from onepass.schema import ConfigError
from tests.conftest import REPO, run_cli

MODULE = "own_data_cases"       # a name of its own: imported once per process, from the working directory
SOURCE = '''
import numpy as np
from onepass import datasets

NOT_CALLABLE = 3


def table(cfg):
    """300 rows of a linear regression on 5 features (mean 3, std 2); the last 60 are the test set."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(300, 5))
    return datasets.RawData(x, x @ np.arange(1.0, 6.0) + rng.normal(size=300), 60)


def parts(cfg):
    raw = table(cfg)
    return raw.inputs, raw.targets, raw.test_size


def labels(cfg):
    x, _, test_size = parts(cfg)
    return x, (x[:, 0] > 3).astype(np.int64) + (x[:, 1] > 3), test_size


def raises(cfg):
    raise OSError("no file data/mine.csv")


def a_list(cfg):
    return [1, 2, 3]


def two_items(cfg):
    return table(cfg)[:2]


def one_target_short(cfg):
    x, y, test_size = parts(cfg)
    return x, y[:-1], test_size


def strings(cfg):
    x, y, test_size = parts(cfg)
    return x.astype(str), y, test_size


def a_nan(cfg):
    x, y, test_size = parts(cfg)
    x[3, 1] = np.nan
    return x, y, test_size


def all_test(cfg):
    x, y, _ = parts(cfg)
    return x, y, 300


def negative_labels(cfg):
    x, y, test_size = labels(cfg)
    return x, y - 1, test_size


def one_column(cfg):
    x, y, test_size = parts(cfg)
    return x[:, 0], y, test_size
'''
OWN_DATA = str(REPO / "configs" / "own" / "data.yaml")
OURS = str(REPO / "configs" / "Ours_LR_Momentum.yaml")
SMALL = ["--set", "model.layer_sizes=[5,20,1]", "--hyperparameter_steps", "3", "--seed", "0"]


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mine")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    return folder


@pytest.fixture
def in_factory_dir(factory_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process in the factory's folder, with sys.path restored afterwards."""
    monkeypatch.chdir(factory_dir)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return factory_dir


def own_config(factory: str, *overrides: str) -> config.Config:
    return config.load_from([OWN_DATA, OURS], overrides=[f"dataset.name={MODULE}:{factory}", *overrides])


def test_train_py_trains_on_a_factory_in_the_working_directory_and_logs_below_a_safe_folder(factory_dir):
    """Catches a module beside the user's configs that does not import (`python train.py` puts only
    the script's folder on sys.path), and a run group folder named with the raw ':' of the name."""
    done = run_cli(str(REPO / "train.py"), "-c", OWN_DATA, OURS, "--set", f"dataset.name={MODULE}:table",
                   *SMALL, "-l", "runs", cwd=factory_dir)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (factory_dir / "runs" / f"{MODULE}--table" / "Ours_LR_Momentum").iterdir()
    assert json.loads((run_dir / "config.json").read_text())["dataset"]["name"] == f"{MODULE}:table"
    metrics = util.read_metrics(run_dir)
    assert metrics["status"] == "completed" and metrics["weight_steps"] == 30
    scalars, _ = util.read_run_events(run_dir, use_cache=False)
    assert scalars["Loss/Validation"].values[-1] == pytest.approx(metrics["final"]["Loss/Validation"], rel=1e-5)


def test_the_table_is_cut_and_normalised_as_a_registered_dataset_is(in_factory_dir):
    """Catches the factory's table used without the framework's cut (validation_proportion ignored,
    the test rows not the last ones) or without normalisation from train+validation statistics."""
    splits = datasets.make_splits(own_config("table").dataset, torch.float64, torch.device("cpu"))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (192, 48, 60)   # 240 * 0.2 = 48
    assert (splits.task, splits.input_shape, splits.num_outputs) == ("regression", (5,), 1)
    train_val = torch.cat([splits.train.inputs, splits.validation.inputs])
    assert torch.allclose(train_val.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(train_val.std(0, unbiased=False), torch.ones(5, dtype=torch.float64))
    assert splits.target_std is not None and splits.train.targets.shape == (192, 1)


def test_integer_targets_make_a_classification_task(in_factory_dir):
    """Catches class labels taken for regression targets (cast to floats, sized as one output)."""
    cfg = own_config("labels", "loss=cross_entropy", "model.layer_sizes=[5,20,3]")
    setup = train.prepare(cfg)
    assert (setup.splits.task, setup.splits.num_outputs) == ("classification", 3)
    assert setup.splits.train.targets.dtype == torch.long and setup.splits.train.targets.ndim == 1


@pytest.mark.slow
def test_parallel_exec_runs_every_algorithm_on_a_factory(factory_dir):
    """Catches parallel_exec.py -d refusing a module:factory (no configs/NAME.yaml), or its jobs
    losing the name (training the default dataset) or grouping below a ':' folder."""
    root = factory_dir / "batch"
    done = run_cli(str(REPO / "parallel_exec.py"), "-l", str(root), "-d", f"{MODULE}:table",
                   "-a", "Random", "Ours_LR_Momentum", "--count", "2", "--workers", "1",
                   "--set", "hyperparameter_steps=2", "--set", "model.layer_sizes=[5,20,1]", cwd=factory_dir)
    assert done.returncode == 0, done.stderr
    assert "4 completed" in done.stdout
    for algorithm in ("Random", "Ours_LR_Momentum"):
        runs = list((root / f"{MODULE}--table" / algorithm).iterdir())
        assert len(runs) == 2
        assert {json.loads((run / "config.json").read_text())["dataset"]["name"] for run in runs} == {f"{MODULE}:table"}


ERRORS = {    # factory -> what the one line says
    "no_such_module_here:table": "no module named 'no_such_module_here'",
    f"{MODULE}:missing": f"module '{MODULE}' has no attribute 'missing'",
    f"{MODULE}:NOT_CALLABLE": "is a int, not a callable that returns datasets.RawData(inputs, targets, test_size)",
    f"{MODULE}:raises": "the factory raised OSError: no file data/mine.csv (",
    f"{MODULE}:a_list": "the factory returned a list, not datasets.RawData(inputs, targets, test_size)",
    f"{MODULE}:two_items": "the factory returned a tuple of 2 items, not datasets.RawData",
    f"{MODULE}:one_target_short": "300 input rows but 299 target rows",
    f"{MODULE}:strings": "the factory's inputs have dtype <U32: they must be numbers",
    f"{MODULE}:a_nan": "the factory's inputs hold non-finite values",
    f"{MODULE}:all_test": "test_size = 300: it must be a whole number of test rows (the last ones), from 1 to 299",
    f"{MODULE}:negative_labels": "integer targets are class labels, one per row, from 0",
    f"{MODULE}:one_column": "inputs of shape (300,)",
}


@pytest.mark.parametrize("name", ERRORS)
def test_a_wrong_factory_stops_train_py_with_one_line_and_exit_code_2(name, in_factory_dir, tmp_path, capsys):
    """Catches each way a factory can be wrong surfacing as a traceback, mid-run, or after the run
    directory was made: the module, the attribute, the call, and what it returns (its type, its
    length, row counts, dtype, NaN, test_size, labels, shapes)."""
    code = train.main(["-c", OWN_DATA, OURS, "--set", f"dataset.name={name}", *SMALL, "-l", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("train.py: error: ") and f"dataset.name = '{name}'" in stderr
    assert ERRORS[name] in stderr and not any(tmp_path.iterdir())


def test_an_unknown_plain_dataset_name_offers_the_factory_form():
    """Catches the factory form left out of the list of what dataset.name takes."""
    with pytest.raises(ConfigError, match=r"unknown name 'mine'; valid: .*, or module.path:factory \(data of your own"):
        config.load_from([OWN_DATA, OURS], overrides=["dataset.name=mine"])


@pytest.mark.parametrize("command", [["parallel_exec.py", "-a", "Random", "-d"],
                                     ["run_all.py", "uci_energy", "--datasets"]])
def test_batches_refuse_a_factory_that_does_not_import_before_running_anything(command, tmp_path):
    """Catches the name checked only as a config file (then every job fails one by one), and the
    error blamed on a `--set dataset.name` the user never gave."""
    done = run_cli(*command, "no_such_module_here:table", "-l", str(tmp_path / "batch"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "error: dataset 'no_such_module_here:table': no module named 'no_such_module_here'" in done.stderr
    assert not (tmp_path / "batch").exists()


def test_a_factory_name_makes_a_portable_file_name():
    """Catches figure files cut at the name's '.' (figures.save replaces the suffix) or a ':' in them."""
    from onepass.paper_plots import names_of
    prefix, title = names_of("runs", "mypackage.data:load")
    assert prefix == "mypackage-data--load" and title == "mypackage.data:load"
    assert (Path("out") / f"{prefix}_cdf").with_suffix(".png").name == "mypackage-data--load_cdf.png"


@pytest.mark.slow
def test_run_all_runs_an_experiment_on_a_factory(factory_dir):
    """Catches run_all.py --datasets ignored (the experiment's own dataset trained instead) or its
    runs grouped under the experiment's dataset name."""
    root = factory_dir / "results"
    done = run_cli(str(REPO / "run_all.py"), "uci_energy", "--datasets", f"{MODULE}:table", "--reps", "1",
                   "--workers", "1", "-l", str(root), "--set", "hyperparameter_steps=2",
                   "--set", "model.layer_sizes=[5,20,1]", cwd=factory_dir)
    assert done.returncode == 0, done.stderr
    assert not (root / "uci_energy" / "uci_energy").exists()
    runs = sorted((root / "uci_energy" / f"{MODULE}--table").glob("*/*/config.json"))
    assert len(runs) == len(run_all.MAIN)
    assert {json.loads(run.read_text())["dataset"]["name"] for run in runs} == {f"{MODULE}:table"}


@pytest.mark.parametrize("command", [["run_all.py", "uci_energy", "--reps", "1"],
                                     ["parallel_exec.py", "-d", "uci_energy", "-a", "Random"]])
def test_a_dataset_named_by_set_is_refused_for_batches(command, tmp_path):
    """Catches `--set dataset.name=...` accepted by a batch: it trains the user's data but files
    every run under the experiment's dataset (uci_energy/...), where tables and figures name it so."""
    done = run_cli(*command, "-l", str(tmp_path / "batch"), "--set", f"dataset.name={MODULE}:table")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--set dataset.name: name the datasets themselves" in done.stderr
    assert not (tmp_path / "batch").exists() or not any((tmp_path / "batch").rglob("config.json"))
