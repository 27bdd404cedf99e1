"""`pip install` of the project into a fresh environment that already has its own torch and a package
named `datasets`: both keep working, and the onepass-* commands run from any folder.

The wheel is built from this checkout without the network (the running interpreter's setuptools),
and the fresh environment sees the running one's packages (torch 2.13, numpy, ...) through a .pth
file, as a user's environment has its own torch; `--no-index` makes pip resolve every requirement
against those or fail, so a pin the existing torch does not meet fails here."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STAND_IN = 'WHO = "the other datasets package"\n'


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with a stand-in `datasets` package, the running interpreter's
    packages (torch included) visible, and onepass installed from a wheel of this checkout."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"        # a copy: building writes build/ and *.egg-info/ beside the sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "data", "runs", "build", "*.egg-info",
                                                                "__pycache__", "tests", "bench", "docs"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
         str(root / "wheel"), str(source)], cwd=root)
    env = root / "env"
    venv.EnvBuilder(with_pip=False).create(env)     # pip, like torch, comes from the existing packages
    python = env / "bin" / "python"
    (purelib,) = {Path(path) for path in json.loads(run([str(python), "-c", "import json, site; "
                                                         "print(json.dumps(site.getsitepackages()))"], root).stdout)}
    (purelib / "datasets").mkdir()
    (purelib / "datasets" / "__init__.py").write_text(STAND_IN)
    (purelib / "zz_existing_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (wheel,) = (root / "wheel").glob("onepass-*.whl")
    run([str(python), "-m", "pip", "install", "--quiet", "--no-index", str(wheel)], cwd=root)
    return env


def test_the_install_leaves_another_datasets_package_and_torch_alone(environment: Path, tmp_path: Path):
    """Catches a project module installed at the top level (`datasets` would replace the user's),
    left out of the package, or imported by its bare name (`import datasets` inside onepass would
    get the other package), and a torch pin that the environment's torch does not meet (pip would
    have to replace it)."""
    check = ("import datasets, torch\n"
             "from onepass import train, datasets as ours\n"
             "import datasets as again\n"
             "print(datasets.WHO, again.WHO, ours.__name__, ours.__file__, torch.__version__, sep='|')\n")
    who, again, ours, where, torch_version = run([str(environment / "bin" / "python"), "-c", check],
                                                 cwd=tmp_path).stdout.strip().split("|")
    assert who == again == "the other datasets package"
    assert ours == "onepass.datasets" and Path(where).is_relative_to(environment)
    installed = Path(where).parent
    assert {path.name for path in installed.glob("*.py")} == {path.name for path in REPO.glob("*.py")}
    assert {path.name for path in (installed / "algorithms").glob("*.py")} == \
        {path.name for path in (REPO / "algorithms").glob("*.py")}
    import torch
    assert torch_version == torch.__version__


def test_the_commands_run_from_any_folder(environment: Path, tmp_path: Path, shared_data: Path):
    """The console commands of pyproject.toml, run in an empty folder: the data goes to ./data, the
    shipped configs are found by name, the run is written below ./runs. Catches a missing entry
    point, configs left out of the package, and data or runs written into site-packages."""
    bin_dir = environment / "bin"
    run([str(bin_dir / "onepass-data"), "uci_energy", "--source", str(shared_data)], cwd=tmp_path)
    assert (tmp_path / "data" / "uci_energy.npz").is_file()
    run([str(bin_dir / "onepass-train"), "-c", "uci_energy", "configs/Ours_LR_Momentum.yaml",
         "--hyperparameter_steps", "2"], cwd=tmp_path)
    (metrics,) = (tmp_path / "runs" / "uci_energy" / "Ours_LR_Momentum").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["status"] == "completed"
    assert "usage" in run([str(bin_dir / "onepass-run-all"), "--help"], cwd=tmp_path).stdout
