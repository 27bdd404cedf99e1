"""The two install routes agree: pyproject.toml (`pip install -e .`) mirrors Pipfile (pipenv, `make`),
installs every module, and Ray stays an optional extra on both."""
from __future__ import annotations

import json
import tomllib

from tests.conftest import REPO


def requirement(name: str, spec: str | dict) -> str:
    """A Pipfile entry as a pip requirement: `ray = {version = "==2.58.0", extras = ["tune"]}` -> ray[tune]==2.58.0."""
    extras = ""
    if isinstance(spec, dict):
        extras = f"[{','.join(spec['extras'])}]" if spec.get("extras") else ""
        spec = spec.get("version", "*")
    return f"{name}{extras}{'' if spec == '*' else spec}"


def test_pyproject_mirrors_the_pipfile_and_installs_every_module():
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["dependencies"] == [requirement(*entry) for entry in pipfile["packages"].items()]
    assert project["optional-dependencies"]["ray"] == [requirement(*entry) for entry in pipfile["ray"].items()]
    assert project["optional-dependencies"]["dev"] == [requirement(*entry) for entry in pipfile["dev-packages"].items()]
    setuptools = pyproject["tool"]["setuptools"]
    assert sorted(setuptools["py-modules"]) == sorted(path.stem for path in REPO.glob("*.py")), \
        "a top-level module missing from pyproject.toml's py-modules"
    assert sorted(setuptools["packages"]) == sorted(path.parent.name for path in REPO.glob("*/__init__.py")
                                                    if path.parent.name != "tests")


def test_ray_is_only_in_the_optional_category_of_the_lock():
    lock = json.loads((REPO / "Pipfile.lock").read_text())
    assert lock["default"]["torch"]["version"].startswith("==2.13.0")
    assert lock["ray"]["ray"]["version"] == "==2.58.0"
    for heavy in ("ray", "pyarrow", "pandas", "pydantic"):
        assert heavy not in lock["default"] and heavy not in lock["develop"], heavy
