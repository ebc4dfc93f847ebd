"""Published figures as data: per-layer / per-candidate curves, compared point by point, and plotted.

A table profile (repro/tables/<method>.yaml) may hold a `figures:` block (schema in
repro/tables/README.md). A figure has series; a series has readings per column (`paper`,
`collection`, `reference`: each a list of points or x-ranges with a band) and names where ours comes
from: a result row and a field of its JSON (e.g. `prune.scores.block_influence`), with the x-axis
convention of the figure (x = list index + x_offset). Claims are checked on ours: argmax/argmin x,
the top/bottom-k x set, a set equality (e.g. the layers removed).

Statuses per series: PASS (every reading holds within its band), FAIL, MISSING (the result row of
this method and profile is absent: fails, as a table cell does), PENDING (a row of another method or
profile is absent: does not fail, as a claim), NOREF (nothing of ours or no reading of the gating
column to compare). Readings of the other columns are shown as PASS or OFF (outside, not gating).
Claims: PASS, FAIL, XFAIL, XPASS, PENDING, as the tables' claims.
"""
from __future__ import annotations

import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from methods.errors import UsageError
from repro.results import read_json

SERIES_KEYS = ("label", "axis", "band", "ours", "note")
OURS_KEYS = ("method", "profile", "row", "field", "x_offset", "scale", "transform")
TRANSFORMS = ("ln",)
CLAIM_OPS = ("argmax", "argmin", "top", "bottom", "set")
FIGURE_KEYS = ("title", "x_label", "axes", "reference", "sources", "series", "claims")
CLAIM_KEYS = ("id", "text", "of", "op", "expect", "expected_failure")
AXES = ("left", "right")
# Floating-point slack on band edges: a reading stored to 4 digits must not fail on the 16th.
EPS = 1e-9

Points = Dict[float, Optional[float]]   # x -> y of ours (None: the score was not finite)


# ----------------------------------------------------------------------------- the data model

@dataclass(frozen=True)
class Source:
    """Where a series of ours comes from: one field of one result JSON."""
    row: str
    field: str
    method: Optional[str] = None     # default: the table's method
    profile: Optional[str] = None    # default: the table's profile
    x_offset: float = 0              # x = list index + x_offset (Minitron: i + n, 1-indexed last dropped)
    scale: float = 1.0               # e.g. 0.01 for a table metric in percent on a 0-1 axis
    transform: Optional[str] = None  # "ln": the figure plots ln(ppl) ("validation loss")

    def owner(self, method: str, profile: str) -> Tuple[str, str]:
        return self.method or method, self.profile or profile


@dataclass(frozen=True)
class Reading:
    """One reading of a published curve: a point, or a range of x and/or y, with its half-width."""
    x0: Optional[float]              # None: any x (a horizontal line, e.g. a baseline)
    x1: Optional[float]
    lo: float                        # -inf / +inf for an open side ("off-chart, > 20")
    hi: float
    band: float

    def covers(self, x: float) -> bool:
        return self.x0 is None or self.x0 - EPS <= x <= self.x1 + EPS

    @property
    def is_point(self) -> bool:
        return self.x0 is not None and self.x0 == self.x1

    def text(self) -> str:
        if self.lo == self.hi:
            return f"{self.lo:.4g}"
        return f"[{_num(self.lo)}, {_num(self.hi)}]"


@dataclass
class Series:
    key: str
    label: str
    axis: str
    ours: Optional[Source]
    columns: Dict[str, List[Reading]]
    note: str = ""                   # a known difference of protocol, shown beside the comparison


@dataclass
class Claim:
    id: str
    text: str
    of: Source
    op: str
    expect: object                   # a list of x / values, or a Source whose values are expected
    expected_failure: Optional[dict] = None


@dataclass
class Figure:
    key: str
    title: str
    x_label: str
    axes: Dict[str, dict]            # left/right -> {label, lim}
    reference: str                   # the column that gates
    sources: Dict[str, str]          # column -> text of its origin
    series: Dict[str, Series]
    claims: List[Claim] = field(default_factory=list)


# ----------------------------------------------------------------------------- parsing

def load_figures(path: Path, profile: str) -> Dict[str, Figure]:
    """The figures of one profile of a table file ({} when it has none)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read table {path}: {exc}".splitlines()[0]) from None
    raw = (data.get("profiles") or {}).get(profile)
    if raw is None:
        raise UsageError(f"table {path.name} has no profile {profile!r}")
    return parse_figures(raw, f"{path.name}:{profile}")


def parse_figures(raw_profile: dict, where: str) -> Dict[str, Figure]:
    figures = raw_profile.get("figures") or {}
    if not isinstance(figures, dict):
        raise UsageError(f"{where}: figures must be a mapping of figure id -> figure")
    sources = raw_profile.get("sources") or {}
    rows = set((raw_profile.get("rows") or {}).keys())
    default_ref = raw_profile.get("reference", "paper")
    return {str(k): _parse_figure(str(k), v, f"{where}: figure {k!r}", sources, rows, default_ref)
            for k, v in figures.items()}


def _parse_figure(key: str, raw, where: str, sources: dict, rows: set, default_ref: str) -> Figure:
    _need(isinstance(raw, dict), where, "must be a mapping")
    unknown = sorted(set(raw) - set(FIGURE_KEYS))
    _need(not unknown, where, f"unknown key {', '.join(map(str, unknown))} (a figure takes {', '.join(FIGURE_KEYS)})")
    series_raw = raw.get("series")
    _need(isinstance(series_raw, dict) and series_raw, where, "needs a non-empty `series` mapping")
    axes = {"left": {}}
    for name, spec in (raw.get("axes") or {}).items():
        _need(name in AXES and isinstance(spec, dict), where, f"axes are left/right mappings, got {name!r}")
        lim = spec.get("lim")
        _need(lim is None or (isinstance(lim, list) and len(lim) == 2 and all(_is_num(v) for v in lim)),
              where, f"axis {name} lim must be [low, high]")
        axes[name] = dict(spec)
    column_sources = dict(raw.get("sources") or {})
    series = {}
    for skey, sraw in series_raw.items():
        series[str(skey)] = _parse_series(str(skey), sraw, f"{where} series {skey!r}", axes, rows)
    columns = sorted({c for s in series.values() for c in s.columns})
    texts = {}
    for column in columns:
        origin = column_sources.get(column, column)
        _need(origin in sources, where, f"column {column!r} names source {origin!r}, which the profile's "
              f"`sources` lacks")
        texts[column] = str(sources[origin])
    reference = str(raw.get("reference", default_ref))
    _need(reference in columns, where, f"gating column {reference!r} has no readings (columns: "
          f"{', '.join(columns) or 'none'})")
    claims = [_parse_claim(c, f"{where} claim", rows) for c in raw.get("claims") or []]
    return Figure(key=key, title=str(raw.get("title", key)), x_label=str(raw.get("x_label", "x")),
                  axes=axes, reference=reference, sources=texts, series=series, claims=claims)


def _parse_series(key: str, raw, where: str, axes: dict, rows: set) -> Series:
    _need(isinstance(raw, dict), where, "must be a mapping")
    axis = raw.get("axis", "left")
    _need(axis in axes, where, f"axis {axis!r} is not declared in the figure's axes")
    default_band = _parse_band(raw.get("band", 0.0), where)
    ours = _parse_source(raw["ours"], where, rows) if raw.get("ours") is not None else None
    columns = {}
    for column, readings in raw.items():
        if column in SERIES_KEYS:
            continue
        if _is_num(readings):        # a bare number: a horizontal line at that value
            readings = [{"y": readings}]
        _need(isinstance(readings, list) and readings, where, f"column {column!r} needs a list of readings")
        columns[str(column)] = [_parse_reading(r, default_band, f"{where} {column}") for r in readings]
    _need(columns, where, "has no readings (give at least one column such as paper or collection)")
    return Series(key=key, label=str(raw.get("label", key)), axis=axis, ours=ours, columns=columns,
                  note=str(raw.get("note", "")))


def _parse_reading(raw, default_band, where: str) -> Reading:
    if isinstance(raw, list):
        _need(len(raw) == 2 and all(_is_num(v) for v in raw), where, f"a point is [x, y], got {raw!r}")
        raw = {"x": raw[0], "y": raw[1]}
    _need(isinstance(raw, dict) and "y" in raw and set(raw) <= {"x", "y", "band"}, where,
          f"a reading is [x, y] or {{x, y, band}}, got {raw!r}")
    x0 = x1 = None
    if raw.get("x") is not None:
        x0, x1 = _pair(raw["x"], where, "x", open_ok=False)
    lo, hi = _pair(raw["y"], where, "y", open_ok=True)
    band = _parse_band(raw["band"], where) if "band" in raw else default_band
    width = band(lo, hi) if callable(band) else band
    return Reading(x0, x1, lo, hi, float(width))


def _pair(value, where: str, name: str, open_ok: bool) -> Tuple[float, float]:
    if _is_num(value):
        return float(value), float(value)
    ok = isinstance(value, list) and len(value) == 2 and all(
        _is_num(v) or (open_ok and v is None) for v in value)
    _need(ok, where, f"{name} must be a number or [low, high]" + (" (null: open)" if open_ok else "")
          + f", got {value!r}")
    lo = -math.inf if value[0] is None else float(value[0])
    hi = math.inf if value[1] is None else float(value[1])
    _need(lo <= hi, where, f"{name} range [{value[0]}, {value[1]}] runs backwards")
    return lo, hi


def _parse_band(raw, where: str):
    """A half-width: a number (absolute) or {abs: a} or {rel: r} (of the reading's value)."""
    if _is_num(raw) and raw >= 0:
        return float(raw)
    if isinstance(raw, dict) and len(raw) == 1:
        (kind, value), = raw.items()
        if kind == "abs" and _is_num(value) and value >= 0:
            return float(value)
        if kind == "rel" and _is_num(value) and value >= 0:
            return lambda lo, hi: float(value) * max((abs(v) for v in (lo, hi) if math.isfinite(v)), default=0.0)
    raise UsageError(f"{where}: band must be a non-negative number, {{abs: a}} or {{rel: r}}, got {raw!r}")


def _parse_source(raw, where: str, rows: set) -> Source:
    _need(isinstance(raw, dict) and {"row", "field"} <= set(raw) and set(raw) <= set(OURS_KEYS), where,
          f"`ours` needs row and field (optional method, profile, x_offset, scale, transform), got {raw!r}")
    own = raw.get("method") is None and raw.get("profile") is None
    _need(not own or raw["row"] in rows, where, f"`ours` names row {raw['row']!r}, which the profile lacks")
    transform = raw.get("transform")
    _need(transform is None or transform in TRANSFORMS, where, f"transform must be one of {TRANSFORMS}")
    for name in ("x_offset", "scale"):
        _need(name not in raw or _is_num(raw[name]), where, f"{name} must be a number")
    return Source(row=str(raw["row"]), field=str(raw["field"]), method=raw.get("method"),
                  profile=raw.get("profile"), x_offset=raw.get("x_offset", 0),
                  scale=float(raw.get("scale", 1.0)), transform=transform)


def _parse_claim(raw, where: str, rows: set) -> Claim:
    _need(isinstance(raw, dict) and {"id", "text", "of", "op", "expect"} <= set(raw) <= set(CLAIM_KEYS), where,
          f"needs id, text, of, op, expect (and optionally expected_failure), nothing else: {raw!r}")
    where = f"{where} {raw['id']!r}"
    _need(raw["op"] in CLAIM_OPS, where, f"op must be one of {CLAIM_OPS}, got {raw['op']!r}")
    expect = raw["expect"]
    if isinstance(expect, dict):
        expect = _parse_source(expect, where, rows)
    else:
        _need(isinstance(expect, list) and expect and all(_is_num(v) for v in expect), where,
              "expect must be a non-empty list of numbers or an `ours`-style source")
    failure = raw.get("expected_failure")
    _need(failure is None or (isinstance(failure, dict) and failure.get("reason")), where,
          "expected_failure needs a reason")
    return Claim(id=str(raw["id"]), text=str(raw["text"]), of=_parse_source(raw["of"], where, rows),
                 op=raw["op"], expect=expect, expected_failure=failure)


def _need(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise UsageError(f"{where}: {message}")


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- ours, from result JSON

def resolve(source: Source, root: Path, method: str, profile: str):
    """The values a source names: a list (a curve), a number (a line), or None when absent."""
    owner_method, owner_profile = source.owner(method, profile)
    path = Path(root) / owner_profile / owner_method / f"{source.row}.json"
    if not path.is_file():
        return None
    value = read_json(path)
    for part in source.field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def as_points(source: Source, value) -> Optional[Points]:
    """A resolved curve as {x: y} after the figure's conventions; None for a scalar or nothing."""
    if not isinstance(value, list):
        return None
    return {i + source.x_offset: _convert(source, v) for i, v in enumerate(value)}


def as_scalar(source: Source, value) -> Optional[float]:
    return _convert(source, value) if _is_num(value) else None


def _convert(source: Source, value) -> Optional[float]:
    if not _is_num(value) or not math.isfinite(value):
        return None
    value = float(value) * source.scale
    if source.transform == "ln":
        return math.log(value) if value > 0 else None
    return value


# ----------------------------------------------------------------------------- comparison

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
    figure: str
    id: str
    text: str
    measured: str
    status: str
    note: str = ""


@dataclass
class FigureReport:
    method: str
    profile: str
    figures: Dict[str, Figure]
    ours: Dict[Tuple[str, str], object]   # (figure, series) -> Points | float | None
    series: List[SeriesDiff]
    claims: List[ClaimDiff]


def compare(readings: Sequence[Reading], ours) -> Tuple[int, Optional[Tuple], List[str]]:
    """Check every reading against ours (points {x: y} or one number for a line).

    Returns (how many values were compared, the worst as (ratio, x, y, reading, delta), problems).
    ratio = distance outside the reading's [low, high] over its band: above 1 fails. The worst is the
    largest ratio (the first one on ties).
    """
    compared, worst, problems = 0, None, []
    for reading in readings:
        if isinstance(ours, dict):
            values = [(x, y) for x, y in sorted(ours.items()) if reading.covers(x)]
            if not values:
                where = f"x={_num(reading.x0)}" if reading.is_point else f"x in [{_num(reading.x0)}, {_num(reading.x1)}]"
                problems.append(f"ours has no value at {where}")
                continue
        else:
            values = [(None, ours)]
        for x, y in values:
            compared += 1
            ratio, delta = _ratio(reading, y)
            if worst is None or ratio > worst[0]:
                worst = (ratio, x, y, reading, delta)
    return compared, worst, problems


def _ratio(reading: Reading, y: Optional[float]) -> Tuple[float, Optional[float]]:
    if y is None:  # not finite: above any finite bound, so only an open upper side takes it
        return (0.0, None) if math.isinf(reading.hi) else (math.inf, None)
    delta = 0.0 if reading.lo <= y <= reading.hi else (y - reading.hi if y > reading.hi else y - reading.lo)
    if reading.band > 0:
        return abs(delta) / reading.band, delta
    return (math.inf if abs(delta) > EPS else 0.0), delta


def passes(ratio: float) -> bool:
    return ratio <= 1.0 + EPS


def diff_figures(method: str, profile: str, root: Path, *, path: Path,
                 rows: Optional[Sequence[str]] = None) -> FigureReport:
    """Every figure of a profile against the results under root. `rows` (the runner's selection)
    leaves out the series whose own row was not run this time."""
    figures = load_figures(path, profile)
    report = FigureReport(method, profile, figures, {}, [], [])
    for figure in figures.values():
        for series in figure.series.values():
            report.series.extend(_diff_series(figure, series, root, method, profile, rows, report.ours))
        for claim in figure.claims:
            report.claims.append(_diff_claim(figure, claim, root, method, profile))
    return report


def _own(source: Source, method: str, profile: str) -> bool:
    return source.owner(method, profile) == (method, profile)


def _diff_series(figure: Figure, series: Series, root, method, profile, rows, ours_store) -> List[SeriesDiff]:
    columns = [figure.reference] + sorted(c for c in series.columns if c != figure.reference)
    columns = [c for c in columns if c in series.columns]
    base = dict(figure=figure.key, series=series.key)
    if series.ours is None:
        return [SeriesDiff(**base, column=figure.reference, gating=True, status="NOREF",
                           note="reference only: no result of ours maps to this series")]
    source = series.ours
    own = _own(source, method, profile)
    if own and rows is not None and source.row not in rows:
        return []
    value = resolve(source, root, method, profile)
    ours = as_points(source, value) if isinstance(value, list) else as_scalar(source, value)
    ours_store[(figure.key, series.key)] = ours
    if ours is None and not isinstance(value, list):
        # Absent like a table cell: MISSING fails for this method's own rows, PENDING waits for others'.
        owner = "/".join(source.owner(method, profile)[::-1]) + f"/{source.row}.json"
        exists = _row_exists(source, root, method, profile)
        note = f"{owner} has no numeric {source.field}" if exists else f"needs {owner}"
        return [SeriesDiff(**base, column=figure.reference, gating=True,
                           status="MISSING" if own else "PENDING", note=note)]
    out = []
    if figure.reference not in series.columns:
        out.append(SeriesDiff(**base, column=figure.reference, gating=True, status="NOREF",
                              note=f"no {figure.reference} reading of this series; the others are shown"))
    for column in columns:
        gating = column == figure.reference
        compared, worst, problems = compare(series.columns[column], ours)
        diff = SeriesDiff(**base, column=column, gating=gating, compared=compared)
        if worst is not None:
            _, diff.worst_x, diff.ours, reading, diff.delta = worst
            diff.reading, diff.band = reading.text(), reading.band
        ok = not problems and (worst is None or passes(worst[0]))
        if ok:
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


def _row_exists(source: Source, root, method, profile) -> bool:
    owner_method, owner_profile = source.owner(method, profile)
    return (Path(root) / owner_profile / owner_method / f"{source.row}.json").is_file()


def _diff_claim(figure: Figure, claim: Claim, root, method, profile) -> ClaimDiff:
    base = dict(figure=figure.key, id=claim.id, text=claim.text)
    value = resolve(claim.of, root, method, profile)
    expect = claim.expect
    if isinstance(expect, Source):
        expect = resolve(expect, root, method, profile)
    if value is None or expect is None:
        needs = [s for s in (claim.of, claim.expect) if isinstance(s, Source)
                 and resolve(s, root, method, profile) is None]
        detail = ", ".join("/".join(s.owner(method, profile)[::-1]) + f"/{s.row}: {s.field}" for s in needs)
        return ClaimDiff(**base, measured="-", status="PENDING", note=f"needs {detail}")
    holds, measured = check_claim(claim.op, claim.of, value, expect)
    if claim.expected_failure:
        status, note = ("XPASS", "documented failure now holds; update the table") if holds else (
            "XFAIL", str(claim.expected_failure["reason"]))
    else:
        status, note = ("PASS", "") if holds else ("FAIL", "claim does not hold")
    return ClaimDiff(**base, measured=measured, status=status, note=note)


def check_claim(op: str, source: Optional[Source], value, expect) -> Tuple[bool, str]:
    """Does `value` (a resolved field) satisfy the claim? Returns (holds, what was measured).

    x-based ops read `value` as a curve with the source's x convention; a negative expected x counts
    from the end (-1: the last x of the curve). `set` compares the values themselves as a set.
    """
    if _is_num(expect):  # a source may name one number, e.g. the chosen block's start
        expect = [expect]
    if not isinstance(value, list) or not isinstance(expect, list):
        return False, f"not a list: {_short(value)}"
    if op == "set":
        got = sorted(value)
        return set(got) == set(expect), _short(got)
    points = as_points(source, value) if source is not None else {i: v for i, v in enumerate(value)}
    finite = [(x, y) for x, y in points.items() if y is not None]
    if not finite:
        return False, "no finite values"
    xs = sorted(points)
    wanted = {xs[int(e)] if e < 0 and -int(e) <= len(xs) else e for e in expect}
    if op in ("argmax", "argmin"):
        best = (max if op == "argmax" else min)(finite, key=lambda p: p[1])
        return best[0] in wanted, f"x={_num(best[0])} (y={best[1]:.4g})"
    ranked = sorted(finite, key=lambda p: p[1], reverse=(op == "top"))
    got = sorted(x for x, _ in ranked[:len(wanted)])
    return set(got) == wanted, "x=" + ",".join(_num(x) for x in got)


def report_figures(method: str, profile: str, root: Path, path: Path, *, plots: bool = True,
                   rows: Optional[Sequence[str]] = None, log=print) -> bool:
    """`lpc diff` / `lpc repro`: print the profile's figure comparison and write its plots into
    <root>/<profile>/<method>/figures/. Returns True when a figure fails."""
    report = diff_figures(method, profile, root, path=path, rows=rows)
    if not report.figures:
        return False
    log(render(report) + "\n")
    folder = Path(root) / profile / method
    if plots and folder.is_dir():  # no results of ours, nothing to draw: leave the tree alone
        for written in write_plots(report, folder / "figures"):
            log(f"plot: {written}")
    return failed(report)


def failed(report: FigureReport) -> bool:
    return any(d.status in ("FAIL", "MISSING") for d in report.series) or any(
        c.status == "FAIL" for c in report.claims)


def render(report: FigureReport) -> str:
    from tabulate import tabulate

    if not report.figures:
        return ""
    text = [f"{report.method} [{report.profile}] figures; delta = ours - the reading (its nearest edge for a "
            "range, 0 inside); worst = the point with the largest |delta| / band"]
    rows = [[d.figure, d.series, d.column + ("" if d.gating else " (info)"), d.compared or "-",
             _num(d.worst_x), _num(d.ours), d.reading or "-", "-" if d.delta is None else f"{d.delta:+.4g}",
             "-" if d.band is None else f"±{d.band:.3g}", d.status, d.note] for d in report.series]
    text.append(tabulate(rows, headers=["figure", "series", "vs", "points", "worst x", "ours", "reading",
                                        "delta", "band", "status", "note"], tablefmt="github"))
    if report.claims:
        text.append(tabulate([[c.figure, c.id, c.measured, c.status, c.note or c.text] for c in report.claims],
                             headers=["figure", "claim", "ours", "status", "note"], tablefmt="github"))
    counts: Dict[str, int] = {}
    for d in report.series:
        if d.gating:
            counts[d.status] = counts.get(d.status, 0) + 1
    for c in report.claims:
        counts[c.status] = counts.get(c.status, 0) + 1
    text.append("figures summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n\n".join(text)


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def _short(value, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- plots

# Published readings wide and pale underneath, ours thin on top: where they agree both stay visible.
COLUMN_STYLE = {"paper": dict(linestyle=":", marker="^", markersize=6, linewidth=1.5, alpha=0.6),
                "collection": dict(linestyle="--", marker="s", markersize=7, linewidth=2.5, alpha=0.4),
                "reference": dict(linestyle="--", marker="s", markersize=7, linewidth=2.5, alpha=0.4)}
OTHER_STYLE = dict(linestyle="-.", marker="x", markersize=6, linewidth=1.5, alpha=0.6)
OURS_STYLE = dict(linestyle="-", marker="o", markersize=3, linewidth=1.3, zorder=3)


def write_plots(report: FigureReport, out_dir: Path) -> List[Path]:
    """One PNG per figure: every column's readings (points, ranges as boxes) and ours on top.

    Plots are a convenience on top of the comparison: an environment without matplotlib (the
    `sparse` image has no figures to draw) gets one line on stderr instead of a failed run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("lpc: matplotlib is not installed; figures compared but not drawn", file=sys.stderr)
        return []
    written = []
    for figure in report.figures.values():
        path = Path(out_dir) / f"{figure.key}.png"
        plot_figure(figure, {k: report.ours.get((figure.key, k)) for k in figure.series}, path)
        written.append(path)
    return written


def plot_figure(figure: Figure, ours: Dict[str, object], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and the same pixels on every machine
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(9, 4.2))
    axes = {"left": left}
    if "right" in figure.axes:
        axes["right"] = left.twinx()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for index, series in enumerate(figure.series.values()):
        colour = colours[index % len(colours)]
        ax = axes[series.axis]
        for column, readings in series.columns.items():
            handles += _draw_readings(ax, readings, colour, f"{series.label} ({column})",
                                      COLUMN_STYLE.get(column, OTHER_STYLE))
        handles += _draw_ours(ax, ours.get(series.key), colour, f"{series.label} (ours)")
    for name, ax in axes.items():
        spec = figure.axes.get(name, {})
        ax.set_ylabel(spec.get("label", ""))
        if spec.get("lim"):
            ax.set_ylim(*spec["lim"])
    left.set_xlabel(figure.x_label)
    left.grid(True, alpha=0.3)
    left.set_title("\n".join(textwrap.wrap(figure.title, 110)), fontsize=9)
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_readings(ax, readings: List[Reading], colour, label: str, style: dict) -> list:
    handles = []
    points = sorted((r.x0, r.lo) for r in readings if r.is_point and r.lo == r.hi)
    if points:
        # Readings are joined only between neighbouring x: a line across a gap would draw values
        # the source never gave.
        xs, ys = [points[0][0]], [points[0][1]]
        for (x_prev, _), (x, y) in zip(points, points[1:]):
            if x - x_prev > 1:
                xs.append(math.nan)
                ys.append(math.nan)
            xs.append(x)
            ys.append(y)
        line, = ax.plot(xs, ys, color=colour, label=label, **style)
        handles.append(line)
        label = None
    for reading in readings:
        if reading.is_point and reading.lo == reading.hi:
            continue
        top = reading.hi if math.isfinite(reading.hi) else reading.lo * 1.15
        bottom = reading.lo if math.isfinite(reading.lo) else 0.0
        if reading.x0 is None:  # a level across the plot (a baseline)
            if reading.lo == reading.hi:
                art = ax.axhline(reading.lo, color=colour, linestyle=style["linestyle"], alpha=style["alpha"],
                                 linewidth=style["linewidth"], label=label)
            else:
                art = ax.axhspan(bottom, top, color=colour, alpha=0.12, label=label)
        elif reading.lo == reading.hi:  # one value over an x range: a segment
            art = ax.hlines(reading.lo, reading.x0, reading.x1, color=colour, linestyle=style["linestyle"],
                            alpha=style["alpha"], linewidth=style["linewidth"] + 2, label=label)
        else:
            x0, x1 = reading.x0 - 0.3, reading.x1 + 0.3
            art = ax.fill_between([x0, x1], [bottom] * 2, [top] * 2, color=colour, alpha=0.15,
                                  hatch="//" if style is COLUMN_STYLE.get("paper") else None, label=label)
        if label:
            handles.append(art)
            label = None
    return handles


def _draw_ours(ax, ours, colour, label: str) -> list:
    if isinstance(ours, dict):
        xs = sorted(x for x, y in ours.items() if y is not None)
        if xs:
            line, = ax.plot(xs, [ours[x] for x in xs], color=colour, label=label, **OURS_STYLE)
            return [line]
    elif ours is not None:
        return [ax.axhline(ours, color=colour, linestyle="-", linewidth=1.3, zorder=3, label=label)]
    return []
