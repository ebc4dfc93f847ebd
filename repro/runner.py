"""`lpc repro <method>`: the plan of the rows (repro/plan.py), executed in this process tree.

Each step calls the stage its request is for, as `lpc prune|train|eval --request FILE` would: the
prune stage (repro/prune_stage.py), the train stage (training/stage.py; torchrun for several
processes), the evaluation stage (repro/eval_stage.py). Stage checkpoints live under the row's work
folder `<results>/<profile>/<method>/stages/<row>/{pruned,trained}` (`--work-dir W` puts them at
`W/<profile>/<method>/<row>`). A run killed in any stage resumes at the first unfinished one; a
finished stage is never redone. The dense row runs first and gates the rest: if the unpruned model
does not match its reference, pruned numbers would not be comparable, so the run stops and says so.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Optional

from methods.core.errors import UsageError
from repro import diff as differ
from repro import plan as planner
from repro.plan import DenseGateFailed, Step, check_device, select_rows, work_dir
from repro.recipe import load_recipe
from repro.requests import DENSE
from repro.tables import load_profile
from training.stage import StageFailed

__all__ = ["run", "DenseGateFailed", "StageFailed"]


def run(method: str, profile: str, *, results_root: Path, rows: Optional[List[str]] = None,
        recipe_path: Optional[Path] = None, dense_gate: bool = True, work_root: Optional[Path] = None,
        keep: str = "trained", eval_batch_size=None, rehearsal: bool = False, log=print) -> bool:
    """Run the missing rows, then print the diff. Returns True when the diff passes. `rehearsal`: the
    profile as repro/rehearsal.py cuts it, against the stand-in mirror."""
    recipe = load_recipe(method, profile, recipe_path, eval_batch_size=eval_batch_size, rehearsal=rehearsal)
    table = load_table(recipe)
    check_device(recipe)
    selected = select_rows(recipe, rows)
    steps = planner.plan(recipe, table, selected, results_root=results_root,
                         work=work_dir(results_root, profile, recipe.method, work_root),
                         dense_gate=dense_gate, log=log)
    check_engines(steps)  # a row no engine here can train is refused before any row runs
    cache: Dict[object, object] = {}
    for index, step in enumerate(steps):
        if not any(s.row == step.row for s in steps[:index]):
            log(f"[{recipe.method}/{profile}] {step.row}: running")
        execute(step, recipe=recipe, table=table, cache=cache, log=log)
        if step.stage == "eval":
            finished = [s.row for s in steps[:index + 1] if s.stage == "eval"]
            _discard(finished, steps[index + 1:], keep, work_dir(results_root, profile, recipe.method, work_root))
    return not differ.report(method, table, results_root, rows=selected, plots=True, log=log)


def load_table(recipe):
    """The recipe's table profile (for a rehearsal, with one window per perplexity metric)."""
    table = load_profile(recipe.method, recipe.profile, recipe.table)
    if recipe.rehearsal:
        from repro import rehearsal

        table = rehearsal.table_profile(table)
    return table


def check_engines(steps: List[Step]) -> None:
    """Every training stage's engine can run from here (MaxText: installed, or its environment named by
    LPC_MAXTEXT_PYTHON), or one line before anything runs: not after hours of other rows."""
    from training.stage import MAXTEXT_PYTHON_ENV, maxtext_command

    for step in steps:
        if step.stage == "train" and step.request.engine == "maxtext" and maxtext_command() is None:
            raise UsageError(f"row {step.row} trains with --engine maxtext, which this environment lacks (no "
                             f"maxtext here and {MAXTEXT_PYTHON_ENV} unset): point {MAXTEXT_PYTHON_ENV} at the MaxText "
                             "environment's python (.venv-maxtext/bin/python), run that row in the maxtext image "
                             "(--rows), or submit it (--submit skypilot --tpu ...); nothing was run")


def execute(step: Step, *, recipe, table, cache: Optional[dict] = None, log=print) -> None:
    """One step in this process (a training stage of several processes relaunches under torchrun)."""
    if step.stage == "prune":
        from repro import prune_stage

        # The work folder is the pipeline's own: a prune of other inputs left there is replaced.
        prune_stage.prune(step.request, overwrite=True, cache=cache, log=log)
    elif step.stage == "train":
        from training import stage

        code = stage.train(step.request, replace_stale=True, log=log)
        if code != 0:
            raise StageFailed(f"training of {recipe.method}/{step.row} exited with status {code}; "
                              f"rerun to resume from its last checkpoint ({step.request.out})")
    else:
        from repro import eval_stage

        request = step.request
        result = eval_stage.evaluate(recipe, table, request.row, model=request.model,
                                     results_root=request.results_dir, cache=cache, backend=request.backend, log=log)
        if request.gate and request.row == DENSE:
            planner.check_dense(table, result, log)


def _discard(rows: List[str], later: List[Step], keep: str, work: Path) -> None:
    """The stage checkpoints of finished rows that `keep` (all | trained | none) lets go of, except what
    a later step reads (a prune shared with a later row). Training is the expensive part (GPU days in
    the paper profile); a pruned checkpoint is quick to remake and as large as the model, so by default
    (trained) only trained ones stay."""
    if keep == "all":
        return
    needed = {path.resolve() for step in later for path in planner.reads(step)}
    for row in rows:
        folder = work / row
        for part in ("pruned", "trained") if keep == "none" else ("pruned",):
            if (folder / part).resolve() not in needed:
                shutil.rmtree(folder / part, ignore_errors=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if work.is_dir() and not any(work.iterdir()):
        work.rmdir()
