"""The packages' layering (shared/ARCHITECTURE.md, "Layers"): an arrow only points down.

    repro     may import training, methods, jobman
    training  may import methods, never repro
    methods   imports neither (its common core, methods/core, is what every layer stands on)

and there is no import cycle inside the kit's packages: every module's imports (module-level or
deferred inside a function; type-only imports under TYPE_CHECKING do not count) form a graph without
a cycle. Training kinds are compared by name only inside their registry (training/kinds/).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

from tests.conftest import REPO

PACKAGES = ("methods", "training", "repro", "jobman")
FORBIDDEN = {"methods": ("repro", "training"), "training": ("repro",)}


def imported_modules(source: str) -> Iterator[Tuple[int, str]]:
    """(line, module) of every import statement, at any depth (deferred imports inside functions too),
    except the type-only ones under `if TYPE_CHECKING:`."""
    tree = ast.parse(source)
    type_only = {id(n) for block in ast.walk(tree)
                 if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
                 for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def kit_modules() -> Dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "assets" in path.parts:
                continue
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """module -> the kit modules it imports (`from a import b` is module a.b when that exists, else a)."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        for _line, target in imported_modules(path.read_text()):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_walk_sees_every_kind_of_import_but_type_only_ones():
    source = ("import repro.data\nfrom training import recover\nif TYPE_CHECKING:\n    from repro import x\n"
              "def f():\n    from repro.evaluate import x\n")
    assert list(imported_modules(source)) == [(1, "repro.data"), (2, "training.recover"), (6, "repro.evaluate.x")]


def test_the_cycle_finder_finds_a_cycle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_an_arrow_only_points_down():
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for name, path in kit_modules().items() if name.split(".")[0] in FORBIDDEN
                 for line, module in imported_modules(path.read_text())
                 if module.split(".")[0] in FORBIDDEN[name.split(".")[0]]]
    assert not offenders, offenders


def test_no_import_cycle_inside_the_kits_packages():
    assert cycles(import_graph(kit_modules())) == []


def test_training_kinds_are_compared_by_name_only_in_their_registry():
    from training.kinds import KINDS

    names = "|".join(KINDS)
    # `kind`, `options.kind`, `spec["kind"]` or `spec.get("kind")`, then the comparison
    comparison = re.compile(rf"kind\w*(?:[\"']\]|[\"']\))?\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[]?\s*[\"']({names})[\"']"
                            rf"|[\"']({names})[\"']\s*(==|!=)\s*\w*kind")
    assert comparison.search('if options.kind == "lora":') and comparison.search('kind in ("cpt", "kd")')
    assert comparison.search('if spec.get("kind") != "lora":') and comparison.search('spec["kind"] == "kd"')
    offenders = [f"{path.relative_to(REPO)}:{number}" for name, path in kit_modules().items()
                 if not name.startswith("training.kinds")
                 for number, line in enumerate(path.read_text().splitlines(), 1) if comparison.search(line)]
    assert not offenders, offenders


REFUSALS = [["--help"], ["prune", "--help"], ["train", "--help"], ["repro", "--help"], ["diff", "--help"],
            ["prune", "--model", "smoke", "--method", "nope", "--out", "o"],
            ["prune", "--model", "smoke", "--method", "flap", "--pruning-ratio", "1.5", "--calib", "smoke", "--out", "o"],
            ["train", "--model", "m", "--kind", "nope", "--data", "d", "--steps", "1", "--global-batch", "1",
             "--micro-batch", "1", "--seqlen", "8", "--lr", "1", "--out", "o"],
            ["repro", "wanda", "--rows", "nope"], ["diff", "nope"]]


def test_help_and_refusals_import_neither_torch_nor_transformers():
    """Help and the refusal of bad input stay fast (`make bench` times them): they must not pay for
    torch and transformers, which only the work itself needs."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nfrom repro.cli import main\nfor argv in json.loads(sys.argv[1]):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'datasets') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(REFUSALS)], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], proc.stdout[-2000:] + proc.stderr[-2000:]
