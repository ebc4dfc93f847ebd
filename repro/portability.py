"""Results across machines: one machine emulating others, to measure how far a smoke row moves.

A CPU's float rounding is decided by the kernels that run, not only by the CPU: torch's ATen kernels
(compiled per instruction set: AVX-512, AVX2, or the portable default), MKL's code path (its
instruction set, its conditional-numerical-reproducibility mode), oneDNN's ISA, and the thread count
that splits reductions. Each can be forced on one machine, so one machine stands in for several;
`EMULATIONS` is the matrix measured (README, "Results across machines"). Emulation may understate
what a real second machine does, so results of other machines can be added to a spread as they are.

    python -m repro.portability prune wanda --rows 2of4,4of8 --out DIR [--compute-dtype float32]
        each row's prune stage under every emulation (a subprocess each): are the checkpoints
        identical, and where not, what fraction of weights (zeros, for sparse methods) differs
    python -m repro.portability rows wanda --out DIR [--machine NAME=RESULTS_DIR ...]
        every row end to end under every emulation (`lpc repro` in a subprocess each); writes
        DIR/spread-<method>.json: per row and metric every value, the stored reference and the spread

The smoke tables' bands cite these files (results/reference/smoke/spread/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
THREADS = "2"
# name -> the environment that forces it. "native" is this machine as it is, at a fixed thread count.
EMULATIONS: Dict[str, Dict[str, str]] = {
    "native": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "1-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "4-threads": {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"},
}


def emulation_env(name: str) -> Dict[str, str]:
    if name not in EMULATIONS:
        raise SystemExit(f"unknown emulation {name!r}; known: {', '.join(EMULATIONS)}")
    env = {k: v for k, v in os.environ.items() if k not in {key for e in EMULATIONS.values() for key in e}}
    env.update({"OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "PYTHONPATH": str(REPO),
                "HF_HUB_OFFLINE": "1", **EMULATIONS[name]})
    return env


def _run(args: Sequence[str], env: Dict[str, str], log) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: a diff that failed, which the spread is there to show
        raise SystemExit(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    log(f"  {' '.join(args[2:5])} ... {seconds:.0f} s")
    return seconds


# ----------------------------------------------------------------------------- prune stages

def prune_row(method: str, row: str, out: Path, compute_dtype: Optional[str]) -> None:
    """The row's prune stage as the smoke recipe prescribes it (compute dtype optionally replaced)."""
    import dataclasses

    from repro import prune_stage
    from repro.recipe import load_recipe

    request = load_recipe(method, "smoke").prune_request(row, out=out)
    if compute_dtype is not None:
        request = dataclasses.replace(request, compute_dtype=compute_dtype)
    prune_stage.prune(request, overwrite=True)


def compare_checkpoints(folders: Dict[str, Path]) -> Dict[str, dict]:
    """Each folder's weights against the first's: identical, or the fraction of elements (and of zero
    positions) that differ, and whether the shapes (the kept structure) agree."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> Dict[str, "torch.Tensor"]:
        out: Dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    names = list(folders)
    base = tensors(folders[names[0]])
    report = {names[0]: {"identical": True}}
    for name in names[1:]:
        other = tensors(folders[name])
        shapes = base.keys() == other.keys() and all(base[k].shape == other[k].shape for k in base)
        if not shapes:
            report[name] = {"identical": False, "same_shapes": False}
            continue
        total = sum(t.numel() for t in base.values())
        values = sum(int((base[k] != other[k]).sum()) for k in base)
        zeros = sum(int(((base[k] == 0) != (other[k] == 0)).sum()) for k in base)
        report[name] = {"identical": values == 0, "same_shapes": True, "values_differing": values / total,
                        "zeros_differing": zeros / total}
    return report


def prune_matrix(method: str, rows: List[str], out: Path, emulations: List[str], compute_dtype: Optional[str],
                 log=print) -> dict:
    summary = {}
    for row in rows:
        folders = {}
        log(f"{method}/{row}:")
        for emulation in emulations:
            folder = out / emulation / method / row
            args = ["-m", "repro.portability", "_prune-row", method, row, str(folder)]
            _run(args + (["--compute-dtype", compute_dtype] if compute_dtype else []), emulation_env(emulation), log)
            folders[emulation] = folder
        summary[row] = compare_checkpoints(folders)
        log(f"  {json.dumps(summary[row])}")
    return summary


# ----------------------------------------------------------------------------- whole rows

def row_matrix(method: str, rows: Optional[List[str]], out: Path, emulations: List[str],
               machines: Dict[str, Path], log=print) -> dict:
    """`lpc repro` of the rows under every emulation, then the spread of every table cell over every
    emulation whose results are under `out` (earlier runs' included: the matrix can be filled in parts)."""
    from repro.diff import load_results
    from repro.tables import load_profile

    seconds = {}
    for emulation in emulations:
        args = ["-m", "repro.cli", "repro", method, "--profile", "smoke", "--results-dir", str(out / emulation)]
        seconds[emulation] = _run(args + (["--rows", ",".join(rows)] if rows else []), emulation_env(emulation), log)
    values: Dict[str, Dict[str, dict]] = {name: load_results(out / name, "smoke", method) for name in EMULATIONS
                                          if (out / name / "smoke" / method).is_dir()}
    for name, folder in machines.items():
        values[name] = {p.stem: json.loads(p.read_text()) for p in Path(folder).glob("*.json")}
    table = load_profile(method, "smoke")
    cells = {}
    for row, metrics in table.rows.items():
        for metric, cell in metrics.items():
            reference = cell.values.get("reference")
            measured = {name: results[row]["metrics"].get(metric) for name, results in values.items()
                        if row in results and isinstance(results[row].get("metrics", {}).get(metric), (int, float))}
            if not measured:
                continue
            entry: dict = {"values": measured, "reference": reference}
            if reference:
                deviations = [(v - reference) / abs(reference) for v in measured.values()]
                entry.update(rel_min=min(deviations), rel_max=max(deviations),
                             abs_max=max(abs(v - reference) for v in measured.values()))
            cells[f"{row}/{metric}"] = entry
    return {"method": method, "emulations": {e: EMULATIONS[e] for e in values if e in EMULATIONS},
            "machines": {name: str(folder) for name, folder in machines.items()},
            "seconds": seconds, "cells": cells}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repro.portability", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prune", "rows"):
        command = sub.add_parser(name)
        command.add_argument("method")
        command.add_argument("--rows", help="comma-separated rows (default: all)")
        command.add_argument("--out", type=Path, required=True)
        command.add_argument("--emulations", default=",".join(EMULATIONS))
    sub.choices["prune"].add_argument("--compute-dtype", help="instead of the recipe's")
    sub.choices["rows"].add_argument("--machine", action="append", default=[], metavar="NAME=DIR",
                                     help="another machine's result files of this method's rows")
    one = sub.add_parser("_prune-row")  # the child process of `prune`
    one.add_argument("method")
    one.add_argument("row")
    one.add_argument("out", type=Path)
    one.add_argument("--compute-dtype")
    args = parser.parse_args(argv)
    if args.command == "_prune-row":
        prune_row(args.method, args.row, args.out, args.compute_dtype)
        return 0
    from repro.recipe import DENSE, load_recipe

    recipe = load_recipe(args.method, "smoke")
    emulations = args.emulations.split(",")
    rows = args.rows.split(",") if args.rows else None
    if args.command == "prune":
        chosen = [r for r in (rows or recipe.rows) if r != DENSE]
        report = prune_matrix(args.method, chosen, args.out, emulations, args.compute_dtype)
        name = f"prune-{args.method}.json"
    else:
        machines = dict(item.split("=", 1) for item in args.machine)
        report = row_matrix(args.method, rows, args.out, emulations, {k: Path(v) for k, v in machines.items()})
        name = f"spread-{args.method}.json"
    from methods.core.results import write_json_atomic

    write_json_atomic(args.out / name, report)
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
