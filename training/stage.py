"""The train stage, `lpc train`: options in, a trained checkpoint and its manifest (train.json) out.

    options    training/options.py      what to train, validated once (each kind adds its own rules)
    kind       training/kinds/          cpt, kd, sparse, lora, sheared: checks, loss, hooks into the loop
    data       training/sources.py      what --data reads, as a stream of global batches (training/data.py)
    loop       training/engine.py       FSDP2 under torchrun (one CPU process: the model as it is)
    checkpoint training/checkpoint.py   resumable sharded states every --save-every steps, the export
    manifest   here                     train.json: the fingerprint of the inputs, the log, provenance

OUT is complete when it holds train.json with the fingerprint of this run's inputs: a rerun finds it
and does nothing; a run killed before it resumes from its last sharded checkpoint. Several processes
are this same stage relaunched under torchrun, each reading the options from a request file.

    python -m training.stage --request FILE     (what torchrun and submitted jobs run)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple

from methods.core.errors import UsageError
from methods.core.identity import TRAIN_MANIFEST, checkpoint_identity, data_identity, fingerprint, lineage
from training import kinds
from training.options import TrainOptions, parse_options


class StageFailed(RuntimeError):
    """A stage's process ended badly (e.g. a torchrun worker died); what it wrote so far is kept."""


def train_identity(options: TrainOptions, *, pruned: Optional[str] = None) -> Tuple[str, dict]:
    """(fingerprint, inputs) of a training stage: its options and the identity of what it reads.

    `pruned`: the fingerprint of the prune stage that will write --model, for a stage planned before
    its input exists (`lpc repro --submit`)."""
    from methods.core.identity import PRUNE_MANIFEST
    from methods.core.models import checked_path

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
    """Validate everything, then train (here, or on `nproc` processes under torchrun).

    `replace_stale` (the pipeline, which owns OUT): whatever OUT holds that is not this run's own
    (a finished run of other inputs, another run's checkpoints) is deleted; this run's checkpoints
    are resumed.
    """
    from methods.core.batching import accumulation_steps
    from methods.core.models import checked_path, read_config, tokenizer_for

    kind = kinds.get(options.kind)
    out = Path(options.out)
    model_path = checked_path(options.model, "--model")
    config = read_config(model_path, "--model")
    kind.check_inputs(options, config, model_path)
    if kind.distributed:
        accumulation_steps(options.global_batch, options.micro_batch, int(os.environ.get("WORLD_SIZE", options.nproc)))
    stamp, inputs = train_identity(options)
    if done(out, stamp):
        log(f"{out}: trained already (train.json matches these inputs)")
        return 0
    if options.phase in ("all", "prepare"):  # the later phases of a multi-host run find OUT prepared
        _prepare_out(out, stamp, overwrite, replace_stale)

    def manifest(report: dict) -> dict:
        from methods.core.provenance import provenance

        return {"stage": "train", "fingerprint": stamp, "options": options.model_dump(), "inputs": inputs,
                **report, "lineage": lineage(model_path), "provenance": provenance()}

    if options.engine == "maxtext":
        return _train_maxtext(options, manifest, log)
    tokenizer = tokenizer_for(model_path)
    if not kind.distributed:
        from methods.core.models import save_with_manifest

        model, report = kind.train_alone(options, model_path=model_path, tokenizer=tokenizer, log=log)
        save_with_manifest(model.cpu(), tokenizer, out, TRAIN_MANIFEST, manifest(report))
        log(f"trained {options.model} ({options.kind}, {report['steps']} steps) -> {out}")
        return 0
    from training import sources

    factory = sources.training_source(options, tokenizer=tokenizer, vocab_size=config.vocab_size)
    if options.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(options)

    from methods.core.results import write_json_atomic
    from training import checkpoint, engine

    report = engine.train(options, student_path=model_path, data_factory=factory,
                          tokenizer=tokenizer, fingerprint=stamp, log=log)
    if report is not None:
        write_json_atomic(out / TRAIN_MANIFEST, manifest(report))
        if not options.keep_checkpoints:
            checkpoint.discard(out)
        log(f"trained {options.model} ({options.kind}, {options.steps} steps) -> {out}")
    return 0


MAXTEXT_PYTHON_ENV = "LPC_MAXTEXT_PYTHON"


def maxtext_command() -> Optional[list]:
    """How a MaxText stage runs from here: in this process ([]) where MaxText is installed, else in the
    MaxText environment's python that LPC_MAXTEXT_PYTHON names; None where neither is there."""
    import importlib.util

    if importlib.util.find_spec("maxtext") is not None:
        return []
    python = os.environ.get(MAXTEXT_PYTHON_ENV, "").strip()
    return [python] if python and Path(python).is_file() and os.access(python, os.X_OK) else None


def _train_maxtext(options: TrainOptions, manifest: Callable[[dict], dict], log: Callable[[str], None]) -> int:
    """`--engine maxtext`: MaxText's trainer (training/maxtext/train.py), train.json as the HF engine writes it."""
    from training.maxtext import convert

    command = maxtext_command()
    if command:  # MaxText lives in its own environment (Python 3.12): the same stage, run there
        with tempfile.TemporaryDirectory(prefix="lpc-train-") as folder:
            request = write_request(options, Path(folder) / "request.json")
            log(f"MaxText stage in {command[0]}")
            return subprocess.run([*command, *worker_command(request)]).returncode
    convert.require_maxtext()  # one line outside the MaxText environment, before anything is written
    from methods.core.results import write_json_atomic
    from training.maxtext import train as maxtext_train

    stamp = manifest({})["fingerprint"]
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
    write_json_atomic(Path(options.out) / TRAIN_MANIFEST, manifest(report))
    log(f"trained {options.model} ({options.kind}, {options.steps} steps, MaxText) -> {options.out}")
    return 0


# ----------------------------------------------------------------------------- requests

def write_request(options: TrainOptions, path: Path) -> Path:
    """The stage's options as a request file: what torchrun's workers and a submitted job read."""
    from methods.core.results import write_json_atomic

    write_json_atomic(path, {"stage": "train", "options": options.model_dump()}, sort_keys=False)
    return path


def read_request(path) -> TrainOptions:
    from methods.core.results import read_json

    request = read_json(Path(path))
    if not isinstance(request, dict) or request.get("stage") != "train" or not isinstance(request.get("options"), dict):
        raise UsageError(f"{path} is not a train request (written by the kit's plan or `lpc train`)")
    return parse_options(request["options"], where=str(path))


def worker_command(request: Path) -> list:
    """The python arguments (after the interpreter) that run this stage from a request file."""
    return ["-m", "training.stage", "--request", str(request)]


def _relaunch(options: TrainOptions) -> int:
    """The same stage on `nproc` local processes, through torchrun."""
    from training.engine import check_cpu_processes

    check_cpu_processes(options)
    with tempfile.TemporaryDirectory(prefix="lpc-train-") as folder:
        # A worker is launched by torchrun, which sets the world size: its request leaves out nproc.
        request = write_request(options.model_copy(update={"nproc": 1}), Path(folder) / "request.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={options.nproc}", *worker_command(request)]
        # The parent has checked and prepared everything; the workers must not delete what it kept.
        return subprocess.run(command).returncode


# ----------------------------------------------------------------------------- OUT

def done(out: Path, stamp: str) -> bool:
    manifest = Path(out) / TRAIN_MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == stamp


def state(out, stamp: str) -> str:
    """What a training stage's OUT holds for a run of fingerprint `stamp`: 'done', 'resumable'
    (this run's own checkpoints, or nothing yet) or 'stale' (another run's output)."""
    from training import checkpoint

    out = Path(out)
    if done(out, stamp):
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
    if state(out, stamp) == "resumable":
        return
    if replace_stale:
        shutil.rmtree(out)
        return
    if {p.name for p in out.iterdir()} <= {checkpoint.CHECKPOINTS, checkpoint.STAGING}:
        checkpoint.check_resumable(out, stamp)  # refused: another run's checkpoints, in its own words
    raise UsageError(f"{out} exists and holds something else; pass --overwrite to replace it")


def _empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.stage", description="one train stage from a request file")
    parser.add_argument("--request", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        return train(read_request(args.request))
    except UsageError as exc:
        print(f"lpc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

