"""Pruning methods: pure functions of (model, calibration token ids, options), behind one registry.

    report = methods.prune(model, "wanda", calib, sparsity_ratio=0.5, sparsity_type="2:4")

prunes `model` in place and returns a JSON-able report (per-Linear sparsity, timings, what the
method chose). `methods.REGISTRY` (methods/registry.py) lists what is implemented and which image runs each; each entry names its options type,
a frozen pydantic dataclass whose fields declare the method's options and their constraints
(methods/options.py).
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from pydantic import ValidationError

from methods.core.errors import UsageError
from methods.options import declared, one_line
from methods.registry import REGISTRY, Method

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn


def get(name: str) -> Method:
    if name in REGISTRY:
        return REGISTRY[name]
    raise UsageError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")


def make_options(method: Method, values: Dict[str, Any]):
    """Build and validate the method's options from a dict; any refusal is one UsageError line."""
    fields = declared(method.options_type)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"method {method.name!r} takes no option {', '.join(unknown)}")
    try:
        return method.options_type(**values)
    except ValidationError as exc:
        raise UsageError(f"method {method.name!r}: {one_line(exc, fields)}") from None


def prune(model: nn.Module, name: str, calib: Optional[torch.Tensor] = None, *,
          device: Optional[str] = None, tokenizer: Any = None, state: Any = None,
          calib_batch: Union[int, str] = 1, **options: Any) -> dict:
    """Prune `model` in place with method `name`; return the report that goes into prune.json.

    Structured methods report, per dense layer, the kept unit indices (`layers[i].heads_kept`,
    `kv_heads_kept`, `mlp_channels_kept`), `hidden_kept`, `layers_removed` and the `scores` they
    ranked; the model's config is re-synced to the pruned shapes (methods/surgery.py).
    A method whose pruning is a training run (`Method.trains`) folds that run's learned `state`.
    `calib_batch` (an int or "auto") is how many calibration samples the layer-by-layer engine feeds
    per call (methods/calibration.py); 1, the default, reproduces the originals exactly.
    """
    from methods import calibration
    from methods.anatomy import check_supported, sparsity_report
    from methods.core.batching import compute_device

    from methods import surgery

    method = get(name)
    opts = make_options(method, options)
    check_supported(model)
    if method.needs_calibration:
        _check_calibration(calib, model)
    calib_batch = calibration.parse_batch(calib_batch)
    if calib_batch != 1 and not method.batched_calibration:
        batched = ", ".join(m.name for m in REGISTRY.values() if m.batched_calibration)
        raise UsageError(f"method {name!r} gathers its calibration statistics one sample at a time; "
                         f"a calibration batch applies to {batched} only")
    compute = compute_device(device)
    model.eval()
    dense_parameters = surgery.count_parameters(model)
    extra = {"tokenizer": tokenizer} if method.needs_tokenizer else {}
    if method.trains:
        extra["state"] = state   # what the method's training run learned; the method says when it needs it
    start = time.perf_counter()
    with calibration.calibration_batch(calib_batch) as batching:
        report = method.run(model, None if calib is None else calib.long(), opts, compute, **extra)
    seconds = time.perf_counter() - start
    report.update({"method": name, "options": dataclasses.asdict(opts), "device": str(compute)})
    if batching.used is not None:
        report["calib_batch"] = {"requested": batching.requested, "used": batching.used}
    if method.structured:
        surgery.sync_config(model)
        pruned = surgery.count_parameters(model)
        report["parameters"] = {"dense": dense_parameters, "pruned": pruned,
                                "removed_fraction": 1 - pruned / dense_parameters}
        report["widths"] = [{k: v for k, v in w.items() if not k.endswith("_bias")}
                            for w in surgery.layer_widths(model)]
    else:
        report["sparsity"], report["overall_sparsity"] = sparsity_report(model)
    report["seconds"] = seconds
    return report


def _check_calibration(calib: Optional[torch.Tensor], model: nn.Module) -> None:
    import torch

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
