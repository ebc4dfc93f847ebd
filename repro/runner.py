"""`lpc repro <method>`: every row of the recipe as a pipeline of stages, top to bottom.

For each row not already done: prune (every row but the dense one) -> train (rows with `train:`) ->
evaluate, each stage reading the checkpoint the previous one wrote (repro/stages.py) under the row's
work folder `<results>/<profile>/<method>/stages/<row>/{pruned,trained}` (`--work-dir W` puts it at
`W/<profile>/<method>/<row>`), and the last writing results/<profile>/<method>/<row>.json atomically.
A run killed in any stage resumes at the first unfinished one; a finished stage is never redone.
The dense row runs first and gates the rest: if the unpruned model does not match its reference,
pruned numbers would not be comparable, so the run stops and says so.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch

from methods.errors import UsageError
from repro import diff as differ
from repro import stages
from repro.recipe import DENSE, Recipe, load_recipe
from repro.results import read_json, write_json_atomic
from repro.stages import StageFailed
from repro.tables import Profile, load_profile

STAGES = "stages"


class DenseGateFailed(Exception):
    """The unpruned model is off its reference; pruning results would not be comparable."""


def work_dir(results_root: Path, profile: str, method: str, work_root: Optional[Path] = None) -> Path:
    """Where a method's rows keep their stage checkpoints (absolute: stage manifests record paths)."""
    if work_root is not None:
        return (Path(work_root) / profile / method).resolve()
    return (differ.results_dir(results_root, profile, method) / STAGES).resolve()


def run(method: str, profile: str, *, results_root: Path, rows: Optional[List[str]] = None,
        recipe_path: Optional[Path] = None, dense_gate: bool = True, work_root: Optional[Path] = None,
        keep: str = "trained", eval_batch_size=None, log=print) -> bool:
    """Run the missing rows, then print the diff. Returns True when the diff passes."""
    recipe = load_recipe(method, profile, recipe_path, eval_batch_size=eval_batch_size)
    table = load_profile(method, profile, recipe.table)
    check_device(recipe)
    selected = select_rows(recipe, rows)
    out_dir = differ.results_dir(results_root, profile, method)
    work = work_dir(results_root, profile, method, work_root)
    measures = stages.metric_specs(table)
    cache: Dict[object, object] = {}
    ran: List[str] = []
    for index, row in enumerate(selected):
        path = out_dir / f"{row}.json"
        fingerprint = recipe.fingerprint(row, measures)
        shared = shared_dense(results_root, profile, fingerprint) if row == DENSE else None
        if finished(path, fingerprint):
            log(f"[{method}/{profile}] {row}: done already ({path})")
        elif shared is not None:
            write_json_atomic(path, {**read_json(shared), "method": method})
            log(f"[{method}/{profile}] {row}: same dense model and protocol as {shared}, reused")
        else:
            log(f"[{method}/{profile}] {row}: running")
            run_row(recipe, table, row, work / row, results_root=results_root, cache=cache, log=log)
            ran.append(row)
            later = [r for r in selected[index + 1:]
                     if not finished(out_dir / f"{r}.json", recipe.fingerprint(r, measures))]
            _discard(recipe, work, ran, later, keep)
        if row == DENSE and dense_gate:
            check_dense(table, read_json(path), log)
    return not differ.report(method, table, results_root, rows=selected, plots=True, log=log)


def run_row(recipe: Recipe, table: Profile, row: str, folder: Path, *, results_root: Path,
            cache: Optional[dict] = None, log=print) -> dict:
    """One row's stages, each skipped when its manifest says it is done; returns the result."""
    model = recipe.config["model"]
    if row != DENSE:
        request = recipe.prune_request(row, out=folder / "pruned")
        _share_prune(request, folder.parent, log)
        # The work folder is the pipeline's own: a prune of other inputs left there is replaced.
        stages.prune(request, overwrite=True, cache=cache, log=log)
        model = str(request.out)
        options = recipe.train_options(row, model=model, out=folder / "trained")
        if options is not None:
            code = stages.train(options, replace_stale=True, log=log)
            if code != 0:
                raise StageFailed(f"training of {recipe.method}/{row} exited with status {code}; "
                                  f"rerun to resume from its last checkpoint ({options.out})")
            model = options.out
    return stages.evaluate(recipe, table, row, model=model, results_root=results_root, cache=cache, log=log)


def _share_prune(request, work: Path, log) -> None:
    """Rows that prune alike (an untrained row and its trained variants) prune once: another row's
    finished prune of the same inputs is hard-linked into this row's folder (copied across devices)."""
    stamp = stages.prune_fingerprint(request)
    out = Path(request.out)
    mine = stages.read_manifest(out, stages.PRUNE_MANIFEST)
    if mine is not None and mine.get("fingerprint") == stamp:
        return
    for manifest in sorted(work.glob(f"*/pruned/{stages.PRUNE_MANIFEST}")):
        if manifest.parent == out or stages.read_manifest(manifest.parent, stages.PRUNE_MANIFEST).get("fingerprint") != stamp:
            continue
        staging = out.parent / f".{out.name}.linking"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(manifest.parent, staging, copy_function=_link_or_copy)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        log(f"{out}: the same prune as {manifest.parent}, linked")
        return


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def check_device(recipe: Recipe) -> None:
    device = recipe.config.get("device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"profile {recipe.profile!r} needs a CUDA GPU and none is visible; "
                         "on this machine run PROFILE=smoke")


def _discard(recipe: Recipe, work: Path, ran: List[str], later: List[str], keep: str) -> None:
    """Stage checkpoints of the rows run so far that `keep` (all | trained | none) lets go of, except a
    prune that a later row of this run will share (`_share_prune`). Training is the expensive part
    (GPU days in the paper profile); a pruned checkpoint is quick to remake and as large as the model,
    so by default (trained) only trained ones stay."""
    if keep == "all":
        return
    needed = {stages.prune_fingerprint(recipe.prune_request(r, out=work / r / "pruned")) for r in later if r != DENSE}
    for row in ran:
        folder = work / row
        pruned = stages.read_manifest(folder / "pruned", stages.PRUNE_MANIFEST)
        if pruned is not None and pruned.get("fingerprint") in needed:
            continue
        if keep == "none":
            shutil.rmtree(folder, ignore_errors=True)
            continue
        shutil.rmtree(folder / "pruned", ignore_errors=True)
    for empty in (work / row for row in ran):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def select_rows(recipe: Recipe, rows: Optional[List[str]]) -> List[str]:
    unknown = [r for r in rows or () if r not in recipe.rows]
    if unknown:
        raise UsageError(f"unknown row {', '.join(unknown)}; recipe rows: {', '.join(recipe.rows)}")
    chosen = [r for r in recipe.rows if not rows or r in rows]
    # The dense gate always runs first, whatever the order of the recipe.
    return sorted(chosen, key=lambda r: r != DENSE)


def shared_dense(results_root: Path, profile: str, fingerprint: str) -> Optional[Path]:
    for path in sorted(Path(results_root).glob(f"{profile}/*/{DENSE}.json")):
        if finished(path, fingerprint):
            return path
    return None


def finished(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    return read_json(path).get("fingerprint") == fingerprint


def check_dense(table: Profile, result: dict, log=print) -> None:
    if DENSE not in table.rows:
        return
    cells = differ.diff_cells(table, {DENSE: result}, rows=[DENSE])
    bad = [c for c in cells if c.status in differ.FAILING]
    if bad:
        detail = "; ".join(f"{c.metric}: ours {c.ours} vs {c.reference} (±{c.tolerance})" for c in bad)
        raise DenseGateFailed(f"dense model is off its reference before any pruning: {detail}. "
                              "Fix the environment (model revision, dtype, harness) first, "
                              "or rerun with --no-dense-gate to continue anyway.")
    log(f"dense gate: {len(cells)} cells within tolerance")
