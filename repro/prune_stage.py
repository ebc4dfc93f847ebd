"""The prune stage, `lpc prune`: a prune request in, a pruned Hugging Face checkpoint and its manifest out.

DIR/ holds the checkpoint and prune.json: the method's report (options, per-Linear sparsity or the kept
units and scores, timings), the fingerprint of the request's inputs, provenance. A rerun of the same
request finds prune.json and does nothing; a prune killed before it is written starts again (the
checkpoint and the manifest appear together). A method whose pruning is a training run (Sheared LLaMA)
runs the train stage of its kind into DIR and keeps that run's train.json as pruning-run.json.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from methods.core.errors import UsageError
from methods.core.identity import (PRUNE_MANIFEST, TRAIN_MANIFEST, fingerprint, read_manifest, smoke_source)
from repro.requests import PruneRequest
from training.stage import StageFailed

# What the prune stage adds to the method's report in prune.json (the rest is the report itself).
PRUNE_STAGE_KEYS = ("stage", "fingerprint", "inputs", "model", "revision", "resolved_commit", "dtype",
                    "calibration", "timings_seconds", "peak_rss_mib",
                    "kit_version", "git_sha", "image_digest", "packages", "hardware")
# The training run of a method that prunes by training keeps its train.json under this name in the
# pruned folder: the folder is a prune stage's output, read as such by the stages after it.
PRUNING_RUN_MANIFEST = "pruning-run.json"


def prune_report(manifest: dict) -> dict:
    """The method's own report out of a prune.json (what a result file's `prune` holds)."""
    return {k: v for k, v in manifest.items() if k not in PRUNE_STAGE_KEYS}


def prune_fingerprint(request: PruneRequest) -> str:
    import methods

    return fingerprint(request.identity(methods.get(request.method).needs_calibration))


def prune(request: PruneRequest, *, overwrite: bool = False, cache: Optional[dict] = None,
          log: Callable[[str], None] = print) -> dict:
    """`lpc prune`: prune one model and save it with prune.json; returns the manifest.

    A rerun with the same inputs finds the manifest and returns it without loading anything.
    `cache` keeps calibration tokens across the rows of one `lpc repro` run.
    """
    import methods
    from methods.core import text

    method = methods.get(request.method)
    parsed = methods.make_options(method, request.options)  # validate before any slow loading
    by_training = method.prunes_by_training(parsed)
    if by_training and request.training is None:
        raise UsageError(f"method {request.method!r} prunes by a training run: give its settings (lpc prune "
                         "--data ... --steps ... --global-batch ... --micro-batch ... --seqlen ... --lr ...; "
                         "a recipe row's pruning_run)")
    if by_training and request.compute_dtype not in (None, request.dtype):
        raise UsageError(f"method {request.method!r} prunes by a training run, which computes in --dtype; "
                         "--compute-dtype does not apply")
    if not by_training and request.training is not None:
        raise UsageError(f"method {request.method!r} does not prune by training; it takes no training settings")
    if method.needs_calibration and not request.calib:
        raise UsageError(f"method {request.method!r} needs --calib")
    from methods.core.models import COMPUTE_DTYPES, DTYPES

    if request.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {request.dtype!r}; use one of {', '.join(DTYPES)}")
    if request.compute_dtype not in (None, *COMPUTE_DTYPES):
        raise UsageError(f"unknown --compute-dtype {request.compute_dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    out = Path(request.out)
    stamp = prune_fingerprint(request)
    done = read_manifest(out, PRUNE_MANIFEST)
    if done is not None and done.get("fingerprint") == stamp:
        log(f"{out}: pruned already (prune.json matches these inputs)")
        return done
    if by_training:
        return _prune_by_training(request, stamp, overwrite=overwrite, log=log)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and holds something else; pass --overwrite to replace it")
    tokens = None
    if method.needs_calibration and Path(request.calib).suffix in text.TOKEN_FILE_SUFFIXES:
        tokens = text.load_token_file(request.calib)  # validate the file before loading the model
    return _prune(request, method, stamp, tokens, cache if cache is not None else {}, log)


def _prune(request: PruneRequest, method, stamp: str, tokens, cache: dict, log) -> dict:
    import methods
    from methods.anatomy import check_supported
    from repro import data
    from repro.evaluate import model_seqlen
    from methods.core.models import load_model, save_with_manifest, torch_dtype
    from methods.core.provenance import peak_rss_mib, provenance
    from methods.core.results import write_json_atomic

    seed_everything(request.seed)
    timings = {}
    start = time.perf_counter()
    compute_dtype = request.compute_dtype or request.dtype
    model, tokenizer = load_model(request.model, dtype=compute_dtype, revision=request.revision)
    check_supported(model)  # an architecture without a declaration, refused before any compute
    timings["load"] = time.perf_counter() - start
    calib = calibration = None
    if method.needs_calibration:
        start = time.perf_counter()
        nsamples = request.nsamples or (tokens.shape[0] if tokens is not None else 128)
        seqlen = request.seqlen or (tokens.shape[1] if tokens is not None else model_seqlen(model))
        key = ("calib", request.calib, nsamples, seqlen, request.seed)
        if key not in cache:
            cache[key] = data.calibration(request.calib, tokenizer=tokenizer, nsamples=nsamples, seqlen=seqlen,
                                          seed=request.seed)
        calib = cache[key]
        timings["calibration"] = time.perf_counter() - start
        calibration = {"spec": request.calib, "nsamples": nsamples, "seqlen": seqlen, "seed": request.seed,
                       "shape": list(calib.shape), "sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest()}
    report = methods.prune(model, request.method, calib, device=request.device, tokenizer=tokenizer,
                           calib_batch=request.calib_batch, **request.options)
    timings["prune"] = report.pop("seconds")
    resolved = getattr(model.config, "_commit_hash", None)
    manifest = {
        **report, "stage": "prune", "fingerprint": stamp,
        "inputs": request.identity(method.needs_calibration),
        "model": request.model, "revision": request.revision,
        "resolved_commit": resolved or (smoke_source() if request.model == "smoke" else None),
        "dtype": request.dtype, "compute_dtype": compute_dtype, "calibration": calibration,
        "timings_seconds": timings, **provenance(),
    }
    start = time.perf_counter()
    model.to(device="cpu", dtype=torch_dtype(request.dtype))
    save_with_manifest(model, tokenizer, Path(request.out), PRUNE_MANIFEST, manifest)
    timings["save"] = time.perf_counter() - start
    manifest["peak_rss_mib"] = peak_rss_mib()
    write_json_atomic(Path(request.out) / PRUNE_MANIFEST, manifest)  # with the save's own timing and memory
    if "parameters" in report:
        summary = "{pruned:,} of {dense:,} parameters kept".format(**report["parameters"])
    else:
        summary = f"overall sparsity {report['overall_sparsity']:.4f}"
    log(f"pruned {request.model} with {request.method}: {summary} -> {request.out}")
    return manifest


def _prune_by_training(request: PruneRequest, stamp: str, *, overwrite: bool, log) -> dict:
    """The prune stage of a method whose pruning is a training run: `lpc train` of the method's kind
    writes the pruned checkpoint into the out folder (resumable, on --nproc processes), its train.json
    is kept as pruning-run.json, and prune.json records the method's report beside it."""
    from methods.core.provenance import provenance
    from methods.core.results import write_json_atomic
    from training import stage

    if request.revision:
        raise UsageError(f"--revision: method {request.method!r} trains the model as stored; give a local "
                         "copy of that revision as --model")
    options = request.pruning_run()
    out = Path(request.out)
    run_stamp = stage.train_identity(options)[0]
    run = read_manifest(out, PRUNING_RUN_MANIFEST)
    if run is None or run.get("fingerprint") != run_stamp:
        if run is not None:  # another run's output: it is stale whatever the flags say
            if not overwrite:
                raise UsageError(f"{out} exists and holds something else; pass --overwrite to replace it")
            shutil.rmtree(out)
        code = stage.train(options, replace_stale=overwrite, log=log)
        if code != 0:
            raise StageFailed(f"the {request.method} training run exited with status {code}; rerun to resume "
                              f"from its last checkpoint ({out})")
        os.replace(out / TRAIN_MANIFEST, out / PRUNING_RUN_MANIFEST)
        run = read_manifest(out, PRUNING_RUN_MANIFEST)
    report = dict(run["prune"])
    report.pop("seconds", None)
    updates = [{k: r[k] for k in ("step", "domain_losses", "proportions")} for r in run["log"] if "proportions" in r]
    first = None
    if updates and options.reference_loss:
        # What dynamic loading did first, per domain in order: the loss excess it saw and the factor
        # by which the domain's proportion changed (a claim: the largest excess gains weight).
        total = sum(options.domains.values())
        names = list(options.domains)
        excess = [updates[0]["domain_losses"][n] - options.reference_loss[n] for n in names]
        first = {"step": updates[0]["step"], "domains": names, "excess": excess,
                 "weight_change": [updates[0]["proportions"][n] / (options.domains[n] / total) for n in names],
                 "furthest_above_reference": max(range(len(names)), key=excess.__getitem__)}
    manifest = {
        **report, "stage": "prune", "fingerprint": stamp, "inputs": request.identity(False),
        "model": request.model, "revision": None,
        "resolved_commit": smoke_source() if request.model == "smoke" else None,
        "dtype": request.dtype, "calibration": None,
        "pruning_run": {"manifest": PRUNING_RUN_MANIFEST, "fingerprint": run["fingerprint"], "steps": options.steps,
                        "tokens": run["log"][-1]["tokens"], "world": run.get("world"),
                        "final": {k: v for k, v in run["log"][-1].items() if k not in ("domain_losses",)},
                        "proportion_updates": updates, "first_update": first,
                        "proportions": run.get("proportions")},
        "timings_seconds": run["seconds"], "peak_rss_mib": (run.get("peak_memory_mib") or {}).get("rss"),
        **provenance(),
    }
    write_json_atomic(out / PRUNE_MANIFEST, manifest)
    summary = "{pruned:,} of {dense:,} parameters kept".format(**report["parameters"])
    log(f"pruned {request.model} with {request.method}: {summary} -> {out}")
    return manifest


def seed_everything(seed: int) -> None:
    """The seeds the original entry points set: Python's, numpy's and torch's."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
