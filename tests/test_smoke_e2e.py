"""The smoke profile end to end on the real smoke model (SmolLM2-135M-Instruct, CPU).

The fast tier runs every method on one row (2:4, plus the shared dense gate) and Wanda 2:4 with
sparse retraining, and diffs them against the stored smoke references; the slow tier (`make
test-all`) runs every row and the papers' claims.
"""
from __future__ import annotations

import pytest

from repro.cli import main
from tests.conftest import REPO

METHODS = ("magnitude", "wanda", "sparsegpt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from methods.core.smoke_model import smoke_model_dir

    smoke_model_dir()  # converts on first use; raises if `make setup` did not install the package
    return tmp_path_factory.mktemp("smoke-results")


@pytest.mark.parametrize("method", METHODS)
def test_one_row_per_method_matches_its_smoke_reference(results, method, capsys):
    code = main(["repro", method, "--profile", "smoke", "--rows", "dense,2of4", "--results-dir", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (results / "smoke" / method / "2of4.json").is_file()


def test_sparse_retraining_row_matches_its_reference(results, capsys):
    """The training stage in the fast tier: Wanda 2:4, then sparse retraining (a few minutes on 2 cores),
    then evaluation; the 2:4 pattern is intact (nm_2of4 = 1.0 exactly) and the reference holds."""
    from methods.core.results import read_json

    code = main(["repro", "wanda", "--profile", "smoke", "--rows", "dense,2of4-sparse", "--results-dir", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    record = read_json(results / "smoke" / "wanda" / "2of4-sparse.json")
    assert record["metrics"]["nm_2of4"] == 1.0
    assert record["training"]["options"]["kind"] == "sparse" and record["training"]["sparsity"]["checked_every_step"]
    assert [r["step"] for r in record["training"]["log"]] == list(range(1, record["training"]["options"]["steps"] + 1))


def test_a_few_shearing_steps_match_their_smoke_reference(results, capsys):
    """Sheared LLaMA's recomputed row: 6 steps of the smoke shearing run (gates, Lagrangian, dynamic
    loading, fold and removal), then evaluation. The random-units control exercises none of that, and
    the 60-step run is chaotic (README, "Results across machines"); its first steps are not."""
    from methods.core.results import read_json

    code = main(["repro", "sheared", "--profile", "smoke", "--rows", "dense,shear-short", "--results-dir", str(results)])
    assert code == 0, capsys.readouterr().out
    record = read_json(results / "smoke" / "sheared" / "shear-short.json")
    assert record["prune"]["pruning_run"]["steps"] == 6 and record["metrics"]["hidden_size"] == 384


# Deliberately broken variants: each must FAIL its row, or the band could not catch a real regression.
def _wanda_without_activation_norm(monkeypatch):
    from methods import sparsity

    monkeypatch.setattr(sparsity, "wanda_scores", lambda weight, input_sq_norm: weight.abs())


def _sparsegpt_without_weight_update(monkeypatch):
    from methods import sparsegpt

    chosen = sparsegpt.sparsegpt_prune

    def mask_only(weight, hessian, pattern, **kwargs):
        # SparseGPT's own mask, but the kept weights stay the dense ones: no OBS update.
        updated = chosen(weight, hessian, pattern, **kwargs)
        return weight.detach().to(updated.dtype) * (updated != 0)

    monkeypatch.setattr(sparsegpt, "sparsegpt_prune", mask_only)


@pytest.mark.slow
@pytest.mark.parametrize("method, break_it", [("wanda", _wanda_without_activation_norm),
                                              ("sparsegpt", _sparsegpt_without_weight_update)])
def test_a_broken_variant_fails_its_smoke_row(tmp_path, method, break_it, monkeypatch, capsys):
    break_it(monkeypatch)
    code = main(["repro", method, "--profile", "smoke", "--rows", "2of4", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1, out
    ppl = next(line for line in out.splitlines() if line.startswith("| 2of4") and "| ppl" in line)
    assert "FAIL" in ppl, out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_row_and_claim(results, method, capsys):
    code = main(["repro", method, "--profile", "smoke", "--results-dir", str(results)])
    assert code == 0, capsys.readouterr().out


@pytest.mark.slow
def test_claims_across_methods(results, capsys):
    """After all three methods ran: no claim may be left PENDING or FAIL (XFAIL is documented)."""
    for method in METHODS:
        assert main(["repro", method, "--profile", "smoke", "--results-dir", str(results)]) == 0
    capsys.readouterr()
    assert main(["diff", "--all", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "PENDING" not in out


def test_committed_results_are_consistent_with_their_tables(capsys):
    """A consistency check, not a regression check: the committed results (results/reference) re-diffed
    against the tables, whose smoke cells were copied from those same results. It recomputes nothing;
    it catches a table and its stored results that disagree (an edited cell, a result replaced without
    its table). The regression checks are the recomputed rows above and in each method's tests."""
    assert main(["diff", "--all", "--no-plots", "--results-dir", str(REPO / "results" / "reference")]) == 0, \
        capsys.readouterr().out
