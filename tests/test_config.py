"""Config files merge in order, flags and --set override them, and every bad input is one clear line."""
from __future__ import annotations

from pathlib import Path

import pytest

from onepass import config, datasets, measure, train
from onepass.config import ConfigError
from tests.conftest import REPO, run_cli


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_files_merge_in_order_dicts_merge_lists_replace(tmp_path):
    first = write(tmp_path, "a.yaml", "model:\n  layer_sizes: [10, 50, 50, 1]\n  activation: tanh\n"
                                      "optimiser:\n  lr: 1e-3\n  momentum: 0.9\n")
    second = write(tmp_path, "b.yaml", "model:\n  layer_sizes: [10, 7, 1]\noptimiser:\n  lr: 0.5\n")
    cfg = config.load_from([first, second])
    assert cfg.model.layer_sizes == (10, 7, 1)          # list replaced, not appended
    assert cfg.model.activation == "tanh"               # sibling kept from the first file
    assert cfg.optimiser.lr == 0.5 and cfg.optimiser.momentum == 0.9


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    cfg = config.load_from([write(tmp_path, "a.yaml", "optimiser:\n  lr: 1e-3\n  weight_decay: 5E-7\n")])
    assert cfg.optimiser.lr == 1e-3 and cfg.optimiser.weight_decay == 5e-7


def test_flags_override_files_and_set_overrides_flags(tmp_path):
    base = write(tmp_path, "a.yaml", "batch_size: 8\nseed: 1\nrun_name: file\n")
    cfg = config.load(["-c", base, "--batch_size", "16", "--seed", "3", "-n", "flag",
                       "--set", "seed=4", "--set", "model.layer_sizes=[10, 100, 1]", "--set", "optimiser.lr=2e-2"])
    assert (cfg.batch_size, cfg.seed, cfg.run_name) == (16, 4, "flag")
    assert cfg.model.layer_sizes == (10, 100, 1) and cfg.optimiser.lr == 0.02


def test_shipped_configs_combine(tmp_path):
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml"), str(REPO / "configs/Random_SteppedLR.yaml")])
    assert cfg.dataset.name == "uci_energy" and cfg.dataset.validation_proportion == 0.0
    assert cfg.optimiser.lr_multiplier == 0.99 and cfg.total_weight_steps == 4000
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml"), str(REPO / "configs/Random_Validation.yaml")])
    assert cfg.dataset.validation_proportion == 0.11272 and cfg.dataset.full_validation


BAD_INPUTS = {
    # name: (yaml text or None, extra argv, fragments the one-line message must contain)
    "unknown key": ("optimiser:\n  learning_rate: 0.1\n", [], ["bad.yaml", "optimiser.learning_rate",
                                                              "did you mean 'optimiser.lr'"]),
    "key in the wrong section": ("lr: 0.1\n", [], ["bad.yaml", "unknown key 'lr'", "optimiser.lr"]),
    "wrong type": ("batch_size: many\n", [], ["bad.yaml", "batch_size must be int or null", "'many'"]),
    "bool is not a number": ("optimiser:\n  lr: true\n", [], ["optimiser.lr must be float"]),
    "lr zero": ("optimiser:\n  lr: 0\n", [], ["optimiser.lr = 0.0 is out of range", "(0.0, inf]"]),
    "lr negative": (None, ["--set", "optimiser.lr=-1e-3"], ["--set optimiser.lr", "out of range"]),
    "momentum one": ("optimiser:\n  momentum: 1.0\n", [], ["optimiser.momentum = 1.0", "[0.0, 1.0)"]),
    "momentum negative": ("optimiser:\n  momentum: -0.1\n", [], ["optimiser.momentum", "[0.0, 1.0)"]),
    "weight decay negative": ("optimiser:\n  weight_decay: -1e-4\n", [], ["optimiser.weight_decay", "[0.0, inf]"]),
    "validation proportion one": ("dataset:\n  validation_proportion: 1\n", [],
                                  ["dataset.validation_proportion", "[0.0, 1.0)"]),
    "batch size zero": (None, ["--batch_size", "0"], ["--batch_size: batch_size = 0", "[1, 1000000000]"]),
    "malformed yaml": ("model:\n  layer_sizes: [8, 50\nloss: mse\n", [], ["bad.yaml:3", "malformed YAML"]),
    "unknown dataset": ("dataset:\n  name: mnist2\n", [], ["dataset.name", "'mnist2'", "uci_energy", "diabetes"]),
    "unknown model": ("model:\n  name: transformer\n", [], ["model.name", "'transformer'",
                                                          "valid: lstm, mlp, resnet18"]),
    "unknown method": ("tuning:\n  method: ours\n", [], ["tuning.method", "'ours'",
                                                         "valid: baydin, fixed, implicit, unrolled"]),
    "algorithm name a path": ("algorithm: ../Ours\n", [], ["bad.yaml: algorithm = '../Ours'", "a name, not a path"]),
    "tuning without a method that tunes": ("algorithm: Mine\ntuning:\n  hyperparameters: [lr]\n", [],
                                           ["algorithm Mine (tuning.method fixed) keeps its hyperparameters fixed"]),
    "section not a mapping": ("model: mlp\n", [], ["'model' must be a mapping"]),
    "layer sizes do not fit the data": ("model:\n  layer_sizes: [8, 50, 1]\n", [],
                                        ["model.layer_sizes = [8, 50, 1]", "10 inputs"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_run_dir(case, tmp_path, capsys):
    text, argv, fragments = BAD_INPUTS[case]
    files = ["-c", write(tmp_path, "bad.yaml", text)] if text is not None else []
    log_root = tmp_path / "runs"
    code = train.main([*files, *argv, "-l", str(log_root), "--hyperparameter_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("train.py: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not log_root.exists()


def test_missing_config_file(tmp_path, capsys):
    assert train.main(["-c", str(tmp_path / "nope.yaml"), "-l", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: no such config file" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_missing_processed_dataset_names_the_command(tmp_path, capsys):
    argv = ["-c", str(REPO / "configs/uci_energy.yaml"), "--set", f"dataset.data_dir={tmp_path}",
            "-l", str(tmp_path / "runs")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "python download_and_process_data.py uci_energy" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_cli_reports_errors_as_a_real_process(tmp_path):
    result = run_cli("train.py", "-c", "configs/uci_energy.yaml", "--set", "optimiser.momentum=1.5",
                     "-l", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train.py: error: --set optimiser.momentum: optimiser.momentum = 1.5 is out of range: "
        "valid range is [0.0, 1.0)"]
    assert not (tmp_path / "runs").exists()


def test_help_documents_every_key():
    result = run_cli("train.py", "--help")
    assert result.returncode == 0
    for path in config.all_keys():
        assert ".".join(path) in result.stdout, path
    for flag in ["--device", "--batch_size", "--network_weight_steps", "--hyperparameter_steps", "--seed",
                 "--log_root", "--run_group_name", "--run_name", "--set"]:
        assert flag in result.stdout


def test_unknown_flag_is_rejected_by_argparse_with_exit_2():
    result = run_cli("train.py", "--learning_rate", "3")
    assert result.returncode == 2 and "unrecognized arguments: --learning_rate" in result.stderr


def test_set_without_equals_sign(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load_from([], overrides=["optimiser.lr"])


def test_config_round_trips_through_its_dict():
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml")], overrides=["seed=3"])
    assert config.build_config(config.to_dict(cfg)) == cfg


DATASET_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                         if p.name[0].islower() and p.name != "meta_dataset.yaml")      # a task of its own
ALGORITHM_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name[0].isupper())


@pytest.mark.parametrize("dataset", DATASET_CONFIGS)
def test_every_shipped_config_combination_validates_and_builds(dataset, data_dir, request):
    if not dataset.startswith(("uci_", "diabetes", "digits")):
        data_dir = request.getfixturevalue("workload_data")
    for algorithm in ALGORITHM_CONFIGS:
        small_copy = ["batch_size=15"] if dataset == "cifar10.yaml" else []     # the stand-in has 45 training images
        cfg = config.load_from([str(REPO / "configs" / dataset), str(REPO / "configs" / algorithm)],
                               overrides=[f"dataset.data_dir={data_dir}", *small_copy])
        assert cfg.algorithm == algorithm.removesuffix(".yaml")
    setup = train.prepare(cfg)        # the data loads and the model fits it
    test = setup.splits.test
    batch = datasets.Batch(test.inputs[:2], test.targets[:2], 1.0, None, datasets.Carry() if test.sequential else None)
    assert len(measure.forward(setup.model, batch)) == test.targets[:2].numel()   # one output row per target


def test_a_new_variant_is_a_yaml_file_naming_its_method(tmp_path):
    """Catches an algorithm chosen by its name instead of tuning.method (a new name would be refused)."""
    variant = write(tmp_path, "Ours_LR_i2.yaml", "extends: " + str(REPO / "configs/Ours_LR.yaml")
                    + "\nalgorithm: Ours_LR_i2\ntuning:\n  rollback_distance: 2\n")
    cfg = config.load_from([str(REPO / "configs/diabetes.yaml"), variant])
    assert (cfg.algorithm, cfg.tuning.method, cfg.tuning.rollback_distance) == ("Ours_LR_i2", "implicit", 2)
    assert cfg.run_group == "diabetes/Ours_LR_i2"


def test_meta_dataset_config_validates():
    cfg = config.load_from([str(REPO / "configs/meta_dataset.yaml")])
    assert cfg.task == "meta_dataset" and cfg.meta.outer_steps == 500 and cfg.meta.inner_steps == 3
