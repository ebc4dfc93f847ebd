"""Stages of a reproduction: each reads a checkpoint directory and writes one, with a manifest.

A stage's output directory is complete when it holds its manifest (`train.json` for training)
carrying the fingerprint of the stage's inputs: the options that decide the result and the identity
of every input (checkpoints by their own manifests' fingerprints, data by content). A rerun of the
same command finds the manifest and does nothing; a run killed before the manifest was written
resumes from its last sharded checkpoint (training/checkpoint.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from methods.errors import UsageError
from training.options import TrainOptions

TRAIN_MANIFEST = "train.json"
# Manifests a checkpoint directory of the kit may hold, newest stage first.
MANIFESTS = (TRAIN_MANIFEST, "prune.json")
# Sparse retraining keeps a pruned model's zeros; a model with fewer is not a pruned one.
MIN_SPARSE_ZERO_FRACTION = 0.1
# Data and checkpoints up to this size are identified by content, larger ones by size and time.
HASH_LIMIT = 256 * 2**20


# ----------------------------------------------------------------------------- identities

def fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_identity(spec: str, path: str) -> Dict[str, object]:
    """A model by its stage manifest's fingerprint, else by its files, else (a hub id) by name."""
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


# ----------------------------------------------------------------------------- lpc train

def train(options: TrainOptions, *, overwrite: bool = False, log: Callable[[str], None] = print) -> int:
    """`lpc train`: validate everything, then train (here, or on `nproc` processes under torchrun)."""
    from repro import data
    from repro.models import checked_path, tokenizer_for

    out = Path(options.out)
    model_path = checked_path(options.model, "--model")
    teacher_path = checked_path(options.teacher, "--teacher") if options.teacher else None
    config = _config(model_path, "--model")
    if teacher_path:
        teacher_vocab = _config(teacher_path, "--teacher").vocab_size
        if teacher_vocab != config.vocab_size:
            raise UsageError(f"the teacher's vocabulary ({teacher_vocab} tokens) is not the student's "
                             f"({config.vocab_size}): logit distillation needs the same tokenizer")
    if options.kind == "sheared":
        from methods import sheared

        sheared.target_for(config, options.recipe["target_shape"])  # a target the source can reach, or one line
    world = int(os.environ.get("WORLD_SIZE", options.nproc))
    if options.kind != "lora" and options.global_batch % (options.micro_batch * world):
        raise UsageError(f"global batch {options.global_batch} is not divisible by micro batch "
                         f"{options.micro_batch} x {world} process(es)")
    inputs = {"model": checkpoint_identity(options.model, model_path), "data": data_identity(options.data)}
    if teacher_path:
        inputs["teacher"] = checkpoint_identity(options.teacher, teacher_path)
    if options.eval_data:
        inputs["eval_data"] = data_identity(options.eval_data)
    stamp = fingerprint({"options": options.fingerprint_fields(), "inputs": inputs})
    if _done(out, stamp):
        log(f"{out}: trained already (train.json matches these inputs)")
        return 0
    _prepare_out(out, stamp, overwrite)

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
        return _relaunch(options, overwrite)

    from training import checkpoint, engine
    from repro.provenance import provenance
    from repro.results import write_json_atomic

    report = engine.train(options, student_path=model_path, teacher_path=teacher_path, data_factory=factory,
                          tokenizer=tokenizer, fingerprint=stamp, log=log)
    if report is not None:
        write_json_atomic(out / TRAIN_MANIFEST, {"stage": "train", "fingerprint": stamp,
                                                 "options": options.model_dump(), "inputs": inputs,
                                                 **report, "provenance": provenance()})
        if not options.keep_checkpoints:
            checkpoint.discard(out)
        log(f"trained {options.model} ({options.kind}, {options.steps} steps) -> {out}")
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


def _relaunch(options: TrainOptions, overwrite: bool) -> int:
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


def _train_lora(options: TrainOptions, model_path: str, tokenizer, inputs: dict, stamp: str, log) -> int:
    """LoRA recovery (training/lora.py) as a stage: the flags map onto the recipe's fields."""
    from repro.models import load_model, save_checkpoint
    from repro.provenance import provenance
    from repro.results import write_json_atomic
    from training import lora

    spec = {**options.recipe, "data": options.data, "lr": options.lr, "batch_size": options.global_batch,
            "micro_batch_size": options.micro_batch, "cutoff_len": options.seqlen}
    if options.steps is not None:
        spec["max_steps"] = options.steps
    lora.LoraRecipe.from_spec(spec)  # every field checked before the model is loaded
    model, _ = load_model(model_path, load_tokenizer=False)
    device = options.device if options.device != "auto" else ("cuda" if _cuda() else "cpu")
    report = lora.recover(model, tokenizer, spec, device=device, seed=options.seed)
    save_checkpoint(model.cpu(), tokenizer, Path(options.out))
    write_json_atomic(Path(options.out) / TRAIN_MANIFEST, {"stage": "train", "fingerprint": stamp,
                                                           "options": options.model_dump(), "inputs": inputs,
                                                           **report, "provenance": provenance()})
    log(f"trained {options.model} (lora, {report['steps']} steps) -> {options.out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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


def _prepare_out(out: Path, stamp: str, overwrite: bool) -> None:
    """An empty OUT, or one holding this run's own resumable checkpoints; anything else needs --overwrite."""
    from training import checkpoint

    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite:
        shutil.rmtree(out)
        return
    if {p.name for p in out.iterdir()} <= {checkpoint.CHECKPOINTS, checkpoint.STAGING}:
        checkpoint.check_resumable(out, stamp)  # an interrupted run: this one's, or refused
        return
    raise UsageError(f"{out} exists and holds something else; pass --overwrite to replace it")
