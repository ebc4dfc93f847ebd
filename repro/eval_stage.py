"""The evaluation stage, `lpc eval`: a recipe row's metrics on a checkpoint, into its result file.

<results>/<profile>/<method>/<row>.json is written atomically: the metrics of the row's table (perplexity
protocols, lm-eval tasks, structure), the prune and train reports the checkpoint's manifests carry,
provenance, the stages' timings and memory, and the fingerprint of the row's inputs (a rerun skips a
row whose fingerprint still matches). The checkpoint must come from the stages the recipe prescribes
for the row (repro/chain.py). Backends: how a checkpoint becomes (model, tokenizer).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from methods.core.errors import UsageError
from methods.core.identity import checkpoint_identity, smoke_source
from repro.chain import check_chain
from repro.prune_stage import prune_report, seed_everything
from repro.requests import DENSE


def load_hf(model: str, *, dtype: str, revision: Optional[str] = None):
    """A Hugging Face checkpoint (the kit's `lpc_llama` included), as every stage of the kit writes one."""
    from methods.core.models import load_model

    return load_model(model, dtype=dtype, revision=revision)


def load_maxtext(model: str, *, dtype: str, revision: Optional[str] = None):
    """A MaxText checkpoint directory (lpc convert --to maxtext), scored with MaxText's JAX model."""
    from training.maxtext import convert

    convert.require_maxtext()
    if revision is not None:
        raise UsageError("--backend maxtext reads a local MaxText directory; a hub revision does not apply")
    if not (Path(model) / convert.MANIFEST).is_file():
        raise UsageError(f"{model} is not a MaxText directory written by lpc convert --to maxtext "
                         f"(no {convert.MANIFEST})")
    from training.maxtext import lm

    return lm.load_for_eval(model, dtype=dtype)


# `lpc eval --backend`: how a checkpoint becomes (model, tokenizer) for the metrics of repro/evaluate.py.
EVAL_BACKENDS: Dict[str, Callable] = {"hf": load_hf, "maxtext": load_maxtext}
# Backends whose model is no PyTorch module: the table's structure metrics (shapes, parameter counts) need one.
NO_STRUCTURE_BACKENDS = ("maxtext",)


def metric_specs(table) -> Dict[str, dict]:
    """What a row is measured with: part of its result's fingerprint."""
    return {key: {"kind": m.kind, **m.spec} for key, m in table.metrics.items()}


def evaluate(recipe, table, row: str, *, model: str, results_root, cache: Optional[dict] = None,
             backend: str = "hf", log: Callable[[str], None] = print) -> dict:
    """`lpc eval`: every metric of the row's table on `model`, written to results/<profile>/<method>/<row>.json."""
    import torch

    from repro import diff as differ
    from repro.evaluate import evaluate_metrics
    from methods.core.provenance import peak_rss_mib, provenance
    from methods.core.results import write_json_atomic

    config = recipe.config
    if backend not in EVAL_BACKENDS:
        raise UsageError(f"unknown evaluation backend {backend!r}; known: {', '.join(EVAL_BACKENDS)}")
    structure = [key for key, m in table.metrics.items() if m.kind == "structure"]
    if backend in NO_STRUCTURE_BACKENDS and structure:
        raise UsageError(f"--backend {backend} cannot measure structure metric {structure[0]!r} (it reads a "
                         "PyTorch model); evaluate this table with --backend hf")
    chain = check_chain(recipe, row, model)
    seed_everything(recipe.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    dense = row == DENSE
    loaded, tokenizer = EVAL_BACKENDS[backend](model, dtype=config.get("dtype", "float32"),
                                                revision=config.get("revision") if dense else None)
    loaded.to(config.get("device", "cpu"))
    load_seconds = time.perf_counter() - start
    metrics, harness = evaluate_metrics(loaded, tokenizer, table, config, cache if cache is not None else {})
    evaluated = {"seconds": round(time.perf_counter() - start, 3),
                 "parts": {"load": round(load_seconds, 3), "metrics": round(time.perf_counter() - start - load_seconds, 3)},
                 "peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_available():
        evaluated["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    pruned, trained = chain.get("prune"), chain.get("train")
    if dense:
        commit = getattr(loaded.config, "_commit_hash", None) or (smoke_source() if config["model"] == "smoke" else None)
    else:
        commit = pruned.get("resolved_commit")
    result = {
        "method": recipe.method, "profile": recipe.profile, "row": row,
        "options": recipe.options(row),
        "model": {"id": config["model"], "revision": config.get("revision"), "resolved_commit": commit,
                  "dtype": config.get("dtype", "float32")},
        "calibration": pruned.get("calibration") if pruned else None,
        "seed": recipe.seed, "metrics": metrics, "harness": harness, "batch_size": config.get("batch_size", 1),
        "prune": prune_report(pruned) if pruned else None,
        "training": {k: v for k, v in trained.items() if k not in ("provenance", "lineage")} if trained else None,
        "checkpoint": {"path": str(model), "backend": backend, **checkpoint_identity(str(model), str(model))},
        "stages": {**_stage_timings(pruned, trained), "evaluate": evaluated},
        "provenance": provenance(),
        "fingerprint": recipe.fingerprint(row, metric_specs(table)),
    }
    if recipe.rehearsal:  # lpc diff shows its cells as REHEARSED: ran, not compared
        result["rehearsal"] = config["rehearsal"]
    path = differ.results_dir(results_root, recipe.profile, recipe.method) / f"{row}.json"
    write_json_atomic(path, result)
    log(f"[{recipe.method}/{recipe.profile}] {row}: {json.dumps(metrics)}")
    return result


def _stage_timings(pruned: Optional[dict], trained: Optional[dict]) -> Dict[str, dict]:
    """Wall time and peak memory of the stages before evaluation, as their manifests recorded them."""
    out = {}
    if pruned:
        parts = pruned.get("timings_seconds") or {}
        out["prune"] = {"seconds": round(sum(parts.values()), 3), "parts": parts,
                        "peak_rss_mib": pruned.get("peak_rss_mib")}
    if trained:
        seconds = trained.get("seconds")
        parts = seconds if isinstance(seconds, dict) else None
        out["train"] = {"seconds": round(sum(parts.values()) if parts else float(seconds or 0), 3), "parts": parts,
                        "peak_memory_mib": trained.get("peak_memory_mib")}
    return out
