"""`lpc repro <method>`: the whole data flow of one reproduction, top to bottom.

For each row of the recipe not already done: load the model, draw the calibration tokens, prune,
evaluate every metric of the method's table, write results/<profile>/<method>/<row>.json atomically.
The dense row runs first and gates the rest: if the unpruned model does not match its reference,
pruned numbers would not be comparable, so the run stops and says so.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Dict, List, Optional

import numpy as np
import torch
from pydantic import BeforeValidator, Field

import methods
from methods.errors import UsageError
from repro import diff as differ
from repro.evaluate import evaluate_metrics
from repro.models import load_model
from repro.provenance import provenance
from repro.results import read_json, write_json_atomic
from repro.schema import Model, read_yaml, validate
from repro.tables import Profile, load_profile

RECIPES = Path(__file__).resolve().parent / "recipes"
DENSE = "dense"


class DenseGateFailed(Exception):
    """The unpruned model is off its reference; pruning results would not be comparable."""


@dataclass
class Recipe:
    method: str
    profile: str
    config: dict                     # model, dtype, calibration, device, batch_size
    rows: Dict[str, dict]            # row id -> method options ({} for the dense row)
    table: Path

    def fingerprint(self, row: str, metrics: Dict[str, dict]) -> str:
        """Identity of a row's inputs: a finished result counts only if this still matches.

        The dense row does not depend on the method (only calibration and recovery are method-specific,
        and the dense row uses neither), so every method's recipe shares one dense result per profile.
        """
        config = {k: v for k, v in self.config.items() if row != DENSE or k not in ("calibration", "recovery")}
        identity = {"config": config, "options": self.rows[row], "metrics": metrics}
        if row != DENSE:
            identity["method"] = self.method
        blob = json.dumps(identity, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class RecipeCalibration(Model):
    spec: str                        # a dataset spec or file, as `lpc prune --calib` takes it
    nsamples: Annotated[int, Field(gt=0)]
    seqlen: Annotated[int, Field(gt=0)]
    seed: Optional[int] = None


class RecipeProfile(Model):
    """One profile of repro/recipes/<method>.yaml: what to load, how to calibrate, the rows to run."""
    # Absent keys stay absent (the run's defaults apply): the config is part of every row's fingerprint.
    model: str
    revision: Optional[str] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    batch_size: Optional[Annotated[int, Field(gt=0)]] = None
    limit: Optional[Annotated[int, Field(gt=0)]] = None   # lm-eval examples per task (smoke runs)
    calibration: Optional[RecipeCalibration] = None
    recovery: Optional[Dict[str, Any]] = None             # training.recover checks its own keys
    table: Optional[str] = None                           # a table file, relative to the recipe
    # row id -> method options ({} for the dense row); methods.make_options checks them
    rows: Annotated[Dict[str, Annotated[Dict[str, Any], BeforeValidator(lambda v: {} if v is None else v)]],
                    Field(min_length=1)]


class RecipeFile(Model):
    method: Optional[str] = None
    table: Optional[str] = None                           # the table's name (default: the method)
    profiles: Dict[str, Any]                              # validated one at a time, as a run reads one


def load_recipe(method: str, profile: str, path: Optional[Path] = None) -> Recipe:
    path = Path(path) if path else RECIPES / f"{method}.yaml"
    if not path.is_file():
        raise UsageError(f"no recipe for method {method!r} ({path})")
    data = validate(RecipeFile, read_yaml(path, "recipe") or {}, path.name)
    if profile not in data.profiles:
        raise UsageError(f"recipe {path.name} has no profile {profile!r}; it has {', '.join(data.profiles)}")
    raw = validate(RecipeProfile, data.profiles[profile], f"{path.name}:{profile}")
    config = raw.model_dump(exclude_unset=True, exclude={"rows", "table"})
    table = path.parent / (raw.table or f"../tables/{data.table or method}.yaml")
    return Recipe(data.method or method, profile, config, raw.rows, table.resolve())


def run(method: str, profile: str, *, results_root: Path, rows: Optional[List[str]] = None,
        recipe_path: Optional[Path] = None, dense_gate: bool = True, log=print) -> bool:
    """Run the missing rows, then print the diff. Returns True when the diff passes."""
    recipe = load_recipe(method, profile, recipe_path)
    table = load_profile(method, profile, recipe.table)
    device = recipe.config.get("device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"profile {profile!r} needs a CUDA GPU and none is visible; "
                         "on this machine run PROFILE=smoke")
    selected = _select_rows(recipe, rows)
    out_dir = differ.results_dir(results_root, profile, method)
    measures = {key: {"kind": m.kind, **m.spec} for key, m in table.metrics.items()}
    cache: Dict[str, object] = {}
    for row in selected:
        path = out_dir / f"{row}.json"
        fingerprint = recipe.fingerprint(row, measures)
        shared = _shared_dense(results_root, profile, fingerprint) if row == DENSE else None
        if _finished(path, fingerprint):
            log(f"[{method}/{profile}] {row}: done already ({path})")
        elif shared is not None:
            write_json_atomic(path, {**read_json(shared), "method": method})
            log(f"[{method}/{profile}] {row}: same dense model and protocol as {shared}, reused")
        else:
            log(f"[{method}/{profile}] {row}: running")
            result = run_row(recipe, table, row, cache)
            result["fingerprint"] = fingerprint
            write_json_atomic(path, result)
            log(f"[{method}/{profile}] {row}: {json.dumps(result['metrics'])}")
        if row == DENSE and dense_gate:
            _check_dense(table, read_json(path), log)
    return not differ.report(method, table, results_root, rows=selected, plots=True, log=log)


def _select_rows(recipe: Recipe, rows: Optional[List[str]]) -> List[str]:
    unknown = [r for r in rows or () if r not in recipe.rows]
    if unknown:
        raise UsageError(f"unknown row {', '.join(unknown)}; recipe rows: {', '.join(recipe.rows)}")
    chosen = [r for r in recipe.rows if not rows or r in rows]
    # The dense gate always runs first, whatever the order of the recipe.
    return sorted(chosen, key=lambda r: r != DENSE)


def _shared_dense(results_root: Path, profile: str, fingerprint: str) -> Optional[Path]:
    for path in sorted(Path(results_root).glob(f"{profile}/*/{DENSE}.json")):
        if _finished(path, fingerprint):
            return path
    return None


def _finished(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    return read_json(path).get("fingerprint") == fingerprint


def _check_dense(table: Profile, result: dict, log) -> None:
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


def run_row(recipe: Recipe, table: Profile, row: str, cache: Dict[str, object]) -> dict:
    config = recipe.config
    options = dict(recipe.rows[row])
    recover = options.pop("recover", None)   # recovery training after pruning (recipe `recovery:`)
    seed = int(config.get("calibration", {}).get("seed", 0))
    seed_everything(seed)
    stages: Dict[str, dict] = {}
    with _stage("load", stages):
        model, tokenizer = load_model(config["model"], dtype=config.get("dtype", "float32"),
                                      revision=config.get("revision"))
    report = None
    calib_info = None
    if row != DENSE:
        method = methods.get(recipe.method)
        calib = None
        if method.needs_calibration:
            with _stage("calibration", stages):
                calib = _calibration(config["calibration"], tokenizer, cache)
            calib_info = {**config["calibration"], "shape": list(calib.shape),
                          "sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest()}
        with _stage("prune", stages):
            report = methods.prune(model, recipe.method, calib, device=config.get("device"),
                                   tokenizer=tokenizer, **options)
    model.to(config.get("device", "cpu"))
    recovery = None
    if recover:
        from training import recover as run_recovery

        spec = {**config.get("recovery", {}), **(recover if isinstance(recover, dict) else {})}
        with _stage("recover", stages):
            recovery = run_recovery(model, tokenizer, spec, device=config.get("device", "cpu"), seed=seed)
    with _stage("evaluate", stages):
        metrics, harness = evaluate_metrics(model, tokenizer, table, config, cache)
    return {
        "method": recipe.method, "profile": recipe.profile, "row": row,
        "options": options,
        "model": {"id": config["model"], "revision": config.get("revision"),
                  "resolved_commit": getattr(model.config, "_commit_hash", None) or _smoke_source(config["model"]),
                  "dtype": config.get("dtype", "float32")},
        "calibration": calib_info, "seed": seed, "metrics": metrics, "harness": harness,
        "batch_size": config.get("batch_size", 1), "prune": report, "recovery": recovery, "stages": stages,
        "provenance": provenance(),
    }


def _smoke_source(model_id: str) -> Optional[str]:
    """The smoke model has no hub commit: its identity is the sha256 of the GGUF it was converted from."""
    if model_id != "smoke":
        return None
    from repro.smoke_model import MARKER, smoke_model_dir

    return "gguf-sha256:" + read_json(smoke_model_dir() / MARKER)["gguf_sha256"]


def _calibration(spec: dict, tokenizer, cache):
    from repro import data

    key = ("calib", json.dumps(spec, sort_keys=True))
    return _cached(cache, key, lambda: data.calibration(
        spec["spec"], tokenizer=tokenizer, nsamples=int(spec["nsamples"]),
        seqlen=int(spec["seqlen"]), seed=int(spec.get("seed", 0))))


def _cached(cache: Dict[object, object], key, make):
    if key not in cache:
        cache[key] = make()
    return cache[key]


def seed_everything(seed: int) -> None:
    """The seeds the original entry points set: Python's, numpy's and torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _stage(name: str, stages: Dict[str, dict]):
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    entry = {"seconds": round(time.perf_counter() - start, 3),
             # ru_maxrss is the process's peak so far (KiB on Linux): an upper bound for this stage.
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        entry["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    stages[name] = entry
    print(f"  {name}: {entry['seconds']:.1f}s", file=sys.stderr)
