"""One plan for a method's rows, whether they run here (repro/runner.py) or are submitted (repro/submit.py).

For each selected row, dense first:

    done already (its result's fingerprint matches)     nothing to do (the dense result is gated at once)
    the same dense model and protocol as another's      that result is reused (and gated)
    otherwise                                           prune -> train (rows with `train:`) -> eval

and a stage whose output already holds its manifest for these inputs is left out. Rows that prune
alike (an untrained row and its trained variants) share one prune: the later rows read the first's
output. The dense row's evaluation gates every other row's first stage; a final diff waits for every
evaluation. Each step carries its request (repro/requests.py; training's TrainOptions), the very value
the stage command reads back from a request file when the step is submitted as a job.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from methods.core.errors import UsageError
from methods.core.identity import PRUNE_MANIFEST, read_manifest
from methods.core.results import read_json, write_json_atomic
from repro import diff as differ
from repro.prune_stage import prune_fingerprint
from repro.recipe import Recipe
from repro.requests import DENSE, EvalRequest
from repro.tables import Profile


class DenseGateFailed(Exception):
    """The unpruned model is off its reference; pruning results would not be comparable."""


@dataclass(eq=False)
class Step:
    stage: str                        # prune | train | eval
    row: str
    request: Any                      # PruneRequest | TrainOptions | EvalRequest
    after: List["Step"] = field(default_factory=list)
    stale: bool = False               # its output folder holds another run's output, to be replaced

    @property
    def name(self) -> str:
        return f"{self.row}-{self.stage}"


def plan(recipe: Recipe, table: Profile, rows: List[str], *, results_root: Path, work: Path, dense_gate: bool = True,
         log: Callable[[str], None] = print) -> List[Step]:
    """The steps of the unfinished stages of `rows` (module docstring), in an order that runs them."""
    from repro.eval_stage import metric_specs
    from training import stage as train_stage

    measures = metric_specs(table)
    results = Path(results_root).resolve()
    steps: List[Step] = []
    gate: Optional[Step] = None
    prunes: Dict[str, Step] = {}      # prune fingerprint -> the step (or output) that makes it
    for row in rows:
        where = f"[{recipe.method}/{recipe.profile}] {row}"
        path = differ.results_dir(results, recipe.profile, recipe.method) / f"{row}.json"
        stamp = recipe.fingerprint(row, measures)
        if finished(path, stamp):
            log(f"{where}: done already ({path})")
            if row == DENSE and dense_gate:
                check_dense(table, read_json(path), log)
            continue
        shared = shared_dense(results, recipe.profile, stamp) if row == DENSE else None
        if shared is not None:
            write_json_atomic(path, {**read_json(shared), "method": recipe.method})
            log(f"{where}: same dense model and protocol as {shared}, reused")
            if dense_gate:
                check_dense(table, read_json(path), log)
            continue
        previous = [gate] if gate is not None and row != DENSE else []
        model = recipe.config["model"]
        if row != DENSE:
            request = recipe.prune_request(row, out=work / row / "pruned")
            pruned = prune_fingerprint(request)
            if pruned in prunes:                   # another row prunes alike: read its output
                source = prunes[pruned]
                if isinstance(source, Step):
                    request, previous = source.request, [source]
                else:
                    request = dataclasses.replace(request, out=source)
                log(f"{where}: the same prune as {Path(request.out).parent.name}, shared")
            elif _pruned_already(request.out, pruned):
                log(f"{request.out}: pruned already (prune.json matches these inputs)")
                prunes[pruned] = Path(request.out)
            else:
                step = Step("prune", row, request, after=previous)
                steps.append(step)
                prunes[pruned] = step
                previous = [step]
            model = str(request.out)
            options = recipe.train_options(row, model=model, out=work / row / "trained")
            if options is not None:
                state = train_stage.state(options.out, train_stage.train_identity(options, pruned=pruned)[0])
                if state != "done":
                    steps.append(Step("train", row, options, after=previous, stale=state == "stale"))
                    previous = [steps[-1]]
                else:
                    log(f"{options.out}: trained already (train.json matches these inputs)")
                model = options.out
        evaluation = Step("eval", row, EvalRequest(
            method=recipe.method, profile=recipe.profile, row=row, model=str(model), results_dir=results,
            recipe=recipe.path, eval_batch_size=recipe.config.get("batch_size"), gate=row == DENSE and dense_gate,
            rehearsal=recipe.rehearsal),
            after=previous)
        steps.append(evaluation)
        if row == DENSE and dense_gate:
            gate = evaluation
    return steps


def reads(step: Step) -> List[Path]:
    """The stage outputs a step reads (its input checkpoint, when another stage wrote it)."""
    if step.stage == "prune":
        return []
    return [Path(step.request.model)]


def writes(step: Step) -> Optional[Path]:
    return None if step.stage == "eval" else Path(step.request.out)


def _pruned_already(out: Path, fingerprint: str) -> bool:
    manifest = read_manifest(out, PRUNE_MANIFEST)
    return manifest is not None and manifest.get("fingerprint") == fingerprint


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


def work_dir(results_root: Path, profile: str, method: str, work_root: Optional[Path] = None) -> Path:
    """Where a method's rows keep their stage checkpoints (absolute: stage manifests record paths)."""
    if work_root is not None:
        return (Path(work_root) / profile / method).resolve()
    return (differ.results_dir(results_root, profile, method) / "stages").resolve()


def check_device(recipe: Recipe) -> None:
    device = recipe.config.get("device", "cpu")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"profile {recipe.profile!r} needs a CUDA GPU and none is visible; "
                         "on this machine run PROFILE=smoke")
