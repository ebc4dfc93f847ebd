"""Pruning methods: pure functions of (model, calibration token ids, options), behind one registry.

    report = methods.prune(model, "wanda", calib, sparsity_ratio=0.5, sparsity_type="2:4")

prunes `model` in place and returns a JSON-able report (per-Linear sparsity, timings, what the
method chose). `methods.REGISTRY` lists what is implemented; each entry names its options type,
whose fields are the method's validated options.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from methods import magnitude, sparsegpt, wanda
from methods.anatomy import check_llama_like, compute_device, overall_sparsity, sparsity_by_module
from methods.errors import UsageError

# Names the architecture reserves for methods that later work adds.
PLANNED = ("wanda-sp", "flap", "llm-pruner", "shortgpt", "minitron-depth", "minitron-width",
           "shortened", "sheared")


@dataclass(frozen=True)
class Method:
    name: str
    options_type: type
    run: Callable[..., dict]
    needs_calibration: bool
    family: str          # which pinned image reproduces it (docker/<family>/)


REGISTRY: Dict[str, Method] = {m.name: m for m in (
    Method("magnitude", magnitude.Options, magnitude.prune, needs_calibration=False, family="sparse"),
    Method("wanda", wanda.Options, wanda.prune, needs_calibration=True, family="sparse"),
    Method("sparsegpt", sparsegpt.Options, sparsegpt.prune, needs_calibration=True, family="sparse"),
)}


def get(name: str) -> Method:
    if name in REGISTRY:
        return REGISTRY[name]
    if name in PLANNED:
        raise UsageError(f"method {name!r} is not implemented in this version of the kit")
    raise UsageError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")


def make_options(method: Method, values: Dict[str, Any]):
    """Build the method's options from a dict, refusing keys the method does not take."""
    fields = {f.name for f in dataclasses.fields(method.options_type)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UsageError(f"method {method.name!r} takes no option {', '.join(unknown)}")
    options = method.options_type(**values)
    if hasattr(options, "pattern"):
        options.pattern()  # options validate themselves when their pattern is built
    return options


def prune(model: nn.Module, name: str, calib: Optional[torch.Tensor] = None, *,
          device: Optional[str] = None, **options: Any) -> dict:
    """Prune `model` in place with method `name`; return the report that goes into prune.json."""
    method = get(name)
    opts = make_options(method, options)
    check_llama_like(model)
    if method.needs_calibration:
        _check_calibration(calib, model)
    compute = compute_device(device)
    model.eval()
    start = time.perf_counter()
    report = method.run(model, None if calib is None else calib.long(), opts, compute)
    seconds = time.perf_counter() - start
    report.update({
        "method": name,
        "options": dataclasses.asdict(opts),
        "device": str(compute),
        "sparsity": sparsity_by_module(model),
        "overall_sparsity": overall_sparsity(model),
        "seconds": seconds,
    })
    return report


def _check_calibration(calib: Optional[torch.Tensor], model: nn.Module) -> None:
    if calib is None:
        raise UsageError("this method needs calibration data (--calib)")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2:
        raise UsageError("calibration must be a 2-D tensor of token ids [nsamples, seqlen]")
    if calib.dtype not in (torch.int64, torch.int32):
        raise UsageError(f"calibration token ids must be integers, got {calib.dtype}")
    if calib.numel() == 0:
        raise UsageError("calibration tensor is empty")
    vocab = model.get_input_embeddings().num_embeddings
    if int(calib.min()) < 0 or int(calib.max()) >= vocab:
        raise UsageError(f"calibration token ids must lie in [0, {vocab}), found {int(calib.min())}..{int(calib.max())}")
