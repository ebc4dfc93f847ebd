"""The packages' layering: the methods stand on torch and transformers alone, never on the kit above them."""
from __future__ import annotations

import ast

from tests.conftest import REPO

ABOVE_METHODS = ("repro", "training")


def imported_modules(source: str):
    """(line, module) of every import statement, at any depth (deferred imports inside functions too)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_the_walk_sees_every_kind_of_import():
    source = "import repro.data\nfrom training import recover\ndef f():\n    from repro.evaluate import x\n"
    assert list(imported_modules(source)) == [(1, "repro.data"), (2, "training"), (4, "repro.evaluate")]


def test_methods_import_neither_repro_nor_training():
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for path in sorted((REPO / "methods").glob("*.py"))
                 for line, module in imported_modules(path.read_text())
                 if module.split(".")[0] in ABOVE_METHODS]
    assert not offenders, offenders
