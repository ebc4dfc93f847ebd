"""Magnitude pruning (the baseline of the Wanda paper): |W|, no calibration, no weight update."""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

from pydantic import Field

from methods.options import method_options
from methods.sparsity import SparseOptions, magnitude_mask

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn


@method_options
class Options(SparseOptions):
    exact_count: Annotated[bool, Field(description=(
        "prune exactly int(ratio*numel) weights, not the original's int(ratio*numel)+1 plus ties"))] = False


def prune(model: nn.Module, calib: Optional[torch.Tensor], options: Options, device: torch.device) -> dict:
    import torch

    from methods.anatomy import prunable_linears

    linears = prunable_linears(model)
    pattern = options.checked_pattern(linears)
    with torch.no_grad():
        for module in linears.values():
            weight = module.weight.data
            mask = magnitude_mask(weight.to(device), pattern, exact_count=options.exact_count)
            weight.masked_fill_(mask.to(weight.device), 0)
    return {"pattern": pattern.name}
