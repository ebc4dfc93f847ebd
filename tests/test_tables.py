"""The stored tables, recipes and tolerance policy agree with each other and with what they cite."""
from __future__ import annotations

import pytest
import yaml

from methods import REGISTRY
from repro.runner import RECIPES, load_recipe
from repro.tables import available_methods, load_profile
from repro.tolerance import accuracy_band, band

PROFILES = ("paper", "smoke")


@pytest.mark.parametrize("method", sorted(REGISTRY))
@pytest.mark.parametrize("profile", PROFILES)
def test_recipe_rows_and_table_rows_are_the_same(method, profile):
    recipe = load_recipe(method, profile)
    table = load_profile(method, profile, recipe.table)
    assert list(recipe.rows) == list(table.rows)
    assert "dense" in recipe.rows and recipe.rows["dense"] == {}


@pytest.mark.parametrize("method", available_methods())
def test_every_paper_cell_has_a_source_and_a_number(method):
    table = load_profile(method, "paper")
    for row, cells in table.rows.items():
        for key, cell in cells.items():
            assert "paper" in cell.values, (row, key)
            assert (cell.source or "paper") in table.sources, (row, key)


def test_paper_tables_transcribe_the_collection_readme():
    # Spot checks against ../shared/specs/collection-readme.md (one cell per table and row kind).
    assert load_profile("wanda", "paper").rows["2of4"]["arc_easy"].values == {"paper": 61.78, "collection": 62.6}
    assert load_profile("sparsegpt", "paper").rows["4of8"]["rte"].values == {"paper": 55.2, "collection": 56.7}
    assert load_profile("magnitude", "paper").rows["2of4"]["hellaswag"].values == {"paper": 42.3,
                                                                                  "collection": 45.4}
    assert load_profile("wanda", "paper").rows["unstructured-0.5"]["wikitext2"].values == {"paper": 6.42}


def test_wanda_family_reports_acc_everywhere_zero_shot():
    for method in ("magnitude", "wanda", "sparsegpt"):
        metrics = load_profile(method, "paper").metrics
        accuracy = [m for m in metrics.values() if m.kind == "accuracy"]
        assert len(accuracy) == 7
        assert all(m.spec["metric"] == "acc" and m.spec["shots"] == 0 for m in accuracy)


def test_accuracy_band_is_two_binomial_standard_errors():
    assert accuracy_band(75.0, 3270) == pytest.approx(200 * (0.75 * 0.25 / 3270) ** 0.5)
    assert accuracy_band(75.0, 3270) == pytest.approx(1.514, abs=1e-3)
    assert accuracy_band(53.4, 277) == pytest.approx(5.99, abs=0.01)
    assert accuracy_band(100.0, 50) == pytest.approx(200 / 50)  # never degenerate


def test_overrides_need_reasons_and_apply():
    assert band("perplexity", 10.0, ppl_rel=0.03) == pytest.approx(0.3)
    assert band("perplexity", 10.0, ppl_rel=0.03, override={"rel": 0.1, "reason": "x"}) == pytest.approx(1.0)
    table = load_profile("sparsegpt", "smoke")
    assert table.override("2of4", "ppl")["reason"]
    assert table.override("dense", "ppl") is None


def test_a_table_override_without_reason_is_refused(tmp_path):
    from methods.errors import UsageError

    raw = yaml.safe_load((RECIPES.parent / "tables" / "wanda.yaml").read_text())
    raw["profiles"]["smoke"]["overrides"] = [{"row": "*", "metric": "ppl", "rel": 0.5}]
    path = tmp_path / "wanda.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError, match="needs a reason"):
        load_profile("wanda", "smoke", path)
