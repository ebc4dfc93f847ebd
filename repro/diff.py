"""`lpc diff`: reproduced results against a stored table profile, one engine for everything it holds.

Table cells: PASS (inside the band), FAIL (outside), KNOWN (outside, but the table records the
deviation and its reason), MISSING (no result for a row the table has), NOREF (nothing to compare with).
Figure series, per column: PASS, FAIL (the gating column's worst point lies outside its band, or ours
has no value at a reading's x), MISSING (this method's own row has no result), PENDING (another method's
or profile's row is absent), NOREF (nothing of ours, or no reading of the gating column); the other
columns print PASS or OFF (outside, informative only). Claims, of tables (`lhs op factor * rhs`) and of
figures (argmax, argmin, top, bottom, set): PASS, FAIL, XFAIL (fails as the table documents), XPASS
(a documented failure no longer fails: update the table), PENDING (a result it needs is not there yet).
FAIL and MISSING fail the diff, wherever they stand.

A rehearsal's results (repro/rehearsal.py: random stand-in models, cut sample counts) are not compared:
a cell, series or claim that got its numbers shows REHEARSED (ran, not compared), a cell whose number is
not finite FAIL; MISSING and PENDING stay what they are.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from repro import figures
from repro.figures import num
from methods.core.results import read_json
from repro.schema import is_num
from repro.tables import Claim, ExpectedFailure, Figure, FigureClaim, MetricRef, Profile, Series, Source
from repro.tolerance import band

FAILING = ("FAIL", "MISSING")
REHEARSED = "REHEARSED"
# What a rehearsal leaves as it is: the absence of a number it needs.
ABSENT = ("MISSING", "PENDING")
# The kit's own stored results; a table whose reference column is `reference` was copied from them.
KIT_REFERENCES = Path(__file__).resolve().parents[1] / "results" / "reference"
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass
class CellDiff:
    row: str
    metric: str
    reference: Optional[float]
    collection: Optional[float]
    ours: Optional[float]
    delta: Optional[float]
    tolerance: Optional[float]
    status: str
    note: str = ""


@dataclass
class SeriesDiff:
    figure: str
    series: str
    column: str
    gating: bool
    compared: int = 0
    worst_x: Optional[float] = None
    ours: Optional[float] = None
    reading: str = ""
    delta: Optional[float] = None    # ours minus the nearest edge of the reading (0 inside it)
    band: Optional[float] = None
    status: str = "PASS"
    note: str = ""


@dataclass
class ClaimDiff:
    id: str
    text: str
    measured: List[str]              # what the claim read: lhs and rhs of a table claim, ours of a figure's
    status: str
    note: str = ""
    figure: Optional[str] = None


@dataclass
class Comparison:
    """One method and profile against its results: the table part and the figures part."""
    method: str
    table: Profile
    cells: List[CellDiff]
    claims: List[ClaimDiff]
    series: List[SeriesDiff] = field(default_factory=list)
    figure_claims: List[ClaimDiff] = field(default_factory=list)
    ours: Dict[Tuple[str, str], object] = field(default_factory=dict)  # (figure, series) -> points | level

    @property
    def statuses(self) -> List[str]:
        return [d.status for d in [*self.cells, *self.claims, *self.series, *self.figure_claims]]

    @property
    def failed(self) -> bool:
        return failed(self.statuses)


def failed(statuses: Iterable[str]) -> bool:
    return any(status in FAILING for status in statuses)


def results_dir(root: Path, profile: str, method: str) -> Path:
    return Path(root) / profile / method


def load_results(root: Path, profile: str, method: str) -> Dict[str, dict]:
    folder = results_dir(root, profile, method)
    return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def diff_profile(method: str, table: Profile, root: Path, rows: Optional[Sequence[str]] = None) -> Comparison:
    """Everything the profile holds against the results under root. `rows` (the runner's selection)
    leaves out the cells and series of this method's rows that were not run this time."""
    results = load_results(root, table.name, method)
    comparison = Comparison(method, table, diff_cells(table, results, rows),
                            [diff_claim(c, root, method, table.name) for c in table.claims])
    for key, figure in table.figures.items():
        for name, series in figure.series.items():
            comparison.series += _diff_series(key, figure, name, series, root, method, table.name, rows,
                                              comparison.ours)
        comparison.figure_claims += [diff_claim(c, root, method, table.name, figure=key) for c in figure.claims]
    if any(result.get("rehearsal") for result in results.values()):
        for item in [*comparison.claims, *comparison.series, *comparison.figure_claims]:
            if item.status not in ABSENT and not (isinstance(item, SeriesDiff) and item.status == "NOREF"
                                                  and not item.compared):
                item.status = REHEARSED
    return comparison


# ----------------------------------------------------------------------------- table cells

def diff_cells(table: Profile, results: Dict[str, dict], rows: Optional[Sequence[str]] = None) -> List[CellDiff]:
    out = []
    for row, cells in table.rows.items():
        if rows is not None and row not in rows:
            continue
        measured = results.get(row, {}).get("metrics", {})
        rehearsed = bool(results.get(row, {}).get("rehearsal"))
        for key, cell in cells.items():
            metric = table.metrics[key]
            reference = cell.values.get(table.reference)
            collection = cell.values.get("collection")
            ours = measured.get(key)
            if ours is None:
                out.append(CellDiff(row, key, reference, collection, None, None, None, "MISSING"))
                continue
            if rehearsed:  # ran on a stand-in: a number is all it can show, and it must be one
                finite = isinstance(ours, (int, float)) and math.isfinite(ours)
                out.append(CellDiff(row, key, reference, collection, ours, None, None,
                                    REHEARSED if finite else "FAIL", "" if finite else "not a finite number"))
                continue
            if reference is None:
                out.append(CellDiff(row, key, None, collection, ours, None, None, "NOREF"))
                continue
            override = table.override(row, key)
            tol = band(metric.kind, reference, n=metric.n, ppl_rel=table.ppl_rel,
                       override=override.band if override else None)
            delta = ours - reference
            status, note = "PASS", ""
            if abs(delta) > tol:
                status = "KNOWN" if cell.known_deviation else "FAIL"
                note = cell.known_deviation or _explain(metric.kind, delta, tol, override and override.reason)
            elif override:
                note = f"band widened: {override.reason}"
            out.append(CellDiff(row, key, reference, collection, ours, delta, tol, status, note))
    return out


def _explain(kind: str, delta: float, tol: float, reason: Optional[str]) -> str:
    unit = " points" if kind == "accuracy" else ""
    rule = ("override: " + reason) if reason else (
        "2 binomial std errors of the split" if kind == "accuracy" else "relative perplexity band")
    return f"|delta| {abs(delta):.3g}{unit} > {tol:.3g} ({rule})"


# ----------------------------------------------------------------------------- figure series

def _diff_series(figure_key: str, figure: Figure, key: str, series: Series, root, method, profile, rows,
                 ours_store) -> List[SeriesDiff]:
    columns = series.columns
    order = [figure.reference] + sorted(c for c in columns if c != figure.reference)
    order = [c for c in order if c in columns]
    base = dict(figure=figure_key, series=key)
    if series.ours is None:
        return [SeriesDiff(**base, column=figure.reference, gating=True, status="NOREF",
                           note="reference only: no result of ours maps to this series")]
    source = series.ours
    own = source.owner(method, profile) == (method, profile)
    if own and rows is not None and source.row not in rows:
        return []
    value = figures.resolve(source, root, method, profile)
    ours = figures.as_points(source, value) if isinstance(value, list) else figures.as_scalar(source, value)
    ours_store[(figure_key, key)] = ours
    if ours is None and not isinstance(value, list):
        # Absent like a table cell: MISSING fails for this method's own rows, PENDING waits for others'.
        owner = "/".join(source.owner(method, profile)[::-1]) + f"/{source.row}.json"
        exists = figures.result_path(source, root, method, profile).is_file()
        note = f"{owner} has no numeric {source.field}" if exists else f"needs {owner}"
        return [SeriesDiff(**base, column=figure.reference, gating=True,
                           status="MISSING" if own else "PENDING", note=note)]
    out = []
    if figure.reference not in columns:
        out.append(SeriesDiff(**base, column=figure.reference, gating=True, status="NOREF",
                              note=f"no {figure.reference} reading of this series; the others are shown"))
    for column in order:
        gating = column == figure.reference
        compared, worst, problems = figures.compare(columns[column], ours)
        diff = SeriesDiff(**base, column=column, gating=gating, compared=compared)
        if worst is not None:
            _, diff.worst_x, diff.ours, reading, diff.delta = worst
            diff.reading, diff.band = figures.reading_text(reading), reading.band
        ok = not problems and (worst is None or figures.passes(worst[0]))
        if gating and series.expected_failure is not None:
            diff.status, diff.note = claim_status(ok, series.expected_failure)
        elif ok:
            diff.status = "PASS"
        else:
            diff.status = "FAIL" if gating else "OFF"
            diff.note = "; ".join(problems) or f"worst point outside the band of the {column} reading"
        if not gating and not ok:
            diff.note += f" (not gating: the figure is checked against {figure.reference})"
        if series.note and gating:
            diff.note = "; ".join(n for n in (diff.note, series.note) if n)
        out.append(diff)
    return out


# ----------------------------------------------------------------------------- claims

def diff_claim(claim, root: Path, method: str, profile: str, figure: Optional[str] = None) -> ClaimDiff:
    """One status logic for every claim: PENDING while a result it needs is absent, then PASS/FAIL,
    or XFAIL/XPASS where the table documents an expected failure."""
    if isinstance(claim, FigureClaim):
        holds, measured, needs = _check_figure_claim(claim, root, method, profile)
    else:
        holds, measured, needs = _check_table_claim(claim, root, method, profile)
    base = dict(id=claim.id, text=claim.text, measured=measured, figure=figure)
    if needs is not None:
        return ClaimDiff(**base, status="PENDING", note=f"needs {needs}")
    status, note = claim_status(holds, claim.expected_failure)
    return ClaimDiff(**base, status=status, note=note)


def claim_status(holds: bool, expected_failure: Optional[ExpectedFailure]) -> Tuple[str, str]:
    if expected_failure:
        if holds:
            # A chaotic measurement can hold on one machine and fail on others (Sheared's expected size).
            measured = f" (measured: {expected_failure.measured})" if expected_failure.measured else ""
            return "XPASS", f"holds here, unlike the documented failure{measured}; update the table if it holds everywhere"
        return "XFAIL", expected_failure.reason
    return ("PASS", "") if holds else ("FAIL", "claim does not hold")


def _check_table_claim(claim: Claim, root, method, profile) -> Tuple[bool, List[str], Optional[str]]:
    lhs, missing_l = _lookup(root, profile, claim.lhs, method)
    rhs, missing_r = _lookup(root, profile, claim.rhs, method)
    measured = [num(lhs), num(rhs)]
    if lhs is None or rhs is None:
        return False, measured, ", ".join(m for m in (missing_l, missing_r) if m) or "metric absent"
    return OPS[claim.op](lhs, claim.factor * rhs), measured, None


def _lookup(root: Path, profile: str, ref: MetricRef, default_method: str) -> Tuple[Optional[float], str]:
    method = ref.method or default_method
    path = results_dir(root, profile, method) / f"{ref.row}.json"
    if not path.is_file():
        return None, f"{method}/{ref.row}"
    return read_json(path).get("metrics", {}).get(ref.metric), ""


def _check_figure_claim(claim: FigureClaim, root, method, profile) -> Tuple[bool, List[str], Optional[str]]:
    value = figures.resolve(claim.of, root, method, profile)
    expect = claim.expect
    if isinstance(expect, Source):
        expect = figures.resolve(expect, root, method, profile)
    if value is None or expect is None:
        needs = [s for s in (claim.of, claim.expect) if isinstance(s, Source)
                 and figures.resolve(s, root, method, profile) is None]
        return False, ["-"], ", ".join("/".join(s.owner(method, profile)[::-1]) + f"/{s.row}: {s.field}"
                                       for s in needs)
    holds, measured = check_claim(claim.op, claim.of, value, expect)
    return holds, [measured], None


def check_claim(op: str, source: Optional[Source], value, expect) -> Tuple[bool, str]:
    """Does `value` (a resolved field) satisfy a figure claim? Returns (holds, what was measured).

    x-based ops read `value` as a curve with the source's x convention; a negative expected x counts
    from the end (-1: the last x of the curve). `set` compares the values themselves as a set.
    """
    if is_num(expect):  # a source may name one number, e.g. the chosen block's start
        expect = [expect]
    if not isinstance(value, list) or not isinstance(expect, list):
        return False, f"not a list: {_short(value)}"
    if op == "set":
        got = sorted(value)
        return set(got) == set(expect), _short(got)
    points = figures.as_points(source, value) if source is not None else {i: v for i, v in enumerate(value)}
    finite = [(x, y) for x, y in points.items() if y is not None]
    if not finite:
        return False, "no finite values"
    xs = sorted(points)
    wanted = {xs[int(e)] if e < 0 and -int(e) <= len(xs) else e for e in expect}
    if op in ("argmax", "argmin"):
        best = (max if op == "argmax" else min)(finite, key=lambda p: p[1])
        return best[0] in wanted, f"x={num(best[0])} (y={best[1]:.4g})"
    ranked = sorted(finite, key=lambda p: p[1], reverse=(op == "top"))
    got = sorted(x for x, _ in ranked[:len(wanted)])
    return set(got) == wanted, "x=" + ",".join(num(x) for x in got)


def _short(value, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- the report

def render(comparison: Comparison) -> str:
    from tabulate import tabulate

    c, table = comparison, comparison.table
    ref = table.reference
    cells = [[d.row, d.metric, num(d.reference), num(d.collection), num(d.ours),
              "-" if d.delta is None else f"{d.delta:+.4g}", "" if d.tolerance is None else f"±{d.tolerance:.3g}",
              d.status, d.note] for d in c.cells]
    text = [f"{c.method} [{table.name}] model {table.model}; delta = ours - {ref}"
            + ("".join(f"\n{line}" for line in reference_origin(c.method, table.name)) if ref == "reference" else ""),
            tabulate(cells, headers=["row", "metric", ref, "collection", "ours", "delta", "tolerance", "status",
                                     "note"], tablefmt="github"),
            *render_claims(c.claims, ["lhs", "rhs"]),
            summary("summary", [d.status for d in [*c.cells, *c.claims]])]
    if not table.figures:
        return "\n\n".join(text)
    series = [[d.figure, d.series, d.column + ("" if d.gating else " (info)"), d.compared or "-", num(d.worst_x),
               num(d.ours), d.reading or "-", "-" if d.delta is None else f"{d.delta:+.4g}",
               "-" if d.band is None else f"±{d.band:.3g}", d.status, d.note] for d in c.series]
    text += [f"{c.method} [{table.name}] figures; delta = ours - the reading (its nearest edge for a range, "
             "0 inside); worst = the point with the largest |delta| / band",
             tabulate(series, headers=["figure", "series", "vs", "points", "worst x", "ours", "reading", "delta",
                                       "band", "status", "note"], tablefmt="github"),
             *render_claims(c.figure_claims, ["ours"]),
             summary("figures summary", [d.status for d in c.series if d.gating] +
                     [d.status for d in c.figure_claims])]
    return "\n\n".join(text)


def reference_origin(method: str, profile: str, root: Path = KIT_REFERENCES) -> List[str]:
    """What the `reference` column is: the kit's own run, at which commit, on which kind of machine
    (read off the stored results' provenance, one line per commit and machine)."""
    from methods.core.provenance import machine_summary

    folder = results_dir(root, profile, method)
    runs: Dict[Tuple[str, str], List[str]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        provenance = read_json(path).get("provenance") or {}
        commit = (provenance.get("git_sha") or "unknown commit")[:12]
        runs.setdefault((commit, machine_summary(provenance.get("hardware") or {})), []).append(path.stem)
    if not runs:
        return [f"references: none stored under {folder}"]
    return [f"references: the kit's own run of rows {', '.join(rows)} at commit {commit}, on {machine}"
            for (commit, machine), rows in runs.items()]


def render_claims(claims: List[ClaimDiff], measured: List[str]) -> List[str]:
    """The claims as one table (none when there are none); a figure's claims name their figure."""
    from tabulate import tabulate

    if not claims:
        return []
    by_figure = any(c.figure for c in claims)
    rows = [[*([c.figure] if by_figure else []), c.id, *c.measured, c.status, c.note or c.text] for c in claims]
    headers = [*(["figure"] if by_figure else []), "claim", *measured, "status", "note"]
    return [tabulate(rows, headers=headers, tablefmt="github")]


def summary(label: str, statuses: List[str]) -> str:
    counts: Dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return f"{label}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def report(method: str, table: Profile, root: Path, *, rows: Optional[Sequence[str]] = None, plots: bool = True,
           complete: bool = False, log=print) -> bool:
    """`lpc diff` / `lpc repro`: print the comparison, draw the figures into
    <root>/<profile>/<method>/figures/, and return True when the diff fails. `complete`: every other
    method has run too (the end of `make rehearse-all`), so a cell still waiting for one fails as well."""
    comparison = diff_profile(method, table, root, rows)
    log(render(comparison) + "\n")
    folder = results_dir(root, table.name, method)
    if plots and table.figures and folder.is_dir():  # no results of ours, nothing to draw: leave the tree alone
        for written in figures.write_plots(table.figures, comparison.ours, folder / "figures"):
            log(f"plot: {written}")
    return comparison.failed or (complete and any(status in ABSENT for status in comparison.statuses))
