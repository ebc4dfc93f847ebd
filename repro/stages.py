"""Stages of a reproduction: each reads a checkpoint directory and writes one, with a manifest.

    prune     lpc prune --model M --method NAME ...     -> DIR/pruned/   (HF checkpoint + prune.json)
    train     lpc train --model DIR/pruned --kind ...   -> DIR/trained/  (HF checkpoint + train.json)
    evaluate  lpc eval --model DIR/trained --row R ...  -> results/<profile>/<method>/<row>.json

A stage's output directory is complete when it holds its manifest carrying the fingerprint of the
stage's inputs: the options that decide the result and the identity of every input (checkpoints by
their own manifests' fingerprints, data by content). A rerun of the same command finds the manifest
and does nothing; a prune killed before its manifest was written starts again (the checkpoint and
the manifest appear together), a training run resumes from its last sharded checkpoint
(training/checkpoint.py). `lpc repro` chains the stages (repro/runner.py) or submits them as jobs
(repro/submit.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from methods.errors import UsageError
from repro.recipe import DENSE
from training.options import TrainOptions

PRUNE_MANIFEST = "prune.json"
TRAIN_MANIFEST = "train.json"
# Manifests a checkpoint directory of the kit may hold, newest stage first.
MANIFESTS = (TRAIN_MANIFEST, PRUNE_MANIFEST)
# What the prune stage adds to the method's report in prune.json (the rest is the report itself).
PRUNE_STAGE_KEYS = ("stage", "fingerprint", "inputs", "model", "revision", "resolved_commit", "dtype",
                    "calibration", "timings_seconds", "peak_rss_mib",
                    "kit_version", "git_sha", "image_digest", "packages", "hardware")
# Sparse retraining keeps a pruned model's zeros; a model with fewer is not a pruned one.
MIN_SPARSE_ZERO_FRACTION = 0.1
# Data and checkpoints up to this size are identified by content, larger ones by size and time.
HASH_LIMIT = 256 * 2**20
# LoRA fields that `lpc train` sets with flags of its own (the flag -> the LoRA recipe field).
LORA_FLAGS = {"data": "data", "lr": "lr", "global_batch": "batch_size", "micro_batch": "micro_batch_size",
              "seqlen": "cutoff_len", "steps": "max_steps"}


class StageFailed(RuntimeError):
    """A stage's process ended badly (e.g. a torchrun worker died); what it wrote so far is kept."""


# ----------------------------------------------------------------------------- identities

def fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_identity(spec: str, path: str) -> Dict[str, object]:
    """A model by its stage manifest's fingerprint, else by its files, else (a hub id) by name."""
    if spec == "smoke":  # converted on each machine: the GGUF it came from is its identity
        return {"spec": spec, "source": smoke_source()}
    folder = Path(path)
    for name in MANIFESTS:
        manifest = folder / name
        if manifest.is_file():
            return {"spec": spec, "manifest": name, "fingerprint": json.loads(manifest.read_text()).get("fingerprint")}
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        return {"spec": spec, "files": files_identity(files)}
    return {"spec": spec}


def data_identity(spec: str) -> Dict[str, object]:
    from repro import data

    path = data.SMOKE_CALIB_TEXT if spec == "smoke" else Path(os.path.expanduser(spec))
    if not path.exists():
        return {"spec": spec}  # a hub dataset: its name (and the loader's pinned revision) say it
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {"spec": spec, "files": files_identity(files)}


def files_identity(files: List[Path]) -> str:
    digest = hashlib.sha256()
    by_content = sum(p.stat().st_size for p in files) <= HASH_LIMIT
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}".encode())
        if by_content:
            digest.update(path.read_bytes())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def smoke_source() -> str:
    """The smoke model has no hub commit: its identity is the sha256 of the GGUF it was converted from."""
    from repro.results import read_json
    from repro.smoke_model import MARKER, smoke_model_dir

    return "gguf-sha256:" + read_json(smoke_model_dir() / MARKER)["gguf_sha256"]


def read_manifest(folder, name: str) -> Optional[dict]:
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.is_file() else None


def manifest_chain(model: str) -> Dict[str, dict]:
    """The stage manifests behind a checkpoint: its train.json and the prune.json of the model it trained."""
    from repro.models import resolve

    chain: Dict[str, dict] = {}
    folder = Path(resolve(model))
    trained = read_manifest(folder, TRAIN_MANIFEST)
    if trained is not None:
        chain["train"] = trained
        folder = Path(trained["options"]["model"])
    pruned = read_manifest(folder, PRUNE_MANIFEST)
    if pruned is None and trained is not None:
        # The pruned checkpoint may be gone (lpc repro --keep-stages trained); its record is not.
        pruned = trained.get("lineage", {}).get("prune")
    if pruned is not None:
        chain["prune"] = pruned
    return chain


def lineage(model_path: str) -> Dict[str, dict]:
    """The manifest of the checkpoint a stage reads, kept in the stage's own (not part of its identity)."""
    pruned = read_manifest(model_path, PRUNE_MANIFEST)
    return {"prune": pruned} if pruned is not None else {}


def prune_report(manifest: dict) -> dict:
    """The method's own report out of a prune.json (what a result file's `prune` holds)."""
    return {k: v for k, v in manifest.items() if k not in PRUNE_STAGE_KEYS}


def _peak_rss_mib() -> float:
    # ru_maxrss is the process's peak so far (KiB on Linux): an upper bound for the stage.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _save_with_manifest(model, tokenizer, out: Path, name: str, manifest: dict) -> None:
    """The checkpoint and its manifest appear together: a stage killed while saving leaves no
    directory that a rerun could take for a finished one."""
    from repro.models import save_checkpoint
    from repro.results import write_json_atomic

    out = Path(out)
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(model, tokenizer, staging)
    write_json_atomic(staging / name, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def _empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ----------------------------------------------------------------------------- lpc prune

@dataclass(frozen=True)
class PruneRequest:
    """What `lpc prune` is asked to do: every field that decides the pruned checkpoint, and where it goes."""
    model: str
    method: str
    out: Path
    options: Dict[str, Any] = field(default_factory=dict)
    calib: Optional[str] = None
    nsamples: Optional[int] = None           # None: 128, or the rows of a token file
    seqlen: Optional[int] = None             # None: the model's context (max 8192), or a token file's width
    seed: int = 0
    dtype: str = "float32"
    revision: Optional[str] = None
    device: Optional[str] = None             # where layers are computed; not part of the identity
    calib_batch: Union[int, str] = 1         # samples per layer call in the calibration engine (or "auto")
    # For a method whose pruning is a training run: that run's `lpc train` settings (less model, out,
    # kind and the method options, which the request holds); seed and seqlen default to the request's.
    training: Optional[Dict[str, Any]] = None

    def identity(self, needs_calibration: bool) -> Dict[str, object]:
        from repro.models import resolve

        if self.training is not None:
            # The run decides the result: its settings as `lpc train` reads them (defaults left out,
            # so writing one out changes nothing) and the content of its data.
            options = pruning_run_options(self)
            run = {k: v for k, v in options.fingerprint_fields().items() if k != "model"}
            data = {"data": data_identity(options.data)}
            if options.eval_data:
                data["eval_data"] = data_identity(options.eval_data)
            return {"model": {**checkpoint_identity(self.model, resolve(self.model)), "revision": self.revision},
                    "dtype": self.dtype, "method": self.method, "run": run, **data}
        calibration = None
        if needs_calibration:
            calibration = {"spec": self.calib, "nsamples": self.nsamples, "seqlen": self.seqlen,
                           "data": data_identity(self.calib)}
            # Batched calibration rounds differently, so it is a different result; batch 1 stays out of
            # the identity so that checkpoints pruned before the option existed still match.
            if self.calib_batch != 1:
                calibration["batch"] = self.calib_batch
        return {"model": {**checkpoint_identity(self.model, resolve(self.model)), "revision": self.revision},
                "dtype": self.dtype, "method": self.method, "options": self.options,
                "calibration": calibration, "seed": self.seed}


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
    from repro import data

    method = methods.get(request.method)
    parsed = methods.make_options(method, request.options)  # validate before any slow loading
    by_training = method.trains and getattr(parsed, "trains", True)
    if by_training and request.training is None:
        raise UsageError(f"method {request.method!r} prunes by a training run: give its settings (lpc prune "
                         "--data ... --steps ... --global-batch ... --micro-batch ... --seqlen ... --lr ...; "
                         "a recipe row's pruning_run)")
    if not by_training and request.training is not None:
        raise UsageError(f"method {request.method!r} does not prune by training; it takes no training settings")
    if method.needs_calibration and not request.calib:
        raise UsageError(f"method {request.method!r} needs --calib")
    out = Path(request.out)
    stamp = prune_fingerprint(request)
    done = read_manifest(out, PRUNE_MANIFEST)
    if done is not None and done.get("fingerprint") == stamp:
        log(f"{out}: pruned already (prune.json matches these inputs)")
        return done
    if by_training:
        return _prune_by_training(request, stamp, overwrite=overwrite, log=log)
    if not _empty(out) and not overwrite:
        raise UsageError(f"{out} exists and holds something else; pass --overwrite to replace it")
    tokens = None
    if method.needs_calibration and Path(request.calib).suffix in data.TOKEN_FILE_SUFFIXES:
        tokens = data.load_token_file(request.calib)  # validate the file before loading the model
    return _prune(request, method, stamp, tokens, cache if cache is not None else {}, log)


def _prune(request: PruneRequest, method, stamp: str, tokens, cache: dict, log) -> dict:
    import methods
    from repro import data
    from repro.evaluate import model_seqlen
    from repro.models import load_model
    from repro.provenance import provenance
    from repro.results import write_json_atomic

    seed_everything(request.seed)
    timings = {}
    start = time.perf_counter()
    model, tokenizer = load_model(request.model, dtype=request.dtype, revision=request.revision)
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
        "dtype": request.dtype, "calibration": calibration, "timings_seconds": timings, **provenance(),
    }
    start = time.perf_counter()
    model.cpu()
    _save_with_manifest(model, tokenizer, Path(request.out), PRUNE_MANIFEST, manifest)
    timings["save"] = time.perf_counter() - start
    manifest["peak_rss_mib"] = _peak_rss_mib()
    write_json_atomic(Path(request.out) / PRUNE_MANIFEST, manifest)  # with the save's own timing and memory
    if "parameters" in report:
        summary = "{pruned:,} of {dense:,} parameters kept".format(**report["parameters"])
    else:
        summary = f"overall sparsity {report['overall_sparsity']:.4f}"
    log(f"pruned {request.model} with {request.method}: {summary} -> {request.out}")
    return manifest


# The training run of a method that prunes by training keeps its train.json under this name in the
# pruned folder: the folder is a prune stage's output, read as such by the stages after it.
PRUNING_RUN_MANIFEST = "pruning-run.json"


def pruning_run_options(request: PruneRequest) -> TrainOptions:
    """The `lpc train` options of a prune request's training run: kind = the method, its options as
    the run's own settings, written into the request's out folder."""
    from training.options import parse_options

    device = request.device or "auto"
    values = {"seed": request.seed, **({"seqlen": request.seqlen} if request.seqlen else {}), **request.training,
              "model": request.model, "out": str(request.out), "kind": request.method, "recipe": request.options,
              "device": "cuda" if device.startswith("cuda") else device}
    return parse_options(values, where=f"the {request.method} training run")


def _prune_by_training(request: PruneRequest, stamp: str, *, overwrite: bool, log) -> dict:
    """The prune stage of a method whose pruning is a training run: `lpc train` of the method's kind
    writes the pruned checkpoint into the out folder (resumable, on --nproc processes), its train.json
    is kept as pruning-run.json, and prune.json records the method's report beside it."""
    from repro.provenance import provenance
    from repro.results import write_json_atomic

    if request.revision:
        raise UsageError(f"--revision: method {request.method!r} trains the model as stored; give a local "
                         "copy of that revision as --model")
    options = pruning_run_options(request)
    out = Path(request.out)
    run_stamp = train_identity(options)[0]
    run = read_manifest(out, PRUNING_RUN_MANIFEST)
    if run is None or run.get("fingerprint") != run_stamp:
        if run is not None:  # another run's output: it is stale whatever the flags say
            if not overwrite:
                raise UsageError(f"{out} exists and holds something else; pass --overwrite to replace it")
            shutil.rmtree(out)
        code = train(options, replace_stale=overwrite, log=log)
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


# ----------------------------------------------------------------------------- lpc train

def train_identity(options: TrainOptions, *, pruned: Optional[str] = None) -> Tuple[str, dict]:
    """(fingerprint, inputs) of a training stage: its options and the identity of what it reads.

    `pruned`: the fingerprint of the prune stage that will write --model, for a stage planned before
    its input exists (`lpc repro --submit`)."""
    from repro.models import checked_path

    if pruned is not None:
        model = {"spec": options.model, "manifest": PRUNE_MANIFEST, "fingerprint": pruned}
    else:
        model = checkpoint_identity(options.model, checked_path(options.model, "--model"))
    inputs = {"model": model, "data": data_identity(options.data)}
    if options.teacher:
        inputs["teacher"] = checkpoint_identity(options.teacher, checked_path(options.teacher, "--teacher"))
    if options.eval_data:
        inputs["eval_data"] = data_identity(options.eval_data)
    return fingerprint({"options": options.fingerprint_fields(), "inputs": inputs}), inputs


def train(options: TrainOptions, *, overwrite: bool = False, replace_stale: bool = False,
          log: Callable[[str], None] = print) -> int:
    """`lpc train`: validate everything, then train (here, or on `nproc` processes under torchrun).

    `replace_stale` (the pipeline, which owns OUT): whatever OUT holds that is not this run's own
    (a finished run of other inputs, another run's checkpoints) is deleted; this run's checkpoints
    are resumed.
    """
    from repro import data
    from repro.models import checked_path, tokenizer_for

    out = Path(options.out)
    model_path = checked_path(options.model, "--model")
    teacher_path = checked_path(options.teacher, "--teacher") if options.teacher else None
    config = _config(model_path, "--model")
    if teacher_path:
        from training.engine import check_teacher

        check_teacher(model_path, teacher_path)
    if options.kind == "sheared":
        from methods import sheared

        sheared.target_for(config, options.recipe["target_shape"])  # a target the source can reach, or one line
    world = int(os.environ.get("WORLD_SIZE", options.nproc))
    if options.kind != "lora" and options.global_batch % (options.micro_batch * world):
        raise UsageError(f"global batch {options.global_batch} is not divisible by micro batch "
                         f"{options.micro_batch} x {world} process(es)")
    if options.kind == "lora":
        lora_recipe(options)  # every field checked before the model is loaded
    stamp, inputs = train_identity(options)
    if _done(out, stamp):
        log(f"{out}: trained already (train.json matches these inputs)")
        return 0
    if options.phase in ("all", "prepare"):  # the later phases of a multi-host run find OUT prepared
        _prepare_out(out, stamp, overwrite, replace_stale)

    if options.engine == "maxtext":
        return _train_maxtext(options, model_path, inputs, stamp, log)
    tokenizer = tokenizer_for(model_path)
    if options.kind == "lora":
        return _train_lora(options, model_path, tokenizer, inputs, stamp, log)
    from training.data import Dynamic

    factory = data.training_source(options.data, tokenizer=tokenizer, seqlen=options.seqlen, seed=options.seed,
                                   shuffle=options.shuffle, vocab_size=config.vocab_size,
                                   dynamic=Dynamic.from_options(options))
    if options.kind == "sparse":
        zeros = stored_zero_fraction(model_path)
        if zeros < MIN_SPARSE_ZERO_FRACTION:
            raise UsageError(f"{options.model} has {zeros:.2%} zeros in its decoder weights: kind sparse retrains a "
                             "pruned model keeping its zeros; prune it first (e.g. lpc prune --method wanda)")
    if options.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(options)

    from training import checkpoint, engine
    from repro.provenance import provenance
    from repro.results import write_json_atomic

    report = engine.train(options, student_path=model_path, teacher_path=teacher_path, data_factory=factory,
                          tokenizer=tokenizer, fingerprint=stamp, log=log)
    if report is not None:
        write_json_atomic(out / TRAIN_MANIFEST, {"stage": "train", "fingerprint": stamp,
                                                 "options": options.model_dump(), "inputs": inputs,
                                                 **report, "lineage": lineage(model_path),
                                                 "provenance": provenance()})
        if not options.keep_checkpoints:
            checkpoint.discard(out)
        log(f"trained {options.model} ({options.kind}, {options.steps} steps) -> {out}")
    return 0


def _train_maxtext(options: TrainOptions, model_path: str, inputs: dict, stamp: str,
                   log: Callable[[str], None]) -> int:
    """`--engine maxtext`: MaxText's trainer (training/maxtext/train.py), train.json as the HF engine writes it."""
    from training.maxtext import convert

    convert.require_maxtext()  # one line outside the MaxText environment, before anything is written
    from repro.provenance import provenance
    from repro.results import write_json_atomic
    from training.maxtext import train as maxtext_train

    if options.phase == "prepare":
        maxtext_train.prepare(options, fingerprint=stamp, log=log)
        log(f"prepared {options.out} for MaxText (next: --phase run on every host of the slice)")
        return 0
    if options.phase == "run":
        maxtext_train.run(options, log=log)
        return 0
    if options.phase == "export":
        report = maxtext_train.finish(options)
    else:
        report = maxtext_train.train(options, fingerprint=stamp, log=log)
    write_json_atomic(Path(options.out) / TRAIN_MANIFEST,
                      {"stage": "train", "fingerprint": stamp, "options": options.model_dump(), "inputs": inputs,
                       **report, "lineage": lineage(model_path), "provenance": provenance()})
    log(f"trained {options.model} ({options.kind}, {options.steps} steps, MaxText) -> {options.out}")
    return 0


def train_command(options: TrainOptions, *, worker: bool = False) -> List[str]:
    """`lpc train` arguments that reproduce `options`. A worker's command (run by torchrun, which
    sets the world size) leaves out --nproc: torchrun would take it for its own --nproc-per-node."""
    args = []
    for name, value in options.model_dump(exclude_defaults=True, exclude={"nproc"} if worker else set()).items():
        flag = "--" + name.replace("_", "-")
        if name == "recipe":
            args += [item for key, v in value.items() for item in ("--option", f"{key}={json.dumps(v)}")]
        elif isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return ["train", *args]


def _relaunch(options: TrainOptions) -> int:
    """The same command on `nproc` local processes, through torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={options.nproc}",
               "-m", "repro.cli", *train_command(options, worker=True)]
    # The parent has checked and prepared everything; the workers must not delete what it kept.
    return subprocess.run(command).returncode


def stored_zero_fraction(path: str) -> float:
    """Zeros among the decoder projection weights of a saved checkpoint, read tensor by tensor."""
    from safetensors import safe_open

    from training.engine import SPARSE_PARAMETER_SUFFIXES

    files = sorted(Path(path).glob("*.safetensors"))
    zeros = total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.endswith(SPARSE_PARAMETER_SUFFIXES) and ".layers." in name:
                    tensor = handle.get_tensor(name)
                    zeros += int((tensor == 0).sum())
                    total += tensor.numel()
    if total == 0:
        raise UsageError(f"{path} has no safetensors decoder weights to train sparsely")
    return zeros / total


def lora_spec(options: TrainOptions) -> Dict[str, Any]:
    """The LoRA recipe fields of `lpc train --kind lora`: the flags, then --option for the others."""
    taken = sorted(set(options.recipe) & set(LORA_FLAGS.values()))
    if taken:
        flags = ", ".join("--" + k.replace("_", "-") for k, v in LORA_FLAGS.items() if v in taken)
        raise UsageError(f"lora: set {', '.join(taken)} with {flags}, not as a LoRA option")
    spec = {**options.recipe}
    for flag, name in LORA_FLAGS.items():
        if getattr(options, flag) is not None:
            spec[name] = getattr(options, flag)
    return spec


def lora_recipe(options: TrainOptions):
    from training import lora

    return lora.LoraRecipe.from_spec(lora_spec(options))


def _train_lora(options: TrainOptions, model_path: str, tokenizer, inputs: dict, stamp: str, log) -> int:
    """LoRA recovery (training/lora.py) as a stage: the flags map onto the recipe's fields."""
    from methods.anatomy import compute_device
    from repro.models import load_model
    from repro.provenance import provenance
    from training import lora

    spec = lora_spec(options)
    # The base weights stay in the dtype they were saved in (fp16 for the papers' LLaMA rows);
    # only the adapters train in fp32.
    model, _ = load_model(model_path, dtype=_stored_dtype(model_path), load_tokenizer=False)
    device = str(compute_device(None if options.device == "auto" else options.device))
    report = lora.recover(model, tokenizer, spec, device=device, seed=options.seed)
    manifest = {"stage": "train", "fingerprint": stamp, "options": options.model_dump(), "inputs": inputs,
                **report, "lineage": lineage(model_path), "provenance": provenance()}
    _save_with_manifest(model.cpu(), tokenizer, Path(options.out), TRAIN_MANIFEST, manifest)
    log(f"trained {options.model} (lora, {report['steps']} steps) -> {options.out}")
    return 0


def _stored_dtype(path: str) -> str:
    from repro.models import DTYPES

    config = _config(path, "--model")
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).replace("torch.", "") if value is not None else "float32"
    return name if name in DTYPES else "float32"


def _config(path: str, flag: str):
    from transformers import AutoConfig

    from methods.modeling_lpc_llama import register

    register()
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {path}: cannot read its config: {str(exc).splitlines()[0]}") from None


def _done(out: Path, stamp: str) -> bool:
    manifest = out / TRAIN_MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == stamp


def train_state(out, stamp: str) -> str:
    """What a training stage's OUT holds for a run of fingerprint `stamp`: 'done', 'resumable'
    (this run's own checkpoints, or nothing yet) or 'stale' (another run's output)."""
    from training import checkpoint

    out = Path(out)
    if _done(out, stamp):
        return "done"
    if _empty(out):
        return "resumable"
    if (out / "maxtext").is_dir():  # --engine maxtext: prepared from these inputs, MaxText resumes itself
        from training.maxtext.train import prepared_stamp

        return "resumable" if prepared_stamp(out) == stamp else "stale"
    if {p.name for p in out.iterdir()} <= {checkpoint.CHECKPOINTS, checkpoint.STAGING}:
        try:
            checkpoint.check_resumable(out, stamp)
            return "resumable"
        except UsageError:
            return "stale"
    return "stale"


def _prepare_out(out: Path, stamp: str, overwrite: bool, replace_stale: bool = False) -> None:
    """An empty OUT, or one holding this run's own resumable checkpoints; anything else needs --overwrite
    (or, for the pipeline that owns OUT, `replace_stale`)."""
    from training import checkpoint

    if _empty(out):
        return
    if overwrite:
        shutil.rmtree(out)
        return
    if train_state(out, stamp) == "resumable":
        return
    if replace_stale:
        shutil.rmtree(out)
        return
    if {p.name for p in out.iterdir()} <= {checkpoint.CHECKPOINTS, checkpoint.STAGING}:
        checkpoint.check_resumable(out, stamp)  # refused: another run's checkpoints, in its own words
    raise UsageError(f"{out} exists and holds something else; pass --overwrite to replace it")


# ----------------------------------------------------------------------------- lpc eval

def load_hf(model: str, *, dtype: str, revision: Optional[str] = None):
    """A Hugging Face checkpoint (the kit's `lpc_llama` included), as every stage of the kit writes one."""
    from repro.models import load_model

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


def check_chain(recipe, row: str, model: str) -> Dict[str, dict]:
    """The manifests behind `model`, refused unless they are the stages the recipe prescribes for
    `row`: a result file names its row, so it must come from that row's prune (and train) stages."""
    chain = manifest_chain(model)
    where = f"{recipe.method}/{recipe.profile}/{row}"
    if row == DENSE:
        if chain:
            raise UsageError(f"{model} is the output of a {' and '.join(chain)} stage; row dense evaluates the "
                             "unpruned model itself")
        return chain
    if "prune" not in chain:
        raise UsageError(f"{model} holds no prune.json (nor a train.json of a pruned model): row {where} "
                         "evaluates the checkpoint its prune stage wrote")
    expected = prune_fingerprint(recipe.prune_request(row, out=Path(model)))
    if chain["prune"].get("fingerprint") != expected:
        raise UsageError(f"{model} was not pruned as row {where} prescribes (model, method, options or "
                         "calibration differ); rerun the row's prune stage")
    wanted = recipe.train_options(row, model=chain.get("train", {}).get("options", {}).get("model", model),
                                  out=model)
    if wanted is None and "train" in chain:
        raise UsageError(f"{model} is a trained checkpoint, but row {where} has no train stage")
    if wanted is not None:
        if "train" not in chain:
            raise UsageError(f"{model} holds no train.json: row {where} trains with spec "
                             f"{recipe.rows[row]['train']!r} before it is evaluated")
        done = chain["train"]
        ours = {k: v for k, v in wanted.fingerprint_fields().items() if k != "model"}
        try:  # both read as lpc train reads them: a field at its default counts whether written or not
            theirs = {k: v for k, v in TrainOptions(**done["options"]).fingerprint_fields().items() if k != "model"}
        except ValueError:
            theirs = None
        if ours != theirs or done["inputs"]["model"].get("fingerprint") != expected:
            raise UsageError(f"{model} was not trained as row {where} prescribes (its train.json options or "
                             "input model differ); rerun the row's train stage")
    return chain


def evaluate(recipe, table, row: str, *, model: str, results_root, cache: Optional[dict] = None,
             backend: str = "hf", log: Callable[[str], None] = print) -> dict:
    """`lpc eval`: every metric of the row's table on `model`, written to results/<profile>/<method>/<row>.json."""
    import torch

    from repro import diff as differ
    from repro.evaluate import evaluate_metrics
    from repro.provenance import provenance
    from repro.results import write_json_atomic

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
                 "peak_rss_mib": _peak_rss_mib()}
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
