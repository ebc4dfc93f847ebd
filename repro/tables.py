"""Published numbers as data: `repro/tables/<method>.yaml`, one profile per setting.

A profile names the model, the sources, the metrics (one per table column: what to measure and how),
the rows (one per table row: the reference values of each cell), the claims the paper makes that a
reproduction should confirm, and the published figures (curves read point by point). The models below
are the schema (repro/tables/README.md describes it in prose); `load_profile` reads a file once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import AfterValidator, BeforeValidator, Field, PrivateAttr, model_validator

from methods.core.errors import UsageError
from repro.schema import Model, Num, SchemaError, explained, is_num, read_yaml, shown, validate
from repro.tolerance import PPL_REL_DEFAULT

TABLES = Path(__file__).resolve().parent / "tables"
# What a `structure` metric reads off the pruned model (repro.evaluate.structure_value).
# nm_2of4 / nm_4of8: the fraction of groups of M consecutive input weights (every row of every decoder
# projection) that hold at least N zeros; 1.0 exactly when the N:M pattern is intact.
STRUCTURE_FIELDS = ("parameters", "non_embedding_parameters", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "nm_2of4", "nm_4of8")
# Per metric kind: the keys it needs, then the ones it may add.
METRIC_KEYS = {"accuracy": (("task", "metric", "shots", "n"), ("split",)),
               "perplexity": (("data", "protocol", "seqlen"), ("max_windows", "bos")),
               "structure": (("field",), ("rel",))}
# Floating-point slack on band edges: a reading stored to 4 digits must not fail on the 16th.
EPS = 1e-9

NonNegative = Annotated[Num, Field(ge=0)]
# A block written as `key:` with nothing after it is an empty one.
_no_mapping = BeforeValidator(lambda value: {} if value is None else value)
_no_list = BeforeValidator(lambda value: [] if value is None else value)


def _reason(text: str, what: str) -> str:
    if not text.strip():
        raise ValueError(f"{what} needs a reason")
    return text


# ----------------------------------------------------------------------------- the table

class Metric(Model):
    """One column: accuracy (percent) | perplexity | structure (a count, exact by default)."""
    kind: Literal["accuracy", "perplexity", "structure"]
    task: Optional[str] = None
    metric: Optional[str] = None                  # the lm-eval metric key: acc or acc_norm
    shots: Optional[Annotated[int, Field(ge=0)]] = None
    n: Optional[Annotated[int, Field(gt=0)]] = None     # the size of the split the paper scored: sets the band
    split: Optional[str] = None
    data: Optional[str] = None
    protocol: Optional[Literal["windows", "rows"]] = None
    seqlen: Optional[Annotated[int, Field(gt=0)]] = None
    max_windows: Optional[Annotated[int, Field(gt=0)]] = None
    bos: Optional[Literal["every_window"]] = None
    field: Optional[Literal[STRUCTURE_FIELDS]] = None  # type: ignore[valid-type]
    rel: Optional[NonNegative] = None

    @model_validator(mode="after")
    def _keys_of_its_kind(self):
        needs, may = METRIC_KEYS[self.kind]
        missing = [k for k in needs if k not in self.model_fields_set]
        if missing:
            raise ValueError(f"{self.kind} metric lacks {', '.join(missing)}")
        foreign = sorted(self.model_fields_set - set(needs) - set(may) - {"kind"})
        if foreign:
            raise ValueError(f"{self.kind} metric does not take {', '.join(foreign)}")
        return self

    @property
    def spec(self) -> Dict[str, Any]:
        """The keys as written, less the kind: what the runner measures with (and fingerprints)."""
        return self.model_dump(exclude_unset=True, exclude={"kind"})


class Cell(Model):
    """column -> number (paper, collection, reference, ...), with the primary value's source."""
    model_config = {"extra": "allow"}
    __pydantic_extra__: Dict[str, float] = Field(init=False)
    source: Optional[str] = None                  # which `sources` entry the primary value comes from
    known_deviation: Optional[str] = None         # outside the band it reports KNOWN, with this reason

    @property
    def values(self) -> Dict[str, float]:
        return dict(self.__pydantic_extra__ or {})


class Override(Model):
    row: str                                      # a row id or "*"
    metric: str                                   # a metric key or "*"
    reason: Annotated[str, AfterValidator(lambda t: _reason(t, "every tolerance override"))] = Field(
        "", validate_default=True)
    abs: Optional[NonNegative] = None
    rel: Optional[NonNegative] = None
    z: Optional[Annotated[Num, Field(gt=0)]] = None

    @property
    def band(self) -> Dict[str, float]:
        """What repro.tolerance.band takes."""
        return self.model_dump(include={"abs", "rel", "z"}, exclude_none=True)


class ExpectedFailure(Model):
    reason: Annotated[str, AfterValidator(lambda t: _reason(t, "expected_failure"))] = Field(
        "", validate_default=True)
    measured: Any = None


class MetricRef(Model):
    row: str
    metric: str
    method: Optional[str] = None                  # default: the table's method


class Claim(Model):
    """`lhs op factor * rhs` over two cells of results, possibly of other methods."""
    id: str
    text: str
    lhs: MetricRef
    op: Literal["<", "<=", ">", ">="]
    rhs: MetricRef
    factor: float = 1.0
    expected_failure: Optional[ExpectedFailure] = None


# ----------------------------------------------------------------------------- figures

class Source(Model):
    """Where a series of ours comes from: one field of one result JSON."""
    model_config = {"frozen": True}
    row: str
    field: str                                    # dotted path into the JSON, e.g. prune.scores.candidates
    method: Optional[str] = None                  # default: the table's method
    profile: Optional[str] = None                 # default: the table's profile
    x_offset: Num = 0                             # x = list index + x_offset (Minitron: i + n, 1-indexed)
    scale: float = 1.0                            # e.g. 0.01 for a table metric in percent on a 0-1 axis
    transform: Optional[Literal["ln"]] = None     # the figure plots ln(ppl) ("validation loss")

    def owner(self, method: str, profile: str) -> Tuple[str, str]:
        return self.method or method, self.profile or profile


@dataclass(frozen=True)
class Reading:
    """One reading of a published curve: a point, or a range of x and/or y, with its half-width."""
    x0: Optional[float]                           # None: any x (a horizontal line, e.g. a baseline)
    x1: Optional[float]
    lo: float                                     # -inf / +inf for an open side ("off-chart, > 20")
    hi: float
    band: float

    def covers(self, x: float) -> bool:
        return self.x0 is None or self.x0 - EPS <= x <= self.x1 + EPS

    @property
    def is_point(self) -> bool:
        return self.x0 is not None and self.x0 == self.x1


class AbsBand(Model):
    abs: NonNegative

    def width(self, lo: float, hi: float) -> float:
        return float(self.abs)


class RelBand(Model):
    rel: NonNegative

    def width(self, lo: float, hi: float) -> float:
        return float(self.rel) * max((abs(v) for v in (lo, hi) if math.isfinite(v)), default=0.0)


def _ordered(name: str):
    def check(pair):
        lo, hi = (pair, pair) if not isinstance(pair, tuple) else pair
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        if lo > hi:
            raise ValueError(f"{name} range [{pair[0]}, {pair[1]}] runs backwards")
        return lo, hi
    return AfterValidator(check)


Band = Annotated[Union[AbsBand, RelBand], BeforeValidator(lambda v: {"abs": v} if is_num(v) else v),
                 explained("band must be a non-negative number, {abs: a} or {rel: r}")]
XRange = Annotated[Union[Num, Tuple[Num, Num]], explained("x must be a number or [low, high]"), _ordered("x")]
YRange = Annotated[Union[Num, Tuple[Optional[Num], Optional[Num]]],
                   explained("y must be a number or [low, high] (null: open)"), _ordered("y")]


class Point(Model):
    """A reading as written: [x, y], or {x, y, band} where x and y may be [low, high] ranges."""
    x: Optional[XRange] = None
    y: YRange
    band: Optional[Band] = None

    @model_validator(mode="before")
    @classmethod
    def _forms(cls, raw):
        if isinstance(raw, list):
            if len(raw) != 2 or not all(is_num(v) for v in raw):
                raise ValueError(f"a point is [x, y], got {shown(raw)}")
            return {"x": raw[0], "y": raw[1]}
        if not isinstance(raw, dict) or "y" not in raw or not set(raw) <= {"x", "y", "band"}:
            raise ValueError(f"a reading is [x, y] or {{x, y, band}}, got {shown(raw)}")
        return raw

    def reading(self, band) -> Reading:
        x0, x1 = self.x if self.x is not None else (None, None)
        lo, hi = self.y
        return Reading(x0, x1, lo, hi, (self.band or band).width(lo, hi))


# A column's readings; a bare number is a horizontal line at that value.
Column = Annotated[List[Point], BeforeValidator(lambda v: [{"y": v}] if is_num(v) else v), Field(min_length=1)]


class Series(Model):
    """One curve: readings per column (paper, collection, reference, ...) and where ours comes from."""
    model_config = {"extra": "allow"}
    __pydantic_extra__: Dict[str, Column] = Field(init=False)
    label: Optional[str] = None                   # default: the series id
    axis: Literal["left", "right"] = "left"
    band: Band = AbsBand(abs=0)                   # every reading's half-width unless it has its own
    ours: Optional[Source] = None
    note: str = ""                                # a known difference of protocol, shown beside the comparison
    # A measured contradiction of the gating reading (a claim read as a range): XFAIL / XPASS.
    expected_failure: Optional[ExpectedFailure] = None

    @model_validator(mode="after")
    def _has_readings(self):
        if not self.__pydantic_extra__:
            raise ValueError("has no readings (give at least one column such as paper or collection)")
        return self

    @property
    def columns(self) -> Dict[str, List[Reading]]:
        return {column: [p.reading(self.band) for p in points] for column, points in self.__pydantic_extra__.items()}


class Axis(Model):
    label: str = ""
    lim: Optional[Annotated[Tuple[Num, Num], explained("lim must be [low, high]")]] = None


class Axes(Model):
    left: Axis = Axis()
    right: Optional[Axis] = None


class FigureClaim(Model):
    """A claim on ours: argmax/argmin x, the top/bottom-k x set, or the field's values as a set."""
    id: str
    text: str
    of: Source
    op: Literal["argmax", "argmin", "top", "bottom", "set"]
    expect: Annotated[Union[Annotated[List[Num], Field(min_length=1)], Source],
                      explained("expect must be a non-empty list of numbers or an `ours`-style source")]
    expected_failure: Optional[ExpectedFailure] = None


class Figure(Model):
    title: Optional[str] = None                   # default: the figure id
    x_label: str = "x"
    axes: Axes = Axes()
    reference: Optional[str] = None               # the column that gates (default: the profile's reference)
    sources: Dict[str, str] = {}                  # column -> key of the profile's `sources` (default: same name)
    series: Annotated[Dict[str, Series], Field(min_length=1)]
    claims: Annotated[List[FigureClaim], _no_list] = []

    @model_validator(mode="after")
    def _axes_declared(self):
        for key, series in self.series.items():
            if getattr(self.axes, series.axis) is None:
                raise SchemaError(("series", key, "axis"), f"axis {series.axis!r} is not declared in the figure's axes")
        return self

    @property
    def columns(self) -> List[str]:
        return sorted({c for s in self.series.values() for c in s.columns})


# ----------------------------------------------------------------------------- a profile

class Profile(Model):
    model: str
    reference: str = "paper"                      # which column `delta` is taken against: paper | reference
    ppl_rel: Annotated[float, Field(gt=0)] = PPL_REL_DEFAULT
    sources: Annotated[Dict[str, str], _no_mapping] = {}
    metrics: Annotated[Dict[str, Metric], _no_mapping] = {}
    rows: Annotated[Dict[str, Annotated[Dict[str, Cell], _no_mapping]], _no_mapping] = {}
    overrides: Annotated[List[Override], _no_list] = []
    claims: Annotated[List[Claim], _no_list] = []
    figures: Annotated[Dict[str, Figure], _no_mapping] = {}
    _name: str = PrivateAttr("")

    @property
    def name(self) -> str:
        """The profile's name in its file (paper, smoke, ...)."""
        return self._name

    @model_validator(mode="after")
    def _references_resolve(self):
        """Checks across blocks, and the figures' defaults that come from the profile."""
        for row, cells in self.rows.items():
            for key in cells:
                if key not in self.metrics:
                    raise SchemaError(("rows", row, key), f"a value for undeclared metric {key!r}")
        for key, figure in self.figures.items():
            where = ("figures", key)
            for column in figure.columns:
                origin = figure.sources.get(column, column)
                if origin not in self.sources:
                    raise SchemaError(where, f"column {column!r} names source {origin!r}, which the profile's "
                                      "`sources` lacks")
            figure.reference = figure.reference or self.reference
            figure.title = figure.title or key
            if figure.reference not in figure.columns:
                raise SchemaError(where, f"gating column {figure.reference!r} has no readings (columns: "
                                  f"{', '.join(figure.columns) or 'none'})")
            sources = [(("series", s, "ours"), series.ours) for s, series in figure.series.items()]
            for i, claim in enumerate(figure.claims):
                sources += [(("claims", i, "of"), claim.of), (("claims", i, "expect"), claim.expect)]
            for loc, source in sources:
                own = isinstance(source, Source) and source.method is None and source.profile is None
                if own and source.row not in self.rows:
                    raise SchemaError(where + loc, f"`ours` names row {source.row!r}, which the profile lacks")
            for s, series in figure.series.items():
                series.label = series.label or s
        return self

    def override(self, row: str, metric: str) -> Optional[Override]:
        for entry in self.overrides:
            if entry.row in (row, "*") and entry.metric in (metric, "*"):
                return entry
        return None


def table_path(method: str) -> Path:
    return TABLES / f"{method}.yaml"


def load_profile(method: str, profile: str, path: Optional[Path] = None) -> Profile:
    path = Path(path) if path else table_path(method)
    if not path.is_file():
        raise UsageError(f"no table for method {method!r} ({path})")
    data = read_yaml(path, "table")
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, dict):
        raise UsageError(f"table {path.name} has no `profiles` mapping")
    if profile not in profiles:
        raise UsageError(f"table {path.name} has no profile {profile!r}; it has {', '.join(profiles)}")
    return parse_profile(profiles[profile], f"{path.name}:{profile}", profile)


def parse_profile(raw, where: str, name: str = "") -> Profile:
    """One profile's mapping as read from YAML; `where` (file:profile) starts any error line."""
    table = validate(Profile, raw, where)
    table._name = name
    return table


def available_methods() -> List[str]:
    return sorted(p.stem for p in TABLES.glob("*.yaml"))
