"""Issue 21, slow tier: every method's paper profiles rehearsed end to end, as `make rehearse-all` does
them: the stand-in mirror written once (by the MaxText venv, which has array_record for MaxText's DCLM
files), every row through prune -> train -> evaluate on the CPU, every paper cell REHEARSED, and at the
end the whole collection's diff with nothing left waiting for another method (`--complete`)."""
from __future__ import annotations

import json
import subprocess

import pytest

from methods.core import hub
from repro import diff
from repro.cli import main
from repro.mirror import paper_profiles
from repro.runner import load_table
from tests.conftest import REPO
from training.stage import MAXTEXT_PYTHON_ENV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MAXTEXT_PYTHON = REPO / ".venv-maxtext" / "bin" / "python"
PAIRS = paper_profiles()


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    if not MAXTEXT_PYTHON.is_file():
        pytest.skip("the rehearsal's mirror is written by the MaxText venv: make setup first")
    root = tmp_path_factory.mktemp("rehearsal")
    subprocess.run([str(MAXTEXT_PYTHON), "-m", "repro.cli", "mirror", "rehearsal", "--out", str(root / "mirror")],
                   cwd=REPO, check=True)
    return root


@pytest.fixture
def rehearsal_env(standin, monkeypatch):
    monkeypatch.setenv(hub.MIRROR_ENV, str(standin / "mirror"))
    monkeypatch.setenv(MAXTEXT_PYTHON_ENV, str(MAXTEXT_PYTHON))
    return standin / "results"


@pytest.mark.parametrize("method,profile", PAIRS, ids=[f"{m}-{p}" for m, p in PAIRS])
def test_a_paper_profile_rehearses_with_every_cell_rehearsed(rehearsal_env, standin, method, profile, capsys):
    from repro.recipe import load_recipe

    results = rehearsal_env
    assert main(["repro", method, "--profile", profile, "--rehearse", "--results-dir", str(results)]) == 0
    recipe = load_recipe(method, profile, rehearsal=True)
    comparison = diff.diff_profile(method, load_table(recipe), results)
    statuses = comparison.statuses
    # PENDING: a claim on another method's row, checked by the last test; NOREF: a paper series no row maps to.
    assert statuses and set(statuses) <= {diff.REHEARSED, "PENDING", "NOREF"}
    assert all(cell.status == diff.REHEARSED for cell in comparison.cells)
    for row in recipe.rows:
        stored = json.loads((results / profile / method / f"{row}.json").read_text())
        assert stored["rehearsal"]["mirror"] == str(standin / "mirror")
    assert "REHEARSED" in capsys.readouterr().out


def test_with_every_method_rehearsed_no_cell_waits(rehearsal_env, capsys):
    """Runs whatever the parametrized test did not (a rerun of a finished row does no work), then the
    collection's diff as `make rehearse-all` ends it."""
    for method, profile in PAIRS:
        assert main(["repro", method, "--profile", profile, "--rehearse", "--results-dir", str(rehearsal_env)]) == 0
    capsys.readouterr()
    assert main(["diff", "--all", "--complete", "--no-plots", "--results-dir", str(rehearsal_env)]) == 0
    out = capsys.readouterr().out
    assert "PENDING" not in out and "MISSING" not in out and "REHEARSED" in out
