"""Wanda-sp: structured Wanda, the width baseline of the FLAP repository
(An et al., AAAI 2024), with its mag-sp baseline.

Per decoder layer, in order, on inputs produced by the already-pruned earlier layers (sequential):

* statistic: Wanda's a_j = running mean over samples of ||x_j||² of the inputs of o_proj and
  down_proj, gathered in one pass through the still-dense layer;
* column score: mean over output rows i of |W_ij| * sqrt(a_j), for W = o_proj and W = down_proj;
* an MLP channel scores its down_proj column; an attention head scores the sum of its head_dim
  columns; a key/value group scores the sum of its query heads (the head itself under MHA);
* selection is uniform: sort a layer's scores ascending, take the one at index int(ratio * n) as the
  threshold and keep every unit scoring >= it (ties at the threshold survive, as in the original):
  int(ratio * kv_heads) groups and int(ratio * intermediate) channels go from every layer;
* the attention units are cut first, then the MLP channels, without bias compensation; the engine
  then runs the pruned layer to make the next layer's inputs.

`score="magnitude"` is the repository's mag-sp baseline: the column score is ||W[:, j]||₂ instead and
no calibration data is used (the registry still asks for some, which is ignored).

Grouped-query attention (the original is MHA only): whole key/value groups are removed, the key and
value head together with every query head that reads it, so the grouping stays valid.

Calibration in the original: C4, 128 samples x 128 tokens (data spec `c4`). Its scripts pass
`--nsamples 1024`, whose slots past the 128 its loader fills stay all-zero (896 of them): they only rescale a_j uniformly, so
the ranking, hence the result, is that of the 128 real samples; this implementation uses exactly
the samples it is given.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Dict, List, Literal, Optional

from pydantic import Field

from methods.core.numerics import widened
from methods.options import method_options
from methods.sparsity import InputSquaredNorm

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn


@method_options
class Options:
    pruning_ratio: Annotated[float, Field(
        gt=0, lt=1, description="fraction of key/value groups and of MLP channels removed from every layer")]
    score: Annotated[Literal["wanda", "magnitude"], Field(
        description="column score: Wanda's |W|·||x||, or the weight norm (the repository's mag-sp baseline)")
    ] = "wanda"


def column_scores(weight: torch.Tensor, squared_norm: Optional[torch.Tensor]) -> torch.Tensor:
    """One score per input column: Wanda's row-mean of |W| * sqrt(a), or (no statistic) ||W[:, j]||₂."""
    import torch

    if squared_norm is None:
        return widened(torch.norm(weight, dim=0))  # in the weights' dtype, as the original
    return (widened(weight.abs()) * torch.sqrt(squared_norm.reshape(1, -1))).mean(dim=0)


def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> dict:
    import torch
    from torch import nn

    from methods import width_stats
    from methods.anatomy import decoder_layers
    from methods.calibration import LayerInputs, gather_inputs, sequential_layers

    head_scores: List[List[float]] = []
    channel_scores: List[List[float]] = []
    layers: List[Dict[str, List[int]]] = []

    def prune_layer(layer: nn.Module, norms: List[Optional[torch.Tensor]]) -> None:
        """`norms`: the statistics of o_proj's and down_proj's inputs (None: mag-sp)."""
        kv_heads, size, head_dim = width_stats.group_layout(layer)
        o_proj, down_proj = width_stats.scored_linears(layer).values()
        columns = column_scores(o_proj.weight.data, norms[0])
        # Per head first (the original's sum over head_dim columns), then per key/value group.
        groups = columns.reshape(-1, head_dim).sum(dim=1).reshape(kv_heads, size).sum(dim=1)
        mlp = column_scores(down_proj.weight.data, norms[1])
        keep_groups = width_stats.uniform_keep(groups, options.pruning_ratio)
        keep_channels = width_stats.uniform_keep(mlp, options.pruning_ratio)
        layers.append(width_stats.apply_selection(layer, keep_groups, keep_channels))
        head_scores.append(width_stats.floats(groups))
        channel_scores.append(width_stats.floats(mlp))

    if options.score == "magnitude":
        # mag-sp reads only the weights: no calibration pass at all, as in the original.
        for layer in decoder_layers(model):
            prune_layer(layer, [None, None])
    else:
        def handle_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            linears = width_stats.scored_linears(layer)
            stats = {name: InputSquaredNorm(linear.in_features, device) for name, linear in linears.items()}
            gather_inputs(layer, inputs, {name: s.add for name, s in stats.items()})
            for name, stat in stats.items():
                width_stats.publish(index, name, "scaler_row", stat.value)
            prune_layer(layer, [s.value for s in stats.values()])

        sequential_layers(model, calib, device, handle_layer)
    return {"layers": layers, "scores": {"heads": head_scores, "mlp_channels": channel_scores}}
