"""Every bad input to train.py is refused with one short line on stderr naming the file or flag and
the key, exit code 2, and nothing written: names that are paths, YAML aliases and duplicate keys,
NaN and infinity, absurd sizes, empty or missing configs, files that are not YAML text."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from onepass import config, run_files, train
from onepass.config import ConfigError
from tests.conftest import REPO, run_cli

DIABETES = str(REPO / "configs/diabetes.yaml")
MAX_LINE = 300          # an error line longer than this quotes too much of a value


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def files_below(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def assert_refused(code: int, err: str, tmp_path: Path, before: list[Path], *fragments: str) -> None:
    """Exit code 2, exactly one short line naming what is wrong, and nothing new anywhere below
    tmp_path (the log root lies there, and a run directory that escaped it would too)."""
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("train.py: error: "), err[:MAX_LINE]
    assert len(err) < MAX_LINE, err[:MAX_LINE]
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert files_below(tmp_path) == before


def refused(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], *fragments: str) -> None:
    """train.py in this process, logging below tmp_path/logs/runs, for one hyperparameter step."""
    before = files_below(tmp_path)
    code = train.main([*argv, "-l", str(tmp_path / "logs" / "runs"), "--hyperparameter_steps", "1"])
    assert_refused(code, capsys.readouterr().err, tmp_path, before, *fragments)


def refused_cli(tmp_path: Path, argv: list[str], *fragments: str) -> None:
    """train.py as a real process, with a deadline: for inputs that used to run without end."""
    before = files_below(tmp_path)
    result = run_cli("train.py", *argv, "-l", str(tmp_path / "logs" / "runs"), timeout=60)
    assert_refused(result.returncode, result.stderr, tmp_path, before, *fragments)


# -- 1. run and group names are names, not paths ------------------------------------------------

NAMES = {
    "group up two levels": (["-g", "../../x"], ["--run_group_name: run_group_name = '../../x'", "not a path"]),
    "absolute group": (["-g", "{tmp}/abs"], ["--run_group_name: run_group_name", "not a path"]),
    "run name up a level": (["-n", "../x"], ["--run_name: run_name = '../x'", "not a path"]),
    "dot-dot in a name": (["--set", "run_name=a..b"], ["--set run_name: run_name", "'..'"]),
    "backslash": (["-g", "a\\b"], ["--run_group_name", "not a path"]),
    "control character": ([], ["bad.yaml: run_name", "control characters"]),
    "too long": (["-n", "x" * 101], ["--run_name: run_name", "at most 100 characters"]),
}


@pytest.mark.parametrize("case", NAMES, ids=list(NAMES))
def test_run_and_group_names_are_names_not_paths(case, tmp_path, capsys):
    argv, fragments = NAMES[case]
    files = [DIABETES, write(tmp_path, "bad.yaml", 'run_name: "a\\0b"\n')] if case == "control character" \
        else [DIABETES]
    refused(tmp_path, capsys, ["-c", *files, *[a.format(tmp=tmp_path) for a in argv]], *fragments)


def test_a_dot_group_is_the_log_root_itself(tmp_path):
    """meta_scaling.py logs with -g . : still a name."""
    run_dir = run_files.make_run_dir(str(tmp_path), ".", "seed0")
    assert run_dir.parent == tmp_path and run_dir.name.endswith("-seed0")


@pytest.mark.parametrize("group,name", [("../x", None), (os.sep + "abs", None), ("g", "../x"), ("g", "x/y")])
def test_make_run_dir_never_writes_outside_log_root(group, name, tmp_path):
    root = tmp_path / "logs" / "runs"
    with pytest.raises(ConfigError, match="leads out of log_root|is not a name"):
        run_files.make_run_dir(str(root), group, name)
    assert files_below(tmp_path) == []


# -- 2. YAML aliases, and values too long to quote ----------------------------------------------

def alias_bomb(levels: int) -> str:
    """model.layer_sizes as nested aliases: 9**levels integers from a few hundred bytes."""
    items = ["    - &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"    - &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]" for level in range(1, levels)]
    return "model:\n  layer_sizes:\n" + "\n".join(items) + "\n"


def test_yaml_alias_bomb_is_refused_at_the_first_alias(tmp_path, capsys):
    bomb = write(tmp_path, "bad.yaml", alias_bomb(5))     # used to print a 349 KB line (9 levels: hang)
    refused(tmp_path, capsys, ["-c", DIABETES, bomb], "bad.yaml:3: anchors and aliases", "not allowed")


def test_anchors_and_aliases_are_refused_in_set_values(tmp_path, capsys):
    refused(tmp_path, capsys, ["-c", DIABETES, "--set", "model.layer_sizes=[&w 10, *w, 1]"],
            "--set model.layer_sizes: anchors and aliases")


def test_a_long_bad_value_is_quoted_short(tmp_path, capsys):
    wide = write(tmp_path, "bad.yaml", f"batch_size: [{', '.join(['1'] * 20000)}]\n")
    refused(tmp_path, capsys, ["-c", DIABETES, wide], "bad.yaml: batch_size must be int or null, got [1, 1", "…")


def test_a_long_unknown_key_is_quoted_short(tmp_path, capsys):
    refused(tmp_path, capsys, ["-c", DIABETES, "--set", "x" * 5000 + "=1"], "unknown key 'xxx", "…")


def test_deep_nesting_is_refused(tmp_path, capsys):
    deep = write(tmp_path, "bad.yaml", "seed: " + "[" * 100000 + "]" * 100000 + "\n")    # was a RecursionError
    refused(tmp_path, capsys, ["-c", DIABETES, deep], "bad.yaml:1: nested more than")


# -- 3. NaN and infinity -------------------------------------------------------------------------

NON_FINITE = {
    "lr nan": ("optimiser:\n  lr: .nan\n", "optimiser.lr = nan"),
    "momentum nan": ("optimiser:\n  momentum: .nan\n", "optimiser.momentum = nan"),
    "lr bounds nan": ("optimiser:\n  lr_bounds: [.nan, 1]\n", "optimiser.lr_bounds = [nan, 1.0]"),
    "validation proportion nan": ("dataset:\n  validation_proportion: .nan\n", "dataset.validation_proportion = nan"),
    "lr inf": ("optimiser:\n  lr: .inf\n", "optimiser.lr = inf"),
    "lr bounds inf": ("optimiser:\n  lr_bounds: [1e-10, .inf]\n", "optimiser.lr_bounds = [1e-10, inf]"),
    "weight decay inf": ("optimiser:\n  weight_decay: .inf\n", "optimiser.weight_decay = inf"),
    "gradient clip inf": ("optimiser:\n  gradient_clip: .inf\n", "optimiser.gradient_clip = inf"),
    "validation proportion -inf": ("dataset:\n  validation_proportion: -.inf\n", "dataset.validation_proportion"),
    "overflowing exponent": ("optimiser:\n  lr: 1e999\n", "optimiser.lr = inf"),
    "integer beyond float": (f"optimiser:\n  lr: {'9' * 400}\n", "optimiser.lr = inf"),   # was OverflowError
}


@pytest.mark.parametrize("case", NON_FINITE, ids=list(NON_FINITE))
def test_non_finite_numbers_are_refused(case, tmp_path, capsys):
    text, fragment = NON_FINITE[case]
    refused(tmp_path, capsys, ["-c", DIABETES, write(tmp_path, "bad.yaml", text)],
            f"bad.yaml: {fragment}", "must be a finite number")


def test_nan_from_the_command_line_is_refused(tmp_path, capsys):
    refused(tmp_path, capsys, ["-c", DIABETES, "--set", "tuning.lr=.nan"],
            "--set tuning.lr: tuning.lr = nan must be a finite number")


# -- 4. absurd sizes -----------------------------------------------------------------------------

HUGE = "1000000000000000000000000000000"    # 10**30

SIZES = {
    "seed": (["--set", f"seed={HUGE}"], "seed = " + HUGE, "[0, 9223372036854775807]"),      # was a traceback
    "layer width": (["--set", f"model.layer_sizes=[10, {HUGE}, 1]"], "model.layer_sizes", "[1, 1000000]"),
    "threads": (["--set", f"threads={HUGE}"], "threads = " + HUGE, "[1, 4096]"),
    "batch size": (["--batch_size", HUGE], "--batch_size: batch_size", "[1, 1000000000]"),
}


@pytest.mark.parametrize("case", SIZES, ids=list(SIZES))
def test_absurd_sizes_are_out_of_range(case, tmp_path, capsys):
    argv, *fragments = SIZES[case]
    refused(tmp_path, capsys, ["-c", DIABETES, *argv], *fragments, "is out of range")


ENDLESS = {     # inputs that used to run without end
    "hyperparameter steps": (["configs/Random.yaml", "--set", f"hyperparameter_steps={HUGE}"],
                             "--set hyperparameter_steps: hyperparameter_steps = " + HUGE),
    "rollback distance": (["configs/Ours_LR.yaml", "--set", "dataset.validation_proportion=0.2",
                           "--set", f"tuning.rollback_distance={HUGE}"], "tuning.rollback_distance = " + HUGE),
    "weight steps per window": (["configs/Random.yaml", "--network_weight_steps", HUGE],
                                "--network_weight_steps: network_weight_steps = " + HUGE),
}


@pytest.mark.parametrize("case", ENDLESS, ids=list(ENDLESS))
def test_absurd_step_counts_are_out_of_range(case, tmp_path):
    argv, fragment = ENDLESS[case]
    refused_cli(tmp_path, ["-c", "configs/diabetes.yaml", *argv], fragment, "valid range is [1, 1000000000]")


# -- 5. duplicate keys ---------------------------------------------------------------------------

def test_duplicate_key_in_a_file_is_refused_with_its_line(tmp_path, capsys):
    text = "optimiser:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n"        # was silently lr = 0.2
    refused(tmp_path, capsys, ["-c", DIABETES, write(tmp_path, "bad.yaml", text)], "bad.yaml:4: duplicate key 'lr'")


def test_duplicate_top_level_key_is_refused(tmp_path, capsys):
    text = "seed: 1\nbatch_size: 8\nseed: 2\n"
    refused(tmp_path, capsys, ["-c", DIABETES, write(tmp_path, "bad.yaml", text)], "bad.yaml:3: duplicate key 'seed'")


def test_duplicate_key_in_a_set_value_is_refused(tmp_path, capsys):
    refused(tmp_path, capsys, ["-c", DIABETES, "--set", "optimiser={lr: 0.1, lr: 0.2}"],
            "--set optimiser: duplicate key 'lr'")


# -- 6. empty configs, and no config at all ------------------------------------------------------

@pytest.mark.parametrize("text", ["", "# a comment only\n\n", "---\n", "{}\n"],
                         ids=["empty", "comments", "document", "{}"])
def test_an_empty_config_file_is_refused(text, tmp_path, capsys):
    refused(tmp_path, capsys, ["-c", DIABETES, write(tmp_path, "bad.yaml", text)], "bad.yaml: empty config")


def test_no_config_file_at_all_is_refused(tmp_path, capsys):
    """The defaults alone used to train diabetes with Random, silently."""
    refused(tmp_path, capsys, ["--seed", "0"], "-c: no config files", "-c configs/diabetes.yaml")


def test_an_empty_base_of_extends_is_refused(tmp_path, capsys):
    write(tmp_path, "base.yaml", "# nothing yet\n")
    refused(tmp_path, capsys, ["-c", DIABETES, write(tmp_path, "bad.yaml", "extends: base.yaml\nseed: 1\n")],
            "base.yaml: empty config")


# -- 7. files that are not readable YAML text ----------------------------------------------------

def test_binary_config_file_is_refused(tmp_path, capsys):
    binary = write(tmp_path, "bad.yaml", bytes(range(128, 256)) * 4)           # was a UnicodeDecodeError
    refused(tmp_path, capsys, ["-c", DIABETES, binary], "bad.yaml: not a YAML config file (not UTF-8 text)")


def test_control_characters_in_a_text_file_are_refused(tmp_path, capsys):
    refused(tmp_path, capsys, ["-c", DIABETES, write(tmp_path, "bad.yaml", "seed: 1\x00\n")],
            "bad.yaml", "malformed YAML")


def test_a_folder_given_as_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "configs.yaml").mkdir()                                          # was "no such config file"
    refused(tmp_path, capsys, ["-c", DIABETES, str(tmp_path / "configs.yaml")], "configs.yaml: is a folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads a file whatever its permissions: nothing to refuse")
def test_an_unreadable_config_file_is_refused(tmp_path, capsys):
    locked = write(tmp_path, "bad.yaml", "seed: 1\n")
    os.chmod(locked, 0)
    refused(tmp_path, capsys, ["-c", DIABETES, locked], "bad.yaml: cannot read the config file")


EXTENDS = {
    "binary base": ("extends: base.yaml\n", bytes(range(128, 256)), "base.yaml: not a YAML config file"),
    "missing base": ("extends: [missing.yaml]\n", None, "bad.yaml: extends: no such config file 'missing.yaml'"),
    "folder base": ("extends: base.yaml\n", "folder", "base.yaml: is a folder"),
    "not a file name": ("extends: 5\n", None, "bad.yaml: extends must be a file name"),       # was a TypeError
    "null": ("extends:\n", None, "bad.yaml: extends must be a file name"),
}


@pytest.mark.parametrize("case", EXTENDS, ids=list(EXTENDS))
def test_extends_a_bad_file(case, tmp_path, capsys):
    text, base, fragment = EXTENDS[case]
    if base == "folder":
        (tmp_path / "base.yaml").mkdir()
    elif base is not None:
        write(tmp_path, "base.yaml", base)
    refused(tmp_path, capsys, ["-c", DIABETES, write(tmp_path, "bad.yaml", text + "seed: 1\n")], fragment)


# -- 9. settings the run would silently ignore or clamp ----------------------------------------------

IGNORED = {     # each used to run without a word
    "batch larger than the data": (["configs/Random.yaml", "--batch_size", "1000"],
                                   "batch_size = 1000 is more than the 398 training rows: use at most 398"),
    "no training rows left": (["configs/Random.yaml", "--set", "dataset.validation_proportion=0.999"],
                              "dataset.validation_proportion = 0.999 leaves no training rows of dataset 'diabetes'"),
    "momentum under adam": (["configs/Random.yaml", "--set", "optimiser.name=adam", "--set",
                             "optimiser.momentum=0.9"], "--set optimiser.momentum: optimiser.momentum = 0.9 is not "
                                                        "used by optimiser.name = 'adam'"),
    "beta1 under sgd": (["configs/Random.yaml", "--set", "optimiser.beta1=0.8"],
                        "optimiser.beta1 = 0.8 is not used by optimiser.name = 'sgd'"),
    "a dataset config where the algorithm goes": (["configs/uci_energy.yaml"],
                                                  "-c configs/uci_energy.yaml: a second dataset config"),
}


@pytest.mark.parametrize("case", IGNORED, ids=list(IGNORED))
def test_settings_the_run_would_ignore_are_refused(case, tmp_path, capsys):
    argv, fragment = IGNORED[case]
    refused(tmp_path, capsys, ["-c", DIABETES, *argv], fragment)


def test_momentum_in_the_file_that_chooses_adam_is_refused(tmp_path, capsys):
    adam = write(tmp_path, "adam.yaml", "algorithm: Random\noptimiser:\n  name: adam\n  momentum: 0.9\n")
    refused(tmp_path, capsys, ["-c", DIABETES, adam], "adam.yaml: optimiser.momentum = 0.9 is not used")


def test_the_dataset_configs_sgd_values_stay_allowed_when_a_user_switches_to_adam(tmp_path):
    """Catches the unused-setting check refusing the dataset config's own momentum (which the user
    did not set) once `--set optimiser.name=adam` is given."""
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml"), str(REPO / "configs/Random.yaml")],
                           overrides=["optimiser.name=adam"])
    assert cfg.optimiser.name == "adam" and cfg.optimiser.momentum == 0.6224593312      # not the default 0.5


@pytest.mark.parametrize("digits", ["9" * 100_000, "0x" + "f" * 100_000, "-" + "1" * 5000])
def test_an_integer_too_long_for_python_is_refused(digits, tmp_path, capsys):
    """Was a traceback (Python's int conversion limit) for --set values of 100,000 digits."""
    refused(tmp_path, capsys, ["-c", DIABETES, "--set", f"seed={digits}"], "--set seed: an integer of",
            "characters is too long")


@pytest.mark.parametrize("argv,fragment", [
    (["--seed", "9" * 100_000], "argument --seed: invalid int value: '999"),
    (["--nproc", "0"], "argument --nproc: must be at least 1, got 0"),
    (["--hyperparameter-steps", "3"], "unrecognized arguments: --hyperparameter-steps"),
])
def test_a_malformed_command_line_is_one_short_line(argv, fragment, tmp_path, capsys):
    """Was argparse's usage block and then the whole 100,000-digit value quoted back."""
    with pytest.raises(SystemExit) as exited:
        train.main(["-c", DIABETES, *argv, "-l", str(tmp_path / "logs")])
    assert_refused(exited.value.code, capsys.readouterr().err, tmp_path, [], fragment, "(see train.py --help)")
