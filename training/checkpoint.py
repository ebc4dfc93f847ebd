"""Resumable training state, and the export of the trained model as a Hugging Face checkpoint.

`OUT/checkpoints/step_<N>/` is one resumable state: the model's and the optimizer's sharded state
dicts, written by torch.distributed.checkpoint (every rank its own shards); `rank_<r>.pt` per rank
(its data position and RNG states); `meta.json` (the step, the run's fingerprint, the log so far).
It is written as `step_<N>.partial` and renamed by rank 0 only after every rank has finished, so a
save killed half-way leaves nothing that looks complete; the newest complete state is resumed and
the older ones are deleted once a newer one exists. The learning rate is a function of the step
(training.engine.lr_at), so the step is the scheduler's whole state.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from methods.core.errors import UsageError

CHECKPOINTS = "checkpoints"
STAGING = ".export"
STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class State:
    step: int
    log: List[dict]
    path: Path


def newest(out: Path) -> Optional[Path]:
    """The newest complete checkpoint under OUT, if any."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and
                   (p / "meta.json").is_file())
    return steps[-1][1] if steps else None


def check_resumable(out: Path, fingerprint: str) -> Optional[int]:
    """The step OUT's newest checkpoint would resume at, refusing one from a different run."""
    path = newest(out)
    if path is None:
        return None
    meta = json.loads((path / "meta.json").read_text())
    if meta["fingerprint"] != fingerprint:
        raise UsageError(f"{out} holds a checkpoint of another training run (other model, data or options); "
                         "use another --out, or --overwrite to start afresh")
    return int(meta["step"])


def resume(out: Path, model, optimizer, stream, *, fingerprint: str, run, extension=None) -> Optional[State]:
    """Load the newest complete state into the model, optimizer, data stream and RNGs (and a kind's
    `extension`, whose state_dict() rides in the rank file: the sheared kind's replicated gates)."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_resumable(out, fingerprint)
    path = newest(out)
    if path is None:
        return None
    meta = json.loads((path / "meta.json").read_text())
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = path / f"rank_{run.rank}.pt"
    if not mine.is_file():
        raise UsageError(f"{path} was written by {meta['world']} processes; resume it with --nproc {meta['world']}")
    # Written by this module for this run: plain Python objects and RNG byte tensors.
    extra = torch.load(mine, map_location="cpu", weights_only=False)
    stream.restore(extra["data"])
    _set_rng(extra["rng"])
    if extension is not None:
        extension.load_state_dict(extra["extension"])
    return State(int(meta["step"]), list(meta["log"]), path)


def save(out: Path, model, optimizer, stream, *, step: int, log: List[dict], fingerprint: str, run,
         extension=None) -> Path:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if run.main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    extra = {"data": stream.state(step), "rng": _get_rng()}
    if extension is not None:
        extra["extension"] = extension.state_dict()
    torch.save(extra, partial / f"rank_{run.rank}.pt")
    _test_hook("checkpoint-written")
    dist.barrier()
    if run.main:
        meta = {"step": step, "fingerprint": fingerprint, "world": run.world, "log": log}
        (partial / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for older in root.iterdir():
            if older != final and (STEP_DIR.match(older.name) or older.name.endswith(".partial")):
                shutil.rmtree(older, ignore_errors=True)
    dist.barrier()
    return final


def export(out: Path, model, tokenizer, *, run, prepare=None) -> None:
    """The trained weights as a plain Hugging Face checkpoint (safetensors) in OUT, written by rank 0.

    `prepare(model)` changes the gathered full-precision model before it is saved (the sheared kind
    folds its gates and prunes there)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.main:
        from transformers import AutoModelForCausalLM

        out = Path(out)
        staging = out / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        dtype = _saved_dtype(model.config)
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(model.config)
        work = torch.float32 if prepare else dtype
        fresh.load_state_dict({k: v.to(work) for k, v in full.items()}, assign=True, strict=False)
        fresh.tie_weights()
        missing = [name for name, p in fresh.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"the gathered state dict lacks {missing[:3]}")
        if prepare is not None:
            prepare(fresh)
            fresh.to(dtype)
        fresh.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        staging.rmdir()
    dist.barrier()


def discard(out: Path) -> None:
    """Delete the resumable states once the stage's manifest says the export is complete."""
    shutil.rmtree(Path(out) / CHECKPOINTS, ignore_errors=True)


def _test_hook(point: str) -> None:
    """Tests: LPC_TRAIN_TEST_KILL=<point> kills the process with SIGKILL there (a save cut short)."""
    if os.environ.get("LPC_TRAIN_TEST_KILL") == point:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _saved_dtype(config) -> torch.dtype:
    """The dtype the input checkpoint was stored in (training keeps fp32 master weights)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _get_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
