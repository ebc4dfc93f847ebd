"""Published numbers as data: `repro/tables/<method>.yaml`, one profile per setting.

A profile names the model, the sources, the metrics (one per table column: what to measure and how),
the rows (one per table row: the reference values of each cell) and the claims the paper makes that
a reproduction should confirm. See repro/tables/README.md for the schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from methods.errors import UsageError
from repro.tolerance import PPL_REL_DEFAULT

TABLES = Path(__file__).resolve().parent / "tables"
KINDS = ("accuracy", "perplexity", "structure")
# What a `structure` metric reads off the pruned model (repro.runner.structure_value).
STRUCTURE_FIELDS = ("parameters", "non_embedding_parameters", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class Metric:
    key: str
    kind: str                     # accuracy (percent) | perplexity | structure (a count, exact by default)
    spec: dict                    # accuracy: task, metric, shots, n[, split]; perplexity: data, protocol, seqlen;
                                  # structure: field[, rel]

    @property
    def n(self) -> Optional[int]:
        return self.spec.get("n")


@dataclass
class Cell:
    values: Dict[str, float]      # column -> number: paper, collection, reference (smoke), ...
    source: Optional[str] = None  # which `sources` entry the primary value comes from
    known_deviation: Optional[str] = None


@dataclass
class Profile:
    name: str
    model: str
    reference: str                # which column `delta` is taken against: paper | reference
    sources: Dict[str, str]
    metrics: Dict[str, Metric]
    rows: Dict[str, Dict[str, Cell]]
    ppl_rel: float = PPL_REL_DEFAULT
    overrides: List[dict] = field(default_factory=list)
    claims: List[dict] = field(default_factory=list)

    def override(self, row: str, metric: str) -> Optional[dict]:
        for entry in self.overrides:
            if entry["row"] in (row, "*") and entry["metric"] in (metric, "*"):
                return entry
        return None


def table_path(method: str) -> Path:
    return TABLES / f"{method}.yaml"


def load_profile(method: str, profile: str, path: Optional[Path] = None) -> Profile:
    path = Path(path) if path else table_path(method)
    if not path.is_file():
        raise UsageError(f"no table for method {method!r} ({path})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"malformed table {path}: {exc}".splitlines()[0]) from None
    profiles = (data or {}).get("profiles", {})
    if profile not in profiles:
        raise UsageError(f"table {path.name} has no profile {profile!r}; it has {', '.join(profiles)}")
    return _parse_profile(profile, profiles[profile], path)


def _parse_profile(name: str, raw: dict, path: Path) -> Profile:
    where = f"{path.name}:{name}"
    metrics = {}
    for key, spec in raw.get("metrics", {}).items():
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind not in KINDS:
            raise UsageError(f"{where}: metric {key!r} has kind {kind!r}, expected one of {KINDS}")
        if kind == "accuracy":
            missing = [k for k in ("task", "metric", "shots", "n") if k not in spec]
            if missing:
                raise UsageError(f"{where}: accuracy metric {key!r} lacks {', '.join(missing)}")
        if kind == "perplexity" and spec.get("bos", "every_window") != "every_window":
            raise UsageError(f"{where}: perplexity metric {key!r}: bos may only be 'every_window'")
        if kind == "structure" and spec.get("field") not in STRUCTURE_FIELDS:
            raise UsageError(f"{where}: structure metric {key!r} needs field, one of {STRUCTURE_FIELDS}")
        metrics[key] = Metric(key, kind, spec)
    rows: Dict[str, Dict[str, Cell]] = {}
    for row, cells in (raw.get("rows") or {}).items():
        rows[row] = {}
        for key, cell in (cells or {}).items():
            if key not in metrics:
                raise UsageError(f"{where}: row {row!r} has a value for undeclared metric {key!r}")
            cell = dict(cell)
            source = cell.pop("source", None)
            deviation = cell.pop("known_deviation", None)
            values = {column: float(v) for column, v in cell.items()}
            rows[row][key] = Cell(values, source, deviation)
    for entry in raw.get("overrides", []):
        if not entry.get("reason"):
            raise UsageError(f"{where}: every tolerance override needs a reason: {entry}")
    for claim in raw.get("claims", []):
        if not {"id", "text", "lhs", "op", "rhs"} <= set(claim):
            raise UsageError(f"{where}: claim needs id, text, lhs, op, rhs: {claim}")
    return Profile(name=name, model=raw["model"], reference=raw.get("reference", "paper"),
                   sources=raw.get("sources", {}), metrics=metrics, rows=rows,
                   ppl_rel=float(raw.get("ppl_rel", PPL_REL_DEFAULT)),
                   overrides=list(raw.get("overrides", [])), claims=list(raw.get("claims", [])))


def available_methods() -> List[str]:
    return sorted(p.stem for p in TABLES.glob("*.yaml"))
