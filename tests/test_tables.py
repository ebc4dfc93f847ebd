"""The stored tables, recipes and tolerance policy agree with each other and with what they cite."""
from __future__ import annotations

import copy

import pytest
import yaml

from methods import REGISTRY
from methods.core.errors import UsageError
from repro.recipe import RECIPES, load_recipe
from repro.tables import TABLES, available_methods, load_profile
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
    """A cell holds the paper's number and names its source, or holds nothing at all: measured, with
    nothing published to compare with (NOREF), never a number without a source."""
    table = load_profile(method, "paper")
    for row, cells in table.rows.items():
        for key, cell in cells.items():
            if not cell.values:
                assert cell.source is None and cell.known_deviation is None, (row, key)
                continue
            assert "paper" in cell.values, (row, key)
            assert (cell.source or "paper") in table.sources, (row, key)


def test_paper_tables_transcribe_the_collection_readme():
    # Spot checks against the collection README's paper-vs-ours tables (one cell per table and row kind).
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
    assert table.override("2of4", "ppl").reason
    assert table.override("2of4", "ppl").band == {"rel": 0.05}
    assert table.override("dense", "ppl") is None


def test_a_table_override_without_reason_is_refused(tmp_path):
    raw = yaml.safe_load((RECIPES.parent / "tables" / "wanda.yaml").read_text())
    raw["profiles"]["smoke"]["overrides"] = [{"row": "*", "metric": "ppl", "rel": 0.5}]
    path = tmp_path / "wanda.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError, match="needs a reason"):
        load_profile("wanda", "smoke", path)


def _edit(path, changes):
    def apply(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        if changes is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = changes
    return apply


BAD_TABLES = [  # (what to change in wanda.yaml's paper profile, the one line it gives)
    (_edit(("metrics", "boolq", "n"), KeyError), "wanda.yaml:paper: metrics.boolq: accuracy metric lacks n"),
    (_edit(("metrics", "boolq", "kind"), "acc"),
     "wanda.yaml:paper: metrics.boolq.kind: input should be 'accuracy', 'perplexity' or 'structure', got 'acc'"),
    (_edit(("metrics", "boolq", "seqlen"), 64), "wanda.yaml:paper: metrics.boolq: accuracy metric does not take seqlen"),
    (_edit(("metrics", "wikitext2", "bos"), "first"),
     "wanda.yaml:paper: metrics.wikitext2.bos: input should be 'every_window', got 'first'"),
    (_edit(("metrics", "wikitext2"), {"kind": "structure", "field": "width"}),
     "wanda.yaml:paper: metrics.wikitext2.field: input should be 'parameters', "),
    (_edit(("rows", "2of4", "nope"), {"paper": 1.0}),
     "wanda.yaml:paper: rows.2of4.nope: a value for undeclared metric 'nope'"),
    (_edit(("rows", "2of4", "boolq", "paper"), "n/a"), "wanda.yaml:paper: rows.2of4.boolq.paper: input should be a"),
    (_edit(("claims",), [{"id": "c", "text": "t", "lhs": {"row": "dense"}, "op": "<",
                          "rhs": {"row": "2of4", "metric": "boolq"}}]), "wanda.yaml:paper: claims.0.lhs: lacks metric"),
    (_edit(("claims",), [{"id": "c", "text": "t", "lhs": {"row": "dense", "metric": "boolq"}, "op": "<<",
                          "rhs": {"row": "2of4", "metric": "boolq"}}]), "wanda.yaml:paper: claims.0.op: input should be"),
    (_edit(("modle",), "x"), "wanda.yaml:paper: unknown key modle (expected model, reference, "),
    (_edit(("model",), KeyError), "wanda.yaml:paper: lacks model"),
]


@pytest.mark.parametrize("change,message", BAD_TABLES, ids=[m.split(": ", 1)[1] for _, m in BAD_TABLES])
def test_a_schema_error_is_one_line_naming_file_profile_and_key(tmp_path, change, message):
    raw = yaml.safe_load((TABLES / "wanda.yaml").read_text())
    change(raw["profiles"]["paper"])
    (tmp_path / "wanda.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError) as info:
        load_profile("wanda", "paper", tmp_path / "wanda.yaml")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_metric_specs_keep_the_keys_as_written():
    """The runner fingerprints `kind` plus the spec: a parsed metric may not add defaults or change types."""
    raw = yaml.safe_load((TABLES / "wanda.yaml").read_text())["profiles"]["smoke"]["metrics"]
    for key, metric in load_profile("wanda", "smoke").metrics.items():
        assert {"kind": metric.kind, **metric.spec} == raw[key]
        assert [type(v) for v in metric.spec.values()] == [type(raw[key][k]) for k in metric.spec]


BAD_RECIPES = [  # (what to change in wanda.yaml's smoke recipe, the one line it gives)
    (_edit(("calibraton",), {"spec": "smoke"}), "wanda.yaml:smoke: unknown key calibraton (expected model, "),
    (_edit(("calibration", "nsamples"), KeyError), "wanda.yaml:smoke: calibration: lacks nsamples"),
    (_edit(("calibration", "seqlen"), "long"), "wanda.yaml:smoke: calibration.seqlen: input should be a valid integer"),
    (_edit(("rows",), KeyError), "wanda.yaml:smoke: lacks rows"),
    (_edit(("rows", "2of4"), ["2:4"]), "wanda.yaml:smoke: rows.2of4: input should be a valid dictionary"),
]


@pytest.mark.parametrize("change,message", BAD_RECIPES, ids=[m.split(": ", 1)[1] for _, m in BAD_RECIPES])
def test_a_recipe_schema_error_is_one_line(tmp_path, change, message):
    raw = yaml.safe_load((RECIPES / "wanda.yaml").read_text())
    change(raw["profiles"]["smoke"])
    (tmp_path / "wanda.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError) as info:
        load_recipe("wanda", "smoke", tmp_path / "wanda.yaml")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_recipe_config_is_the_profile_as_written():
    """Every row's fingerprint hashes the config: parsing must neither add defaults nor drop keys."""
    raw = copy.deepcopy(yaml.safe_load((RECIPES / "llm-pruner.yaml").read_text())["profiles"]["smoke"])
    recipe = load_recipe("llm-pruner", "smoke")
    rows = raw.pop("rows")
    assert recipe.config == raw and recipe.rows == rows
    assert recipe.table == (TABLES / "llm-pruner.yaml").resolve()


def test_unreadable_yaml_is_one_line(tmp_path):
    (tmp_path / "wanda.yaml").write_text("profiles: {paper: [unclosed\n")
    for load in (load_profile, load_recipe):
        with pytest.raises(UsageError, match=r"^cannot read (table|recipe) .*wanda.yaml: ") as info:
            load("wanda", "paper", tmp_path / "wanda.yaml")
        assert "\n" not in str(info.value)
