"""Loading models to prune and saving what was pruned.

A model is named by a local directory, a Hugging Face hub id (with an optional revision; the token
comes from HF_TOKEN in the environment, never from a file of ours), or `smoke` for the bundled
SmolLM2-135M-Instruct checkpoint.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

from methods.anatomy import check_supported
from methods.errors import UsageError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`dtype=` on transformers >= 4.56, `torch_dtype=` before (the new name warns on old, and vice versa)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers on a command line's stderr."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve(spec: str) -> str:
    if spec == "smoke":
        from repro.smoke_model import smoke_model_dir

        return str(smoke_model_dir())
    return spec


def checked_path(spec: str, flag: str = "--model") -> str:
    """`resolve`, refusing in one line a local path that is not a checkpoint directory (a hub id passes)."""
    path = resolve(spec)
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise UsageError(f"{flag} {spec}: not a Hugging Face model directory (no config.json)")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UsageError(f"{flag} {spec}: model directory not found")
    return path


def load_model(spec: str, *, dtype: str = "float32", revision: Optional[str] = None,
               load_tokenizer: bool = True) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer or None) on the CPU in `dtype`; methods move layers to the GPU themselves."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from methods.modeling_lpc import register

    register()  # structurally pruned checkpoints of this kit (lpc_<arch>) load without trust_remote_code
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    path = checked_path(spec)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load model {path!r}: {_first_line(exc)}") from None
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or not any(a.endswith("ForCausalLM") for a in architectures):
        raise UsageError(f"{path} is not a decoder-only causal LM (architectures: {architectures or 'none'})")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, **dtype_kwarg(DTYPES[dtype]))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load model {path!r}: {_first_line(exc)}") from None
    check_supported(model)
    model.eval()
    model.config.use_cache = False
    tokenizer = tokenizer_for(path, revision) if load_tokenizer else None
    return model, tokenizer


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


def save_checkpoint(model: torch.nn.Module, tokenizer, out: Path) -> None:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
