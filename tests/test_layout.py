"""The product stays in pieces a reader can hold: no file over 500 lines, no function or method over
60, and the Learner class at most 150.

It catches a file, function or class growing back past its limit one small change at a time, which
no review of a single diff notices (train.py had reached 1035 lines, the Learner 262). Product code
is the top-level modules, the algorithms package and examples/; tests/ and bench/ are left aside.
Sizes are read from the syntax tree: a function's lines run from its `def` to its last line,
docstring and nested functions included."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

from tests.conftest import REPO
from tests.test_layers import project_modules

MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_LEARNER_LINES = 150


class Span(NamedTuple):
    name: str           # qualified: Class.method, function.nested
    is_class: bool
    line: int
    lines: int


def product_files() -> list[Path]:
    return sorted([*project_modules().values(), *(REPO / "examples").glob("*.py")])


def spans(tree: ast.AST, prefix: str = "") -> list[Span]:
    """Every function, method and class in `tree`, nested ones included."""
    found = []
    for node in ast.iter_child_nodes(tree):
        inner = prefix
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append(Span(f"{prefix}{node.name}", isinstance(node, ast.ClassDef), node.lineno,
                              node.end_lineno - node.lineno + 1))
            inner = f"{prefix}{node.name}."
        found += spans(node, inner)
    return found


def long_functions(source: str, limit: int) -> list[Span]:
    """The functions and methods of `source` longer than `limit` lines."""
    return [span for span in spans(ast.parse(source)) if not span.is_class and span.lines > limit]


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_function_finder_names_nested_and_long_functions():
    source = "class A:\n    def f(self):\n        def g():\n            pass\n        return g\n\ndef h():\n    pass\n"
    assert spans(ast.parse(source)) == [Span("A", True, 1, 5), Span("A.f", False, 2, 4),
                                        Span("A.f.g", False, 3, 2), Span("h", False, 7, 2)]
    assert long_functions(source, 2) == [Span("A.f", False, 2, 4)]


def test_no_product_file_is_over_500_lines():
    offenders = [f"{relative(path)}: {lines} lines" for path in product_files()
                 if (lines := len(path.read_text().splitlines())) > MAX_FILE_LINES]
    assert not offenders, (f"over {MAX_FILE_LINES} lines (move a coherent concern into a module of its own):\n  "
                           + "\n  ".join(offenders))


def test_no_product_function_is_over_60_lines():
    offenders = [f"{relative(path)}:{span.line} {span.name}: {span.lines} lines" for path in product_files()
                 for span in long_functions(path.read_text(), MAX_FUNCTION_LINES)]
    assert not offenders, (f"functions over {MAX_FUNCTION_LINES} lines (extract well-named helpers):\n  "
                           + "\n  ".join(offenders))


def test_the_learner_class_is_at_most_150_lines():
    path = REPO / "train.py"
    [learner] = [span for span in spans(ast.parse(path.read_text())) if span.name == "Learner"]
    where = f"{relative(path)}:{learner.line} class Learner"
    assert learner.lines <= MAX_LEARNER_LINES, (f"{where}: {learner.lines} lines, over {MAX_LEARNER_LINES} (move "
                                                "what is not the training loop out of it)")
