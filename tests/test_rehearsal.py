"""Issue 21, slow tier: a method's paper profile rehearsed end to end (`make rehearse-<method>`): the
stand-in mirror written, every row through prune -> train -> evaluate on the CPU, every paper cell
REHEARSED. The rehearsals themselves take minutes each; these run the cheapest ones, one per kind of
pipeline (a sparse method; a depth method scored by lm-eval), in a mirror shared by the module."""
from __future__ import annotations

import json

import pytest

from methods.core import hub
from repro import diff
from repro.cli import main
from repro.runner import load_table

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    assert main(["mirror", "rehearsal", "--out", str(root / "mirror")]) == 0
    return root


@pytest.mark.parametrize("method,profile", [("shortgpt", "paper"), ("magnitude", "paper")])
def test_a_paper_profile_rehearses_with_every_cell_rehearsed(standin, method, profile, monkeypatch, capsys):
    from repro.recipe import load_recipe

    monkeypatch.setenv(hub.MIRROR_ENV, str(standin / "mirror"))
    results = standin / "results"
    assert main(["repro", method, "--profile", profile, "--rehearse", "--results-dir", str(results)]) == 0
    recipe = load_recipe(method, profile, rehearsal=True)
    table = load_table(recipe)
    comparison = diff.diff_profile(method, table, results)
    statuses = {(c.row, c.metric): c.status for c in comparison.cells}
    assert statuses and set(statuses.values()) == {diff.REHEARSED}
    for row in recipe.rows:
        stored = json.loads((results / profile / method / f"{row}.json").read_text())
        assert stored["rehearsal"]["mirror"] == str(standin / "mirror")
    assert "REHEARSED" in capsys.readouterr().out
