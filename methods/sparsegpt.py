"""SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774) as run inside the Wanda repository.

Per Linear: Hessian of the layer inputs from the still-dense decoder layer, then mask selection and
OBS weight reconstruction (`methods.sparsity.sparsegpt_prune`); sequential across decoder layers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from methods.options import method_options
from methods.sparsity import Hessian, SparseOptions, hessian_factor, sparsegpt_prune

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn


@method_options
class Options(SparseOptions):
    blocksize: Annotated[int, Field(gt=0, description="columns pruned and updated together")] = 128
    percdamp: Annotated[float, Field(gt=0, description="Hessian dampening, a fraction of its mean diagonal")] = 0.01

    @model_validator(mode="after")
    def _blocks_hold_whole_groups(self) -> "Options":
        # N:M groups are chosen inside a block, so a group may not straddle two blocks.
        pattern = self.pattern()
        if pattern.is_nm and self.blocksize % pattern.m:
            raise ValueError(f"blocksize {self.blocksize} is not a multiple of M={pattern.m}")
        return self


def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> dict:
    import torch
    from torch import nn

    from methods.anatomy import linear_layers, prunable_linears
    from methods.calibration import LayerInputs, SharedInputStatistics, gather_inputs, sequential_layers

    pattern = options.checked_pattern(prunable_linears(model))

    def handle_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        linears = linear_layers(layer)
        # q/k/v (and gate/up) see one input: one Hessian and one factor serve them all, the same numbers.
        hessians = SharedInputStatistics(linears, lambda m: Hessian(m.in_features, device))
        gather_inputs(layer, inputs, hessians.collectors())
        factors = {}
        for name, module in linears.items():
            owner = hessians.owner[name]
            if owner not in factors:
                factors[owner] = hessian_factor(hessians.stats.pop(owner).value, options.percdamp)
            pruned = sparsegpt_prune(module.weight.data, factors[owner], pattern, blocksize=options.blocksize)
            module.weight.data = pruned.to(module.weight.dtype)

    # The original turns TF32 off for SparseGPT; masks depend on it.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        sequential_layers(model, calib, device, handle_layer)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"pattern": pattern.name, "blocksize": options.blocksize, "percdamp": options.percdamp}
