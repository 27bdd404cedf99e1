"""Bad files and folders around a run: each is one line on stderr naming the file, exit 2, and no write
outside the run's own place (checkpoints, run directories, processed and raw data)."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from onepass import download_and_process_data, train, util
from tests.conftest import REPO


def command(log_root: Path, *extra: str, dataset: str = "diabetes") -> list[str]:
    return ["-c", str(REPO / f"configs/{dataset}.yaml"), str(REPO / "configs/Ours_LR.yaml"), "--seed", "3",
            "--set", "model.layer_sizes=[10, 8, 1]", "--hyperparameter_steps", "2", "-l", str(log_root), *extra]


def one_line_error(capsys: pytest.CaptureFixture, *fragments: str, prog: str = "train.py") -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(autouse=True)
def inside_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a folder two levels below tmp_path: paths a bug resolves against the working folder stay there."""
    cwd = tmp_path / "cwd" / "deeper"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)


def files_below(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- atomic writes ----

def test_checkpoint_write_does_not_follow_a_symlink_planted_at_a_predictable_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "ck.pt.tmp").symlink_to(victim)
    assert train.main(command(tmp_path / "runs", "-S", str(tmp_path / "ck.pt"))) == 0
    assert victim.read_text() == "precious"
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["windows_done"] == 2


def test_write_json_does_not_follow_a_symlink_and_leaves_no_temporary(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "metrics.json.tmp").symlink_to(victim)
    util.write_json(tmp_path / "metrics.json", {"a": 1})
    assert victim.read_text() == "precious"
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        util.write_json(tmp_path / "other.json", {"a": object()})
    assert files_below(tmp_path) == {"victim.txt", "metrics.json.tmp", "metrics.json", "cwd", "cwd/deeper"}


# ---- a checkpoint is data, not instructions ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real checkpoint of a 2-window diabetes run, and its log root."""
    folder = tmp_path_factory.mktemp("checkpoint")
    assert train.main(command(folder / "runs", "-S", str(folder / "ck.pt"))) == 0
    return folder / "ck.pt", folder / "runs"


def edited(checkpoint: Path, tmp_path: Path, **changes: object) -> Path:
    state = torch.load(checkpoint, weights_only=True) | changes
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("stored", ["../../escaped", "absolute"])
def test_resume_refuses_a_stored_run_dir_outside_the_log_root(checkpoint, tmp_path, capsys, stored):
    path = edited(checkpoint[0], tmp_path, run_dir=str(tmp_path / "escaped") if stored == "absolute" else stored)
    runs = tmp_path / "a" / "runs"
    assert train.main(command(runs, "--hyperparameter_steps", "3", "-s", str(path))) == 2
    one_line_error(capsys, str(path), "outside")
    assert not (tmp_path / "escaped").exists()
    assert not runs.exists()


def test_resume_does_not_log_into_another_runs_directory(checkpoint, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train.main(command(runs, "--seed", "4", "--set", "optimiser.lr=0.01")) == 0
    other = next(runs.rglob("metrics.json"))
    before, listing = other.read_text(), sorted(other.parent.iterdir())
    path = edited(checkpoint[0], tmp_path, run_dir=str(other.parent.relative_to(runs)))
    capsys.readouterr()
    assert train.main(command(runs, "--hyperparameter_steps", "3", "-s", str(path))) == 2
    one_line_error(capsys, str(path), "another run")
    assert other.read_text() == before and sorted(other.parent.iterdir()) == listing


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_is_not_executed(tmp_path, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"config": Exploit(marker)}))
    assert train.main(command(tmp_path / "runs", "-s", str(path))) == 2
    one_line_error(capsys, str(path), "-S")
    assert not marker.exists() and not (tmp_path / "runs").exists()


def damaged_checkpoints(checkpoint: Path) -> dict[str, object]:
    state = torch.load(checkpoint, weights_only=True)
    weights = dict(state["model"])
    first = next(iter(weights))
    weights[first] = torch.zeros(weights[first].shape[0] + 1, weights[first].shape[1], dtype=weights[first].dtype)
    return {"truncated": checkpoint.read_bytes()[:1000], "random bytes": os.urandom(5000),
            "bare tensor": torch.zeros(3), "missing keys": {k: v for k, v in state.items() if k != "model"},
            "other shapes": state | {"model": weights}, "not a config": state | {"config": [1, 2]}}


@pytest.mark.parametrize("kind", ["truncated", "random bytes", "bare tensor", "missing keys", "other shapes",
                                  "not a config"])
def test_a_damaged_checkpoint_is_one_line(checkpoint, tmp_path, capsys, kind):
    path = tmp_path / "damaged.pt"
    content = damaged_checkpoints(checkpoint[0])[kind]
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    runs = tmp_path / "runs"
    assert train.main(command(runs, "--hyperparameter_steps", "3", "-s", str(path))) == 2
    one_line_error(capsys, str(path))
    assert not runs.exists()


# ---- where a run writes ----

@pytest.mark.parametrize("where", ["missing/ck.pt", "folder"])
def test_save_state_to_a_missing_folder_or_a_folder_is_refused_before_training(tmp_path, capsys, where):
    (tmp_path / "folder").mkdir()
    runs = tmp_path / "runs"
    assert train.main(command(runs, "-S", str(tmp_path / where))) == 2
    one_line_error(capsys, f"-S {tmp_path / where}")
    assert not runs.exists() and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("root", ["somefile", "somefile/x"])
def test_a_log_root_that_is_or_lies_under_a_file_is_refused(tmp_path, capsys, root):
    (tmp_path / "somefile").write_text("not a folder")
    assert train.main(command(tmp_path / root, "-S", str(tmp_path / "ck.pt"))) == 2
    one_line_error(capsys, "log_root", str(tmp_path / "somefile"))
    assert files_below(tmp_path) == {"somefile", "cwd", "cwd/deeper"}


def test_a_full_disk_mid_run_fails_the_run_cleanly(tmp_path, capsys, monkeypatch):
    def full_disk(data: object, file: object) -> None:
        if hasattr(file, "write"):       # half a checkpoint, then the disk is full
            file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    runs, path = tmp_path / "runs", tmp_path / "ck.pt"
    assert train.main(command(runs, "-S", str(path), "--checkpoint_every", "1")) == 2
    one_line_error(capsys, str(path), os.strerror(errno.ENOSPC))
    (metrics,) = runs.rglob("metrics.json")
    assert json.loads(metrics.read_text())["status"] == "failed"
    assert not path.exists() and not [p for p in tmp_path.rglob("*") if "tmp" in p.name]


# ---- processed data ----

def energy_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"inputs": rng.normal(size=(768, 8)), "targets": rng.normal(size=(768, 1))}


def damaged_data(kind: str, path: Path) -> None:
    arrays = energy_arrays()
    if kind == "truncated":
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[:3000])
        return
    if kind == "not an npz":
        path.write_text("inputs,targets\n1,2\n")
        return
    if kind == "missing arrays":
        del arrays["targets"]
    elif kind == "wrong dtype":
        arrays["inputs"] = np.full((768, 8), "x")
    elif kind == "wrong shape":
        arrays["targets"] = arrays["targets"][:700]
    elif kind == "NaN inputs":
        arrays["inputs"][5, 3] = np.nan
    np.savez(path, **arrays)


@pytest.mark.parametrize("kind", ["truncated", "not an npz", "missing arrays", "wrong dtype", "wrong shape",
                                  "NaN inputs"])
def test_a_damaged_processed_file_is_one_line_with_the_rebuild_command(tmp_path, capsys, kind):
    data = tmp_path / "data"
    data.mkdir()
    damaged_data(kind, data / "uci_energy.npz")
    runs = tmp_path / "runs"
    argv = command(runs, "--set", f"dataset.data_dir={data}", "--set", "model.layer_sizes=[8, 8, 1]",
                   dataset="uci_energy")
    assert train.main(argv) == 2
    one_line_error(capsys, str(data / "uci_energy.npz"), "python download_and_process_data.py uci_energy")
    assert not runs.exists()


def test_sound_processed_data_still_trains(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "uci_energy.npz", **energy_arrays())
    assert train.main(command(tmp_path / "runs", "--set", f"dataset.data_dir={data}", "--set",
                              "model.layer_sizes=[8, 8, 1]", dataset="uci_energy")) == 0


# ---- raw data ----

def raw_energy(tmp_path: Path, shared_data: Path, edit) -> Path:
    source = tmp_path / "source"
    folder = source / "uci" / "energy"
    shutil.copytree(shared_data / "uci" / "energy", folder)
    lines = (folder / "data.txt").read_text().splitlines()
    (folder / "data.txt").write_text("\n".join(edit(lines)) + "\n")
    return source


@pytest.mark.parametrize("edit", [
    pytest.param(lambda lines: ["\t".join(line.split()[1:]) for line in lines], id="dropped column"),
    pytest.param(lambda lines: [*lines[:10], "1 2 3", *lines[10:]], id="ragged row"),
    pytest.param(lambda lines: [*lines[:10], "abc " + lines[10].split(maxsplit=1)[1], *lines[11:]], id="not a number"),
    pytest.param(lambda lines: [*lines[:10], "nan " + lines[10].split(maxsplit=1)[1], *lines[11:]], id="NaN"),
])
def test_damaged_raw_uci_data_is_one_line_naming_the_file(tmp_path, capsys, shared_data, edit):
    source, out = raw_energy(tmp_path, shared_data, edit), tmp_path / "out"
    assert download_and_process_data.main(["uci_energy", "--source", str(source), "--out", str(out)]) == 2
    one_line_error(capsys, str(source / "uci" / "energy" / "data.txt"), prog="download_and_process_data.py")
    assert not out.exists()


def test_every_uci_set_has_its_expected_column_count(shared_data, tmp_path):
    assert download_and_process_data.main(["--source", str(shared_data), "--out", str(tmp_path)]) == 0


def test_a_reader_that_stops_reading_gets_no_traceback():
    """`run_all.py --list | head -1`: the script ends quietly (exit 141, as shell tools do)."""
    process = subprocess.Popen([sys.executable, "run_all.py", "--list"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.readline()
    process.stdout.close()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in process.stderr.read()
