"""Published figures as data: per-layer / per-candidate curves, read from results, compared point by point
with the published readings, and plotted.

A table profile (repro/tables/<method>.yaml) may hold a `figures:` block (schema: repro/tables.py and
repro/tables/README.md). A figure has series; a series has readings per column (`paper`,
`collection`, `reference`: each a list of points or x-ranges with a band) and names where ours comes
from: a result row and a field of its JSON (e.g. `prune.scores.block_influence`), with the x-axis
convention of the figure (x = list index + x_offset). What is specific to curves lives here: reading
ours out of a result, the band arithmetic of one curve against its readings, and the plots. The
statuses, the claims on curves and the report are repro/diff.py's, shared with the tables.
"""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from methods.core.results import read_json
from repro.schema import is_num
from repro.tables import EPS, Figure, Reading, Source

Points = Dict[float, Optional[float]]   # x -> y of ours (None: the score was not finite)


# ----------------------------------------------------------------------------- ours, from result JSON

def result_path(source: Source, root: Path, method: str, profile: str) -> Path:
    owner_method, owner_profile = source.owner(method, profile)
    return Path(root) / owner_profile / owner_method / f"{source.row}.json"


def resolve(source: Source, root: Path, method: str, profile: str):
    """The values a source names: a list (a curve), a number (a line), or None when absent."""
    path = result_path(source, root, method, profile)
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
    return _convert(source, value) if is_num(value) else None


def _convert(source: Source, value) -> Optional[float]:
    if not is_num(value) or not math.isfinite(value):
        return None
    value = float(value) * source.scale
    if source.transform == "ln":
        return math.log(value) if value > 0 else None
    return value


# ----------------------------------------------------------------------------- one curve against its readings

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
                where = f"x={num(reading.x0)}" if reading.is_point else f"x in [{num(reading.x0)}, {num(reading.x1)}]"
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


def reading_text(reading: Reading) -> str:
    if reading.lo == reading.hi:
        return f"{reading.lo:.4g}"
    return f"[{num(reading.lo)}, {num(reading.hi)}]"


def num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


# ----------------------------------------------------------------------------- plots

# Published readings wide and pale underneath, ours thin on top: where they agree both stay visible.
COLUMN_STYLE = {"paper": dict(linestyle=":", marker="^", markersize=6, linewidth=1.5, alpha=0.6),
                "collection": dict(linestyle="--", marker="s", markersize=7, linewidth=2.5, alpha=0.4),
                "reference": dict(linestyle="--", marker="s", markersize=7, linewidth=2.5, alpha=0.4)}
OTHER_STYLE = dict(linestyle="-.", marker="x", markersize=6, linewidth=1.5, alpha=0.6)
OURS_STYLE = dict(linestyle="-", marker="o", markersize=3, linewidth=1.3, zorder=3)


def write_plots(figures: Dict[str, Figure], ours: Dict[Tuple[str, str], object], out_dir: Path) -> List[Path]:
    """One PNG per figure: every column's readings (points, ranges as boxes) and ours on top.

    Plots are a convenience on top of the comparison: an environment without matplotlib (the
    `sparse` image has no figures to draw) gets one line on stderr instead of a failed run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("lpc: matplotlib is not installed; figures compared but not drawn", file=sys.stderr)
        return []
    written = []
    for key, figure in figures.items():
        path = Path(out_dir) / f"{key}.png"
        plot_figure(figure, {s: ours.get((key, s)) for s in figure.series}, path)
        written.append(path)
    return written


def plot_figure(figure: Figure, ours: Dict[str, object], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and the same pixels on every machine
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(9, 4.2))
    axes = {"left": left}
    if figure.axes.right is not None:
        axes["right"] = left.twinx()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for index, (key, series) in enumerate(figure.series.items()):
        colour = colours[index % len(colours)]
        ax = axes[series.axis]
        for column, readings in series.columns.items():
            handles += _draw_readings(ax, readings, colour, f"{series.label} ({column})",
                                      COLUMN_STYLE.get(column, OTHER_STYLE))
        handles += _draw_ours(ax, ours.get(key), colour, f"{series.label} (ours)")
    for name, ax in axes.items():
        spec = getattr(figure.axes, name)
        ax.set_ylabel(spec.label)
        if spec.lim:
            ax.set_ylim(*spec.lim)
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
