"""The two install routes agree: pyproject.toml (`pip install -e .`) mirrors Pipfile (pipenv, `make`),
installs every module, and Ray and the learning-rate-free peers stay optional extras on both."""
from __future__ import annotations

import json
import tomllib

from packaging.requirements import Requirement

from tests.conftest import REPO


def requirement(name: str, spec: str | dict) -> str:
    """A Pipfile entry as a pip requirement: `ray = {version = "==2.58.0", extras = ["tune"]}` -> ray[tune]==2.58.0."""
    extras = ""
    if isinstance(spec, dict):
        extras = f"[{','.join(spec['extras'])}]" if spec.get("extras") else ""
        spec = spec.get("version", "*")
    return f"{name}{extras}{'' if spec == '*' else spec}"


def test_pyproject_mirrors_the_pipfile_and_installs_every_module():
    """Catches a dependency added to one route only, a torch range that excludes the locked torch,
    and a package folder left out of the installed `onepass` (the top-level modules go in through
    package-dir; tests/test_install.py checks the installed copy itself)."""
    pipfile = tomllib.loads((REPO / "Pipfile").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    locked = [requirement(*entry) for entry in pipfile["packages"].items()]
    ranged = [Requirement(entry) for entry in project["dependencies"]]
    assert [entry.name for entry in ranged] == [Requirement(entry).name for entry in locked]
    for entry, pinned in zip(ranged, locked, strict=True):
        if entry.name == "torch":          # a range in pyproject, the tested version in the Pipfile
            assert entry.specifier.contains(str(Requirement(pinned).specifier).removeprefix("=="))
        else:
            assert str(entry) == pinned
    for extra in ("ray", "peers"):
        assert project["optional-dependencies"][extra] == [requirement(*entry) for entry in pipfile[extra].items()]
    assert project["optional-dependencies"]["dev"] == [requirement(*entry) for entry in pipfile["dev-packages"].items()]
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"onepass": "."}
    folders = {path.parent.name for path in REPO.glob("*/__init__.py")} - {"tests", "onepass"}
    assert sorted(setuptools["packages"]) == sorted(["onepass", *(f"onepass.{name}" for name in
                                                                  folders | {"configs", "resources"})])


def test_ray_is_only_in_the_optional_category_of_the_lock():
    lock = json.loads((REPO / "Pipfile.lock").read_text())
    assert lock["default"]["torch"]["version"].startswith("==2.13.0")
    assert lock["ray"]["ray"]["version"] == "==2.58.0"
    for heavy in ("ray", "pyarrow", "pandas", "pydantic"):
        assert heavy not in lock["default"] and heavy not in lock["develop"], heavy


def test_the_peers_are_pinned_only_in_their_optional_category_of_the_lock_on_the_same_torch():
    """Catches a re-lock that moves torch off its CPU pin for the peers' sake, or installs the peers
    with the default packages."""
    lock = json.loads((REPO / "Pipfile.lock").read_text())
    pins = {"prodigyopt": "==1.1.2", "dadaptation": "==3.2", "schedulefree": "==1.4.1"}
    for name, version in pins.items():
        assert lock["peers"][name]["version"] == version and lock["peers"][name]["hashes"], name
        assert name not in lock["default"] and name not in lock["develop"], name
    for name, entry in lock["peers"].items():        # what they share with the default packages, at the same pin
        assert name in pins or entry == lock["default"][name], name
