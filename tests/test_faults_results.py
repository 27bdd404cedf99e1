"""Damaged results folders and bad flags of the scripts that read them (run_all.py, paper_plots.py,
parallel_exec.py, bayesopt.py, util.get_tags): a bad input is one line on stderr naming it, exit 2 and
nothing written; a damaged run inside a results folder is skipped with one line naming its file (and
listed in the report); no output is written through a link planted at its name."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onepass import util
from tests.conftest import REPO, run_cli
from tests.test_results import write_main_experiment


def one_line(result: subprocess.CompletedProcess, prog: str, *fragments: str, code: int = 2) -> str:
    """The one line a script wrote on stderr, after checking its exit code and that it names `fragments`."""
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"{prog}: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr


def files_below(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def victim(tmp_path: Path) -> Path:
    """A file that a write following a planted link would overwrite."""
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious")
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small main experiment, written as the framework writes runs (2 algorithms, 2 runs each)."""
    root = tmp_path_factory.mktemp("sound") / "results"
    write_main_experiment(root, {"Random": [4.0, 2.0], "Ours_LR_Momentum": [0.5, 0.25]})
    return root


def damaged_copy(results: Path, tmp_path: Path, name: str, content: object) -> tuple[Path, Path]:
    """A copy of `results` in which one run's file `name` holds `content` (JSON); (the copy, that file)."""
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    path = copy / "main" / "uci_energy" / "Random" / "run0" / name
    path.write_text(json.dumps(content))
    return copy, path


# ---- 1. the calibration table ----

CALIBRATIONS = {
    "no date": {"machine": {"cpu": "x", "cores": 2, "load": 0.5, "workers": 2}, "kinds": {}},
    "load a string": {"machine": {"date": "d", "cpu": "x", "cores": 2, "load": "high", "workers": 2}, "kinds": {}},
    "machine a list": {"machine": [], "kinds": {}},
    "no kinds": {"machine": {"date": "d", "cpu": "x", "cores": 2, "load": 0.5, "workers": 2}},
    "a pace a string": {"machine": {"date": "d", "cpu": "x", "cores": 2, "load": 0.5, "workers": 2},
                        "kinds": {"uci_energy/Random/T=10": {"setup_seconds": 1.0, "seconds_per_step": "fast"}}},
    "a list": [1, 2],
    "a string": "calibrated",
}


@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_a_damaged_calibration_table_is_one_line(tmp_path, kind):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(CALIBRATIONS[kind]))
    result = run_cli("run_all.py", "--list", "-l", str(tmp_path))
    one_line(result, "run_all.py", str(path), "not a calibration table", "run --calibrate again")
    assert result.stdout == "" and files_below(tmp_path) == {"calibration.json"}


# ---- 2. metrics.json and config.json of the wrong shape ----

METRICS = {"a list": [1], "a string": "completed", "no status": {"final": {}}, "status a number": {"status": 5},
           "final a list": {"status": "completed", "final": []},
           "a final value a string": {"status": "completed", "final": {"Unnormalised_Loss/Test": "4"}}}


@pytest.mark.parametrize("kind", METRICS)
def test_parse_counts_a_run_with_damaged_metrics_as_unreadable(results, tmp_path, kind):
    copy, path = damaged_copy(results, tmp_path, "metrics.json", METRICS[kind])
    result = run_cli("run_all.py", "--parse", str(copy))
    one_line(result, "run_all.py", f"skipped the run {path.parent}", str(path), code=0)
    (random,) = [line for line in result.stdout.splitlines() if line.startswith("Random ")]
    assert "1 of 2" in random and "1 unreadable" in random      # completed, and the damaged one counted


def test_get_tags_skips_a_run_whose_metrics_or_config_is_not_an_object(results, tmp_path, capsys):
    copy, metrics = damaged_copy(results, tmp_path, "metrics.json", [1])
    config = copy / "main" / "uci_energy" / "Random" / "run1" / "config.json"
    config.write_text('"Random"')
    runs = util.get_tags(copy)
    err = capsys.readouterr().err.splitlines()
    assert len(runs) == 2 and sorted(path for path, _ in runs.skipped) == [metrics.parent, config.parent]
    assert len(err) == 2 and str(metrics) in err[0] and "not a JSON object" in err[0] and str(config) in err[1]


PLOTTED = {
    "metrics a list": ("metrics.json", [1]),
    "metrics a string": ("metrics.json", "completed"),
    "status a number": ("metrics.json", {"status": 5, "final": {}}),
    "final a list": ("metrics.json", {"status": "completed", "final": []}),
    "config a list": ("config.json", [1]),
    "config without algorithm": ("config.json", {"task": "hyperparameter_optimisation", "dataset": {"name": "x"},
                                                 "seed": 0, "hyperparameter_steps": 5,
                                                 "optimiser": {"lr": 1e-3, "weight_decay": 1e-3}}),
    "dataset a string": ("config.json", {"algorithm": "Random", "dataset": "uci_energy", "seed": 0,
                                         "hyperparameter_steps": 5, "optimiser": {"lr": 1e-3, "weight_decay": 1e-3}}),
}


@pytest.mark.parametrize("kind", PLOTTED)
def test_paper_plots_skips_a_run_with_a_damaged_file_and_lists_it(results, tmp_path, kind):
    copy, path = damaged_copy(results, tmp_path, *PLOTTED[kind])
    result = run_cli("paper_plots.py", str(copy), "--out", str(tmp_path / "paper"))
    assert result.returncode == 0 and result.stderr.count("\n") == 1, result.stderr
    assert f"skipped the run {path.parent}: {path}: " in result.stderr and "Traceback" not in result.stderr
    report = (tmp_path / "paper" / "report.md").read_text()
    assert f"- the run {path.parent}: {path}: " in report.split("## Not made")[1]
    assert "| Random | 1 | 2 |" in report                  # the other Random run (final 2) is still in the table


REPLAYED = {"a list": [1], "a string": "Random",
            "no optimiser": {"algorithm": "Random", "seed": 1},
            "lr a string": {"algorithm": "Random", "seed": 1,
                            "optimiser": {"lr": "0.1", "weight_decay": 1e-3, "momentum": 0.5}}}


@pytest.mark.parametrize("kind", REPLAYED)
def test_replay_of_a_damaged_config_is_one_line(tmp_path, kind):
    source, root = tmp_path / "source", tmp_path / "replayed"
    sound = {"algorithm": "Random", "seed": 1, "optimiser": {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.5}}
    for name, values in (("a", sound), ("b", REPLAYED[kind])):
        (source / name).mkdir(parents=True)
        (source / name / "config.json").write_text(json.dumps(values))
    result = run_cli("parallel_exec.py", "-l", str(root), "-d", "diabetes", "-a", "Random", "--generator", "replay",
                     "--source", str(source))
    one_line(result, "parallel_exec.py", f"--source {source}", str(source / "b" / "config.json"),
             "repair or delete that run")
    assert not root.exists()


# ---- 3.-5. folders and flags ----

@pytest.mark.parametrize("what", ["missing", "a file"])
def test_parse_of_a_missing_folder_is_one_line(tmp_path, what):
    folder = tmp_path / "nowhere"
    if what == "a file":
        folder.write_text("not a folder")
    one_line(run_cli("run_all.py", "--parse", str(folder)), "run_all.py", f"--parse {folder}", "no such folder")


def unprivileged(*args: str) -> list[str]:
    """A command that file permissions apply to even when the tests run as root (who otherwise
    writes into read-only folders): root without the capability to override them."""
    command = [sys.executable, *args]
    if os.geteuid() != 0:
        return command
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]


@pytest.fixture
def read_only(results: Path, tmp_path: Path):
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    folders = [copy, *(path for path in copy.rglob("*") if path.is_dir())]
    for folder in folders:
        folder.chmod(0o555)
    yield copy
    for folder in folders:
        folder.chmod(0o755)


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root ignores permissions")
def test_paper_plots_on_a_read_only_results_folder(read_only, tmp_path):
    before = files_below(read_only)
    refused = subprocess.run(unprivileged("paper_plots.py", str(read_only)), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    one_line(refused, "paper_plots.py", f"{read_only} is read-only", "--out DIR")
    out = tmp_path / "elsewhere"
    made = subprocess.run(unprivileged("paper_plots.py", str(read_only), "--out", str(out)), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and made.stderr == "", made.stderr        # no cache written, and no complaint
    assert "| Random | 2 | 3 ± " in (out / "report.md").read_text() and (out / "main_uci_energy_cdf.png").is_file()
    assert files_below(read_only) == before


def test_paper_plots_with_out_naming_a_file_is_one_line(results, tmp_path):
    target = victim(tmp_path)
    one_line(run_cli("paper_plots.py", str(results), "--out", str(target)), "paper_plots.py", f"--out {target}",
             "not a folder", "choose another with --out DIR")
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize("command", [("parallel_exec.py", "-d", "diabetes", "-a", "Random"),
                                     ("run_all.py", "uci_energy", "--reps", "1"), ("run_all.py", "--calibrate")])
def test_a_log_root_that_is_a_file_is_one_line(tmp_path, command):
    target = victim(tmp_path)
    one_line(run_cli(*command, "-l", str(target)), command[0], f"-l {target}", "not a folder", "-l DIR")
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize(("flag", "value", "fragment"), [
    ("--guided", "-1", "must be 0 or more"), ("--cap", "nan", "positive finite"), ("--cap", "inf", "positive finite"),
    ("--cap", "-5", "positive finite"), ("--cap", "0", "positive finite")])
def test_bayesopt_refuses_a_negative_count_and_a_cap_that_is_no_loss(tmp_path, flag, value, fragment):
    root = tmp_path / "bayesopt"
    one_line(run_cli("bayesopt.py", "-d", "uci_energy", "-l", str(root), "--workers", "1", flag, value),
             "bayesopt.py", f"{flag} {value}", fragment)
    assert not root.exists()


# ---- 6.-7. no write through a planted link ----

def test_the_tags_cache_is_not_written_through_a_planted_link(results, tmp_path, capsys):
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    run_dir = copy / "main" / "uci_energy" / "Random" / "run0"
    target = victim(tmp_path)
    (run_dir / f"{util.CACHE_NAME}.{os.getpid()}.tmp.npz").symlink_to(target)   # the name a cache once went through
    (run_dir / util.CACHE_NAME).symlink_to(target)
    runs = util.get_tags(copy)
    assert target.read_bytes() == b"precious" and len(runs) == 4
    cache = run_dir / util.CACHE_NAME
    assert not cache.is_symlink() and str(np.load(cache)["signature"]).startswith("[[")
    assert not [path for path in run_dir.iterdir() if path.name.endswith(".tmp")]
    assert str(cache) in capsys.readouterr().err             # the planted link was no cache: said, and replaced


def test_paper_plots_outputs_are_not_written_through_planted_links(results, tmp_path):
    out = tmp_path / "paper"
    out.mkdir()
    names = ("report.md", "main_uci_energy_table.tex", "main_uci_energy_cdf.png", "main_uci_energy_cdf.pdf")
    targets = {}
    for name in names:
        targets[name] = tmp_path / f"victim-{name}"
        targets[name].write_bytes(b"precious")
        (out / name).symlink_to(targets[name])
    result = run_cli("paper_plots.py", str(results), "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in names:
        assert targets[name].read_bytes() == b"precious", name
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 100, name
