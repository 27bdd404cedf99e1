"""The project's modules import one another in one direction, and only by the package's name.

Imports are read from the source (those inside functions count; `if TYPE_CHECKING:` ones, which
never run, do not), so a cycle is caught even where it happens not to break at import time."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = "onepass"     # the name every project module is imported by (onepass/__init__.py)


def project_modules() -> dict[str, Path]:
    """Module name -> file, for the top-level modules and the algorithms package."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    for path in (REPO / "algorithms").glob("*.py"):
        modules["algorithms" if path.stem == "__init__" else f"algorithms.{path.stem}"] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_names(path: Path, type_checking: bool = False) -> set[str]:
    """Every module name `path` imports, and `module.name` for each name it imports from one (with
    the imports under `if TYPE_CHECKING:` when asked)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def imported(path: Path, modules: dict[str, Path], type_checking: bool = False) -> set[str]:
    """The project modules `path` imports, by their names inside the package."""
    inside = {name.removeprefix(f"{PACKAGE}.") for name in imported_names(path, type_checking)}
    return {name for name in inside if name in modules}


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(path, modules, type_checking) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, str] = {}          # "open" while on the current path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_has_no_cycles():
    assert find_cycle(import_graph()) is None


def test_the_schema_is_the_bottom_layer():
    assert import_graph(type_checking=True)["schema"] == set()


def test_no_algorithm_imports_the_training_loop():
    """Algorithms see a run through algorithms.steps.Problem, never the Learner (type hints included)."""
    graph = import_graph(type_checking=True)
    for name, imports in graph.items():
        if name.startswith("algorithms"):
            assert "train" not in imports, name


def test_project_modules_are_imported_only_by_the_package_name():
    """`import datasets` in an installed copy would import whatever else is called datasets (Hugging
    Face's): every import of a project module, in the product, tests, benchmarks and examples, goes
    through `onepass`. Catches a plain `import util` or `from schema import Config` anywhere."""
    modules = set(project_modules())
    files = [path for path in REPO.rglob("*.py") if not {".venv", ".git"} & set(path.parts)]
    plain = {f"{path.relative_to(REPO)}: {name}" for path in files
             for name in imported_names(path, type_checking=True) if name in modules}
    assert not plain


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(project_modules())
    processes = {name: subprocess.Popen([sys.executable, "-c", f"import {PACKAGE}.{name}"], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in names}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"import {name}: {stderr[-2000:]}"
