"""Model specs, the one model loader, and checkpoints on disk.

A model is named by a local directory, a Hugging Face hub id (with an optional revision; the token
comes from HF_TOKEN in the environment, never from a file of ours), or `smoke` for the bundled
SmolLM2-135M-Instruct checkpoint. Every part of the kit loads a causal LM through `load_model`, which
knows the transformers versions' differences (`dtype=` since 4.56, `torch_dtype=` before) and the kit's
per-layer-width format (`lpc_llama`), and refuses what is not a decoder-only causal LM in one line.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

from methods.core.compat import dtype_kwarg
from methods.core.errors import UsageError

DTYPES = ("float32", "float16", "bfloat16")
# What the prune stage may compute in (--compute-dtype): float64 makes scores and statistics portable
# across machines whose float32 rounding differs (README, "Results across machines").
COMPUTE_DTYPES = DTYPES + ("float64",)


def torch_dtype(name: str):
    import torch

    if name not in COMPUTE_DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(COMPUTE_DTYPES)}")
    return getattr(torch, name)


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers on a command line's stderr: through the
    environment variables it reads when imported, or its logging module when it already is."""
    import os
    import sys

    if "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve(spec: str) -> str:
    """`smoke` -> the converted smoke model; a hub id -> where it is read from (methods/core/hub.py: the
    mirror's folder when LPC_HUB_MIRROR is set, else the id itself); a local path as it is."""
    if spec == "smoke":
        from methods.core.smoke_model import smoke_model_dir

        return str(smoke_model_dir())
    if is_hub_id(spec):
        from methods.core import hub

        return hub.model(spec)
    return spec


def is_hub_id(spec: str) -> bool:
    """`owner/name` (or a bare name) that is no local path: what the hub is asked for."""
    from methods.core.hub import is_local_path

    return not (not spec or spec == "smoke" or spec.count("/") > 1 or is_local_path(spec))


def checked_path(spec: str, flag: str = "--model") -> str:
    """`resolve`, refusing in one line a local path that is not a checkpoint directory (a hub id passes)."""
    path = resolve(spec)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise UsageError(f"{flag} {spec}: not a Hugging Face model directory (no config.json)")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UsageError(f"{flag} {spec}: model directory not found")
    return path


def read_config(path: str, flag: str = "--model", revision: Optional[str] = None):
    """A checkpoint's transformers config (the kit's `lpc_llama` included), or one line naming the flag."""
    from transformers import AutoConfig

    register_kit_format(path)
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {path}: cannot read its config: {_first_line(exc)}") from None


def stored_dtype(path: str) -> str:
    """The dtype a checkpoint was saved in (float32 when its config does not say one the kit loads)."""
    config = read_config(path)
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(value).replace("torch.", "") if value is not None else "float32"
    return name if name in DTYPES else "float32"


def load_model(spec: str, *, dtype: str = "float32", revision: Optional[str] = None,
               load_tokenizer: bool = True) -> Tuple[object, object]:
    """(model, tokenizer or None) on the CPU in `dtype`, in eval mode without a KV cache; methods move
    layers to the GPU themselves."""
    from transformers import AutoModelForCausalLM

    wanted = torch_dtype(dtype)
    path = checked_path(spec)
    _check_causal_lm(path, revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, **dtype_kwarg(wanted))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load model {path!r}: {_first_line(exc)}") from None
    model.eval()
    model.config.use_cache = False
    tokenizer = tokenizer_for(path, revision) if load_tokenizer else None
    return model, tokenizer


def empty_model(spec: str, *, dtype: str = "float32"):
    """The model `load_model(spec, dtype=dtype)` returns, its parameters on the meta device: the same
    class, config, generation config, modes and ties, and real non-persistent buffers (rotary
    `inv_freq`), computed as a normal build computes them. Nothing but the configs is read; the
    sharded training path (training/loading.py) fills each rank's shards from the checkpoint."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    wanted = torch_dtype(dtype)
    path = checked_path(spec)
    config = _check_causal_lm(path, None)
    # The build's weight initialisation runs on meta tensors; the fork keeps the global generator
    # exactly where from_pretrained leaves it (untouched), whatever a model's __init__ draws.
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(wanted))
    model.tie_weights()  # accelerate's empty parameters replace the tied one with two
    for name, value in dtype_kwarg(wanted).items():  # from_pretrained records the dtype it loaded in
        setattr(model.config, name, value)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # none saved: from_pretrained keeps the one derived from the config, as here
        pass
    model.eval()
    model.config.use_cache = False
    return model


def _check_causal_lm(path: str, revision: Optional[str]):
    from transformers import AutoConfig

    register_kit_format(path)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load model {path!r}: {_first_line(exc)}") from None
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or not any(a.endswith("ForCausalLM") for a in architectures):
        raise UsageError(f"{path} is not a decoder-only causal LM (architectures: {architectures or 'none'})")
    return config


def register_kit_format(path: str) -> None:
    """A checkpoint in one of the kit's per-layer formats (`lpc_<arch>`) loads without
    trust_remote_code once its format is registered; a stock checkpoint registers nothing."""
    import json

    from methods.modeling_lpc import register

    config = Path(path) / "config.json"
    if config.is_file():
        register(json.loads(config.read_text()).get("model_type") or "")
    else:
        register()  # a hub id: any of the formats may be what its config names


def tokenizer_for(path: str, revision: Optional[str] = None):
    from transformers import AutoTokenizer

    # The originals use the slow SentencePiece tokenizer where one exists (Llama-1/2); Llama-3 has none.
    for fast in (False, True):
        try:
            return AutoTokenizer.from_pretrained(path, revision=revision, use_fast=fast)
        # KeyError: transformers 4.43's tokenizer lookup by config class for a checkpoint without one.
        except (OSError, ValueError, TypeError, ImportError, KeyError):
            continue
    return None


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """Save as a Hugging Face checkpoint, atomically: DIR appears complete or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_with_manifest(model, tokenizer, out: Path, name: str, manifest: dict) -> None:
    """The checkpoint and its stage manifest appear together: a stage killed while saving leaves no
    directory that a rerun could take for a finished one."""
    from methods.core.results import write_json_atomic

    out = Path(out)
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(model, tokenizer, staging)
    write_json_atomic(staging / name, manifest)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

