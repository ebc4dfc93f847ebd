"""Magnitude pruning (the baseline of the Wanda paper): |W|, no calibration, no weight update."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from methods.anatomy import prunable_linears
from methods.sparsity import SparseOptions, magnitude_mask


@dataclass(frozen=True)
class Options(SparseOptions):
    # The original prunes int(ratio*numel)+1 entries plus ties; True prunes exactly int(ratio*numel).
    exact_count: bool = False


def prune(model: nn.Module, calib: Optional[torch.Tensor], options: Options, device: torch.device) -> dict:
    linears = prunable_linears(model)
    pattern = options.checked_pattern(linears)
    with torch.no_grad():
        for module in linears.values():
            weight = module.weight.data
            mask = magnitude_mask(weight.to(device), pattern, exact_count=options.exact_count)
            weight.masked_fill_(mask.to(weight.device), 0)
    return {"pattern": pattern.name}
