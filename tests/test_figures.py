"""Figures as data (repro/tables.py schema, repro/figures.py curves, repro/diff.py statuses and claims):
schema, pointwise bands, claims, plots, and `lpc diff` on them."""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from methods.core.errors import UsageError
from repro import diff, figures
from repro.cli import main
from repro.tables import TABLES, load_profile, parse_profile
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEPTH_METHODS = ("shortgpt", "minitron-depth")
COMMITTED = REPO / "results" / "reference"


def profile_with(figure: dict, rows=("dense", "bi")) -> dict:
    return {"model": "m", "reference": "collection", "sources": {"paper": "p", "collection": "c"},
            "rows": {r: {} for r in rows}, "figures": {"fig": figure}}


def good_figure() -> dict:
    return {"title": "t", "x_label": "x", "series": {"bi": {
        "band": 0.01, "ours": {"row": "bi", "field": "prune.scores.block_influence"},
        "collection": [[0, 0.4], {"x": [1, 3], "y": [0.1, 0.2]}], "paper": [[0, 0.45]]}}}


def parse(figure: dict, **profile_changes) -> dict:
    raw = profile_with(figure)
    raw.update(profile_changes)
    return parse_profile(raw, "t.yaml:p").figures


# ----------------------------------------------------------------------------- schema

def test_a_good_figure_parses_into_readings():
    series = parse(good_figure())["fig"].series["bi"]
    point, box = series.columns["collection"]
    assert (point.x0, point.x1, point.lo, point.hi, point.band) == (0, 0, 0.4, 0.4, 0.01)
    assert (box.x0, box.x1, box.lo, box.hi) == (1, 3, 0.1, 0.2)
    assert series.ours.row == "bi" and series.ours.x_offset == 0


def _break(path, value):
    def apply(figure):
        node = figure
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return figure
    return apply


BAD_FIGURES = [
    (_break(("series",), {}), "series: dictionary should have at least 1 item"),
    (_break(("referense",), "paper"), "unknown key referense"),
    (_break(("series", "bi", "collection"), [[0]]), r"a point is \[x, y\]"),
    (_break(("series", "bi", "collection"), [{"x": [3, 1], "y": 1}]), "runs backwards"),
    (_break(("series", "bi", "collection"), [{"x": 1}]), "a reading is"),
    (_break(("series", "bi", "band"), -1), "band must be"),
    (_break(("series", "bi", "band"), {"pct": 1}), "band must be"),
    (_break(("series", "bi", "ours"), {"row": "nope", "field": "prune.x"}), "lacks"),
    (_break(("series", "bi", "ours"), {"row": "bi"}), "ours: lacks field"),
    (_break(("series", "bi", "ours", "transform"), "log10"), "transform: input should be 'ln', got 'log10'"),
    (_break(("series", "bi", "ours", "x_offset"), "1"), "x_offset: must be a number, got '1'"),
    (_break(("series", "bi", "axis"), "right"), "not declared"),
    (_break(("reference",), "reference"), "gating column 'reference' has no readings"),
    (_break(("sources",), {"paper": "nowhere"}), "names source 'nowhere'"),
    (_break(("claims",), [{"id": "c", "text": "t", "of": {"row": "bi", "field": "f"}, "op": "median",
                           "expect": [1]}]), "op: input should be 'argmax'"),
    (_break(("claims",), [{"id": "c", "text": "t", "of": {"row": "bi", "field": "f"}, "op": "set",
                           "expect": []}]), "expect must be"),
    (_break(("claims",), [{"id": "c", "text": "t", "of": {"row": "bi", "field": "f"}, "op": "set",
                           "expect": [1], "expected_failure": {"measured": 1}}]), "needs a reason"),
]


@pytest.mark.parametrize("breaker,message", BAD_FIGURES)
def test_bad_figure_data_is_one_usage_error_line(breaker, message):
    with pytest.raises(UsageError, match=message) as info:
        parse(breaker(good_figure()))
    assert "\n" not in str(info.value) and str(info.value).startswith("t.yaml:p: figures.fig")


def test_lpc_diff_reports_a_broken_figure_as_one_line(tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load((TABLES / "shortgpt.yaml").read_text())
    raw["profiles"]["smoke"]["figures"] = {"fig": {"series": {"bi": {"collection": [[0, "high"]]}}}}
    (tmp_path / "shortgpt.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setattr("repro.tables.TABLES", tmp_path)
    (tmp_path / "results" / "smoke" / "shortgpt").mkdir(parents=True)
    assert main(["diff", "shortgpt", "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lpc: error: shortgpt.yaml:smoke: figures.fig.series.bi.collection.0") and "\n" not in err


@pytest.mark.parametrize("method", DEPTH_METHODS)
def test_every_stored_figure_parses(method):
    data = yaml.safe_load((TABLES / f"{method}.yaml").read_text())
    assert any(load_profile(method, profile).figures for profile in data["profiles"])


# ----------------------------------------------------------------------------- bands

def reading(x=None, y=1.0, band=0.1):
    x0, x1 = (x, x) if not isinstance(x, list) else x
    lo, hi = (y, y) if not isinstance(y, list) else (
        -math.inf if y[0] is None else y[0], math.inf if y[1] is None else y[1])
    return figures.Reading(x0, x1, lo, hi, band)


def test_a_point_passes_inside_its_band_and_fails_outside():
    inside = figures.compare([reading(2, 1.0, 0.1)], {1: 5.0, 2: 1.09, 3: 9.0})
    assert inside[0] == 1 and figures.passes(inside[1][0]) and not inside[2]
    outside = figures.compare([reading(2, 1.0, 0.1)], {2: 1.2})
    ratio, x, y, _, delta = outside[1]
    assert ratio == pytest.approx(2.0) and x == 2 and y == 1.2 and delta == pytest.approx(0.2)
    assert not figures.passes(ratio)


def test_a_range_band_checks_every_x_it_covers():
    box = reading([1, 3], [0.1, 0.2], 0.01)
    assert figures.compare([box], {0: 9.0, 1: 0.2, 2: 0.1, 3: 0.15, 4: 9.0})[1][0] == 0
    compared, worst, _ = figures.compare([box], {1: 0.2, 2: 0.22, 3: 0.15})
    assert compared == 3 and worst[1] == 2 and worst[0] == pytest.approx(2.0)
    assert figures.passes(figures.compare([box], {1: 0.205, 3: 0.095})[1][0])  # the band widens both edges


def test_an_open_range_takes_off_chart_and_non_finite_values():
    off_chart = reading([0, 1], [20, None], 0.3)
    assert figures.passes(figures.compare([off_chart], {0: 1e6, 1: None})[1][0])
    assert figures.passes(figures.compare([off_chart], {0: 19.8})[1][0])   # within the band below 20
    assert not figures.passes(figures.compare([off_chart], {0: 19.0})[1][0])
    assert figures.compare([reading(0, 1.0)], {0: None})[1][0] == math.inf


def test_missing_x_and_levels():
    assert figures.compare([reading(5, 1.0)], {0: 1.0})[2] == ["ours has no value at x=5"]
    level = reading(None, [1.8, 1.85], 0.2)
    assert figures.passes(figures.compare([level], 1.9)[1][0])
    assert not figures.passes(figures.compare([level], 2.1)[1][0])


def test_a_relative_band_scales_with_the_reading():
    series = parse(_break(("series", "bi", "band"), {"rel": 0.1})(good_figure()))["fig"].series["bi"]
    assert [r.band for r in series.columns["collection"]] == pytest.approx([0.04, 0.02])


# ----------------------------------------------------------------------------- claims

def test_claims_on_curves_and_sets():
    source = figures.Source(row="r", field="f", x_offset=16)
    assert diff.check_claim("argmax", source, [0.4, 0.6, 0.5], [17]) == (True, "x=17 (y=0.6)")
    assert not diff.check_claim("argmin", source, [0.4, 0.6, 0.5], [17])[0]
    bi = figures.Source(row="r", field="f")
    assert diff.check_claim("top", bi, [0.9, 0.1, 0.2, 0.8], [0, -1])[0]
    assert not diff.check_claim("top", bi, [0.9, 0.1, 0.85, 0.8], [0, -1])[0]
    assert diff.check_claim("bottom", bi, [0.9, 0.1, 0.2, 0.8], [2, 1])[0]
    assert diff.check_claim("set", None, [23, 21, 22], [21, 22, 23])[0]
    assert not diff.check_claim("set", None, [21, 22], [21, 22, 23])[0]
    assert diff.check_claim("argmax", bi, [None, 0.3, None], [1])[0]   # non-finite scores sit out


def test_one_status_logic_for_table_and_figure_claims():
    failure = {"reason": "measured otherwise"}
    expected = parse_profile({"model": "m", "claims": [{"id": "c", "text": "t", "lhs": {"row": "a", "metric": "m"},
                              "op": "<", "rhs": {"row": "b", "metric": "m"}, "expected_failure": failure}]},
                             "t.yaml:p").claims[0].expected_failure
    assert diff.claim_status(True, None) == ("PASS", "")
    assert diff.claim_status(False, None) == ("FAIL", "claim does not hold")
    assert diff.claim_status(False, expected) == ("XFAIL", "measured otherwise")
    assert diff.claim_status(True, expected)[0] == "XPASS"
    assert diff.failed(["PASS", "XFAIL", "XPASS", "PENDING", "NOREF", "OFF", "KNOWN"]) is False
    assert diff.failed(["PASS", "MISSING"]) and diff.failed(["FAIL"])


# ----------------------------------------------------------------------------- the paper figures

def curve_from(readings, xs, transform=None):
    """A curve of ours that sits exactly on the readings (mid-range; twice an open bound)."""
    values = []
    for x in xs:
        r = next(r for r in readings if r.x0 is not None and r.covers(x))
        y = r.lo * 2 if math.isinf(r.hi) else (r.lo + r.hi) / 2
        values.append(math.exp(y) if transform == "ln" else y)
    return values


def write_result(root: Path, profile: str, method: str, row: str, **fields):
    path = root / profile / method / f"{row}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"row": row, "metrics": fields.pop("metrics", {}), "prune": fields}))


def test_the_collection_fig3_passes_against_itself_and_a_moved_point_fails(tmp_path, capsys):
    table = load_profile("shortgpt", "paper")
    fig = table.figures["fig3"]
    bi = curve_from(fig.series["bi"].columns["collection"], range(32))
    ppl = curve_from(fig.series["ppl"].columns["collection"], range(32))
    write_result(tmp_path, "paper", "shortgpt", "bi", scores={"block_influence": bi},
                 layers_removed=list(range(21, 30)))
    write_result(tmp_path, "paper-llama2", "minitron-depth", "pg19-n1", scores={"candidates": ppl})
    report = diff.diff_profile("shortgpt", table, tmp_path)
    gating = {d.series: d.status for d in report.series if d.gating}
    assert gating == {"bi": "PASS", "ppl": "PASS"}
    assert [c.status for c in report.figure_claims] == ["PASS", "PASS"]
    # The paper's own readings are shown but do not gate (its L31 ppl is 16, the collection's 12.8).
    assert {d.status for d in report.series if not d.gating} == {"OFF"}

    bi[27] += 0.02  # one layer off by four reading precisions
    write_result(tmp_path, "paper", "shortgpt", "bi", scores={"block_influence": bi},
                 layers_removed=list(range(21, 30)))
    report = diff.diff_profile("shortgpt", table, tmp_path)
    bad = next(d for d in report.series if d.gating and d.series == "bi")
    assert bad.status == "FAIL" and bad.worst_x == 27 and bad.reading == "[0.036, 0.04]"
    assert report.failed


def test_the_collection_minitron_readings_satisfy_the_claims_they_support():
    figs = load_profile("minitron-depth", "paper").figures
    for figure_key, claim_id, series_key in (("winogrande", "best-16-block-ends-at-31", "drop16"),
                                            ("wikitext", "drop16-best-block-ends-at-24", "n16"),
                                            ("wikitext", "drop1-first-layer-costs-most", "n1")):
        figure = figs[figure_key]
        claim = next(c for c in figure.claims if c.id == claim_id)
        points = [r for r in figure.series[series_key].columns["collection"] if r.is_point]
        xs = [r.x0 for r in points]
        values = [r.lo for r in points]
        # Claims read x as index + offset: lay the sparse readings out on their own x grid.
        grid = [None] * int(max(xs) - min(xs) + 1)
        for x, y in zip(xs, values):
            grid[int(x - min(xs))] = y
        source = figures.Source(row="r", field="f", x_offset=min(xs))
        assert diff.check_claim(claim.op, source, grid, claim.expect)[0], claim_id


def test_missing_own_rows_fail_and_other_methods_rows_wait(tmp_path):
    table = load_profile("shortgpt", "paper")
    report = diff.diff_profile("shortgpt", table, tmp_path)
    status = {d.series: d.status for d in report.series}
    assert status == {"bi": "MISSING", "ppl": "PENDING"}
    assert {c.status for c in report.figure_claims} == {"PENDING"}
    assert diff.failed(d.status for d in report.series)
    # The runner passes the rows it ran: a series of a row not run this time is left out.
    report = diff.diff_profile("shortgpt", table, tmp_path, rows=["dense"])
    assert [d.series for d in report.series] == ["ppl"] and not diff.failed(d.status for d in report.series)
    assert {d.row for d in report.cells} == {"dense"}


# ----------------------------------------------------------------------------- plots and lpc diff

def test_a_plot_is_a_png(tmp_path):
    figure = parse(good_figure())["fig"]
    path = figures.plot_figure(figure, {"bi": {0: 0.41, 1: 0.15, 2: 0.12, 3: 0.18}}, tmp_path / "f.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def _copy_committed(tmp_path: Path) -> Path:
    for method in DEPTH_METHODS:
        source = COMMITTED / "smoke" / method
        if not any(source.glob("*.json")):
            pytest.fail(f"no committed smoke results in {source}")
        shutil.copytree(source, tmp_path / "smoke" / method, ignore=shutil.ignore_patterns("figures"))
    return tmp_path


@pytest.mark.parametrize("method", DEPTH_METHODS)
def test_lpc_diff_on_committed_smoke_results_passes_and_plots(method, tmp_path, capsys):
    root = _copy_committed(tmp_path)
    code = main(["diff", method, "--results-dir", str(root)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "figures summary" in out and not re.search(r"\|\s*(FAIL|MISSING)\s*\|", out)
    plots = sorted((root / "smoke" / method / "figures").glob("*.png"))
    listed = set(load_profile(method, "smoke").figures)
    assert {p.stem for p in plots} == listed and listed
    for plot in plots:
        assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 1000
    assert main(["diff", method, "--results-dir", str(root), "--no-plots"]) == 0


def test_a_moved_committed_score_fails_the_diff(tmp_path, capsys):
    root = _copy_committed(tmp_path)
    path = root / "smoke" / "shortgpt" / "bi-6.json"
    record = json.loads(path.read_text())
    moved = copy.deepcopy(record)
    moved["prune"]["scores"]["block_influence"][3] *= 1.5
    path.write_text(json.dumps(moved))
    assert main(["diff", "shortgpt", "--results-dir", str(root), "--no-plots"]) == 1
    assert re.search(r"\|\s*FAIL\s*\|", capsys.readouterr().out)


def test_a_series_whose_reading_is_a_contradicted_claim_reports_xfail_then_xpass(tmp_path):
    """A range reading that an honest measurement contradicts (Sheared's expected size at the end of
    a chaotic smoke run) carries `expected_failure`: XFAIL while it fails, XPASS once it holds."""
    figure = {"series": {"size": {"ours": {"row": "bi", "field": "prune.gates.expected"}, "reference": [{"y": [0.98, 1.02]}],
                                  "expected_failure": {"reason": "0.84 on 3 of 4 settings", "measured": [0.84]}}}}
    table = parse_profile({"model": "m", "reference": "reference", "sources": {"reference": "r"},
                           "rows": {"bi": {}}, "figures": {"fig": figure}}, "t.yaml:smoke", "smoke")
    for value, status, note in ((0.84, "XFAIL", "0.84 on 3 of 4 settings"), (0.99, "XPASS", "update the table")):
        write_result(tmp_path, "smoke", "m", "bi", gates={"expected": value})
        report = diff.diff_profile("m", table, tmp_path)
        assert [(d.status, d.gating) for d in report.series] == [(status, True)]
        assert note in report.series[0].note and not report.failed


def test_a_complete_diff_fails_on_a_cell_still_waiting_for_another_method(tmp_path):
    """`make rehearse-all` ends with `lpc diff --all --complete`: every method ran, so PENDING is a cell
    that no row produced."""
    table = load_profile("shortgpt", "paper")
    rows = []  # none of its own rows: what is left is the series that waits for minitron-depth's result
    assert diff.report("shortgpt", table, tmp_path, rows=rows, plots=False, log=lambda _: None) is False
    assert diff.report("shortgpt", table, tmp_path, rows=rows, plots=False, complete=True, log=lambda _: None)
