"""ShortGPT (Men et al. 2024, arXiv:2403.03853): remove the decoder layers that change the hidden
state least.

Block Influence of layer l: BI_l = 1 - cos(x_l, y_l), x the hidden state entering the layer, y the
one leaving it (after both residual adds), cosine over the hidden dimension. Two implementations are
reproduced; each calibration row is one forward pass (batch 1):

``variant="collection"`` (default; the LLM Pruning Collection's ``bi`` mode)
    Hooks on the decoder layers (the final norm is not involved). Per pass, 1 - mean over tokens of
    the cosine; BI_l is the mean over passes. The layers with the lowest BI are removed; among equal
    scores the later layer goes first (the collection keeps a stable descending sort's head).
    ``layers_removed`` is ascending, as the collection logs it.

``variant="unofficial"`` (sramshetty/ShortGPT, hf-models branch; no official code exists)
    The states of ``output_hidden_states``: h_0..h_{L-1} enter the layers, and h_L is the *final-normed*
    output, so the last layer is compared against norm(its output) (an upstream quirk, kept).
    ``metric="bi"``: importance_l = sum over all tokens of 1 - cos(h_l, h_{l+1}), a NaN cosine (a zero
    vector) counting as 0.5; removed = argsort(importance)[:k], in argsort order.
    ``metric="angular"`` (Gromov et al.'s angular distance): importance_i = sum over rows of
    arccos(cos(h_i, h_{i+k}))/pi on the last token only, for i = 0..L-k (the rest stay 0); the block
    [start, start+k) with the lowest importance is removed. Upstream takes the candidates as
    ``importances[:-k+1]``, which is empty for k = 1 and crashes; here the candidates are always
    i = 0..L-k, which is the same list for every k >= 2.

``variant="random"`` (the control of the random-removal comparison; no calibration is looked at)
    ``remove_layers`` distinct layers drawn uniformly with ``random.Random(seed).sample``, removed in
    draw order; ``scores`` is empty.

Deviation, both scored variants: cosines are computed in float32 whatever the model's dtype (upstream used
the model's fp16/bf16, where the dot products of large hidden states can overflow).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Annotated, Dict, List, Literal

from pydantic import Field, model_validator

from methods.core.numerics import widened
from methods.options import method_options

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn


@method_options
class Options:
    remove_layers: Annotated[int, Field(ge=1, description="how many decoder layers to remove")]
    variant: Annotated[Literal["collection", "unofficial", "random"], Field(
        description="the collection's Block Influence, sramshetty/ShortGPT's, or a random draw")] = "collection"
    metric: Annotated[Literal["bi", "angular"], Field(
        description="Block Influence, or Gromov et al.'s angular distance (unofficial variant only)")] = "bi"
    seed: Annotated[int, Field(description="seed of the random variant's draw")] = 0

    @model_validator(mode="after")
    def _angular_needs_the_unofficial_variant(self) -> "Options":
        if self.metric == "angular" and self.variant != "unofficial":
            raise ValueError("metric 'angular' exists only in the unofficial (sramshetty) variant: "
                             "add variant=unofficial")
        return self


def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> dict:
    import numpy as np

    from methods import depth, surgery

    count = options.remove_layers
    total = surgery.check_removable(model, count)
    if options.variant == "random":
        removed = random.Random(options.seed).sample(range(total), count)
        surgery.remove_layers(model, removed)
        return {"scores": {}, "layers_removed": removed, "layers_removed_sorted": sorted(removed), "seed": options.seed}
    with depth.on_device(model, device):
        if options.variant == "collection":
            scores = collection_bi(model, calib)
            removed = lowest_collection(scores, count)
        elif options.metric == "bi":
            scores = unofficial_bi(model, calib)
            removed = [int(i) for i in np.argsort(np.array(scores))[:count]]
        else:
            scores = unofficial_angular(model, calib, count)
            start = int(np.argsort(np.array(scores[:total - count + 1]))[0])
            removed = list(range(start, start + count))
    surgery.remove_layers(model, removed)
    key = "angular" if options.metric == "angular" else "block_influence"
    return {"scores": {key: [float(s) for s in scores]}, "layers_removed": removed,
            "layers_removed_sorted": sorted(removed), "passes": int(calib.shape[0])}


def collection_bi(model: nn.Module, calib: torch.Tensor) -> List[float]:
    """Per layer: mean over passes of (1 - mean over tokens of cos(layer input, layer output))."""
    import torch
    import torch.nn.functional as F

    from methods import depth
    from methods.anatomy import decoder_layers

    sums = [0.0] * len(decoder_layers(model))

    def on_layer(index: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        cos = F.cosine_similarity(widened(hidden_in), widened(hidden_out), dim=-1)
        sums[index] += (1 - cos.mean()).item()

    with depth.watch_layers(model, on_layer):
        depth.run_rows(model, calib)
    return [s / calib.shape[0] for s in sums]


def lowest_collection(scores: List[float], count: int) -> List[int]:
    """The collection's drop list: everything after the top (L - count) of a stable descending sort."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    return sorted(order[len(scores) - count:])


def _hidden_states(model: nn.Module, row: torch.Tensor) -> List[torch.Tensor]:
    """output_hidden_states semantics from hooks (version-proof): the inputs of layers 0..L-1, then
    the final norm's output. Each [tokens, hidden] in float32."""
    import torch

    from methods import depth
    from methods.anatomy import final_norm

    states: Dict[int, torch.Tensor] = {}

    def on_layer(index: int, hidden_in: torch.Tensor, _out: torch.Tensor) -> None:
        states[index] = widened(hidden_in.detach().reshape(-1, hidden_in.shape[-1]))

    def on_norm(_module, _args, output) -> None:
        states[len(states)] = widened(output.detach().reshape(-1, output.shape[-1]))

    handle = final_norm(model).register_forward_hook(on_norm)
    try:
        with depth.watch_layers(model, on_layer):
            depth.run_rows(model, row.reshape(1, -1))
    finally:
        handle.remove()
    return [states[i] for i in range(len(states))]


def unofficial_bi(model: nn.Module, calib: torch.Tensor) -> List[float]:
    from methods import depth
    from methods.anatomy import decoder_layers

    total = len(decoder_layers(model))
    importances = [0.0] * total
    for row in calib:
        states = _hidden_states(model, row)
        for i in range(total):
            cos = depth.cosine(states[i], states[i + 1]).nan_to_num(nan=0.5)
            importances[i] += (1 - cos).sum().item()
    return importances


def unofficial_angular(model: nn.Module, calib: torch.Tensor, count: int) -> List[float]:
    import torch

    from methods import depth
    from methods.anatomy import decoder_layers

    total = len(decoder_layers(model))
    importances = [0.0] * total
    for row in calib:
        states = _hidden_states(model, row)
        for i in range(total - count + 1):
            cos = depth.cosine(states[i][-1:], states[i + count][-1:]).nan_to_num(nan=0.5)
            importances[i] += (torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi).sum().item()
    return importances
