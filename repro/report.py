"""`make report`: the stored results as a page (docs/results.md), written from the result files, so that
no measured figure of the docs is pasted by hand.

    python -m repro.report --results-dir results/reference --out docs/results.md

For every profile and method with results: where the references come from (the kit's run, its commit
and machine), and one table of every row's metrics, each with its tolerance band from the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from repro import diff as differ
from repro.figures import num
from repro.tables import available_methods, load_profile

HEADER = ("<!-- Written by `make report` (python -m repro.report) from {root}: do not edit by hand. -->\n\n"
          "# Stored results\n\nEvery stored result of `{root}`, by profile and method. `lpc diff` compares a "
          "run with these ([diff.md](diff.md)); the bands are the tables' (`repro/tables/`), a band wider "
          "than the profile's default citing the measured spread it covers "
          "([deviations.md](deviations.md#results-across-machines)).\n")


def render(root: Path) -> str:
    from tabulate import tabulate

    parts = [HEADER.format(root=root)]
    for profile in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for method in available_methods():
            folder = differ.results_dir(root, profile, method)
            if not folder.is_dir() or not any(folder.glob("*.json")):
                continue
            table = load_profile(method, profile)
            cells = differ.diff_cells(table, differ.load_results(root, profile, method))
            rows = [[c.row, c.metric, num(c.ours), "" if c.tolerance is None else f"±{c.tolerance:.3g}", c.status]
                    for c in cells if c.ours is not None]
            origin = differ.reference_origin(method, profile, root)
            parts.append(f"## {method} [{profile}]\n\n" + "\n".join(f"* {line}" for line in origin) + "\n\n"
                         + tabulate(rows, headers=["row", "metric", "value", "band", "status"], tablefmt="github")
                         + "\n")
    return "\n".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=Path("results/reference"))
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"python -m repro.report: no results under {args.results_dir}", file=sys.stderr)
        return 2
    from methods.core.results import write_text_atomic

    write_text_atomic(args.out, render(args.results_dir))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

