"""Wanda (Sun et al. 2023, arXiv:2306.11695): prune by |W_ij| * ||X_j||, no weight update.

Within a decoder layer all seven projections take their input statistics from one pass through the
still-dense layer; across layers the process is sequential (layer i+1 sees the pruned layer i).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from methods.sparsity import InputSquaredNorm, SparseOptions, wanda_mask

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn

Options = SparseOptions


def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> dict:
    from torch import nn

    from methods.anatomy import linear_layers, prunable_linears
    from methods.calibration import LayerInputs, SharedInputStatistics, gather_inputs, sequential_layers

    pattern = options.checked_pattern(prunable_linears(model))

    def handle_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        linears = linear_layers(layer)
        norms = SharedInputStatistics(linears, lambda m: InputSquaredNorm(m.in_features, device))
        gather_inputs(layer, inputs, norms.collectors())
        for name, module in linears.items():
            mask = wanda_mask(module.weight.data, norms[name].value, pattern)
            module.weight.data.masked_fill_(mask, 0)

    sequential_layers(model, calib, device, handle_layer)
    return {"pattern": pattern.name}
