"""`lpc diff`: reproduced numbers against the stored tables, cell by cell, and the papers' claims.

Statuses: PASS (inside the band), FAIL (outside), KNOWN (outside, but the table records the
deviation and its reason), MISSING (no result for a row the table has), NOREF (nothing to compare
with). Claims: PASS, FAIL, XFAIL (fails as the table documents), XPASS (documented failure no longer
fails: update the table), PENDING (a result it needs is not there yet). FAIL and MISSING fail the diff.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from repro.results import read_json
from repro.tables import Profile
from repro.tolerance import band

FAILING = {"FAIL", "MISSING"}
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
class ClaimDiff:
    id: str
    text: str
    lhs: Optional[float]
    rhs: Optional[float]
    status: str
    note: str = ""


def results_dir(root: Path, profile: str, method: str) -> Path:
    return Path(root) / profile / method


def load_results(root: Path, profile: str, method: str) -> Dict[str, dict]:
    folder = results_dir(root, profile, method)
    return {p.stem: read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def diff_cells(profile: Profile, results: Dict[str, dict]) -> List[CellDiff]:
    out = []
    for row, cells in profile.rows.items():
        measured = results.get(row, {}).get("metrics", {})
        for key, cell in cells.items():
            metric = profile.metrics[key]
            reference = cell.values.get(profile.reference)
            collection = cell.values.get("collection")
            ours = measured.get(key)
            if ours is None:
                out.append(CellDiff(row, key, reference, collection, None, None, None, "MISSING"))
                continue
            if reference is None:
                out.append(CellDiff(row, key, None, collection, ours, None, None, "NOREF"))
                continue
            override = profile.override(row, key)
            tol = band(metric.kind, reference, n=metric.n, ppl_rel=profile.ppl_rel, override=override)
            delta = ours - reference
            status, note = "PASS", ""
            if abs(delta) > tol:
                status = "KNOWN" if cell.known_deviation else "FAIL"
                note = cell.known_deviation or _explain(metric.kind, delta, tol, override)
            elif override:
                note = f"band widened: {override['reason']}"
            out.append(CellDiff(row, key, reference, collection, ours, delta, tol, status, note))
    return out


def _explain(kind: str, delta: float, tol: float, override: Optional[dict]) -> str:
    unit = " points" if kind == "accuracy" else ""
    rule = ("override: " + override["reason"]) if override else (
        "2 binomial std errors of the split" if kind == "accuracy" else "relative perplexity band")
    return f"|delta| {abs(delta):.3g}{unit} > {tol:.3g} ({rule})"


def _lookup(root: Path, profile: str, ref: dict, default_method: str) -> Tuple[Optional[float], str]:
    method = ref.get("method", default_method)
    path = results_dir(root, profile, method) / f"{ref['row']}.json"
    if not path.is_file():
        return None, f"{method}/{ref['row']}"
    return read_json(path).get("metrics", {}).get(ref["metric"]), ""


def diff_claims(profile: Profile, root: Path, method: str) -> List[ClaimDiff]:
    out = []
    for claim in profile.claims:
        lhs, missing_l = _lookup(root, profile.name, claim["lhs"], method)
        rhs, missing_r = _lookup(root, profile.name, claim["rhs"], method)
        if lhs is None or rhs is None:
            missing = ", ".join(m for m in (missing_l, missing_r) if m) or "metric absent"
            out.append(ClaimDiff(claim["id"], claim["text"], lhs, rhs, "PENDING", f"needs {missing}"))
            continue
        holds = OPS[claim["op"]](lhs, float(claim.get("factor", 1.0)) * rhs)
        expected = claim.get("expected_failure")
        if expected:
            status, note = ("XPASS", "documented failure now holds; update the table") if holds else (
                "XFAIL", expected["reason"])
        else:
            status, note = ("PASS", "") if holds else ("FAIL", "claim does not hold")
        out.append(ClaimDiff(claim["id"], claim["text"], lhs, rhs, status, note))
    return out


def failed(cells: List[CellDiff], claims: List[ClaimDiff]) -> bool:
    return any(c.status in FAILING for c in cells) or any(c.status == "FAIL" for c in claims)


def render(method: str, profile: Profile, cells: List[CellDiff], claims: List[ClaimDiff]) -> str:
    from tabulate import tabulate

    ref = profile.reference
    rows = [[c.row, c.metric, _fmt(c.reference), _fmt(c.collection), _fmt(c.ours), _fmt(c.delta, sign=True),
             "" if c.tolerance is None else f"±{c.tolerance:.3g}", c.status, c.note] for c in cells]
    text = [f"{method} [{profile.name}] model {profile.model}; delta = ours - {ref}",
            tabulate(rows, headers=["row", "metric", ref, "collection", "ours", "delta", "tolerance",
                                    "status", "note"], tablefmt="github")]
    if claims:
        text.append(tabulate([[c.id, _fmt(c.lhs), _fmt(c.rhs), c.status, c.note or c.text] for c in claims],
                             headers=["claim", "lhs", "rhs", "status", "note"], tablefmt="github"))
    counts: Dict[str, int] = {}
    for status in [c.status for c in cells] + [c.status for c in claims]:
        counts[status] = counts.get(status, 0) + 1
    text.append("summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n\n".join(text)


def _fmt(value: Optional[float], sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4g}" if sign else f"{value:.4g}"
