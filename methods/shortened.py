"""Shortened LLaMA (Kim et al. 2024, arXiv:2402.02834): remove whole decoder blocks, chosen one-shot.

Every block gets one importance score from the dense model, the blocks are ranked ascending (least
important first), and the first `remove_layers` candidates are deleted. Nothing is re-scored after a
removal. Two criteria:

* ``ppl``: the perplexity of the calibration rows (methods.scoring's ``rows`` protocol: each row fed
  alone, exp of the mean token NLL) when only that block is missing. The block whose absence hurts
  least goes first.
* ``taylor``: one backward pass of the causal-LM loss over all calibration rows as one batch, in
  ``grad_dtype`` (methods/gradients.py); per weight, salience s = W * dL/dW; a matrix scores
  sum_rows(sum_cols |s|^p), an RMSNorm vector sum |s|^p (p = `norm_power`); the block scores the sum
  of its weights' scores. Every parameter of the block whose name holds "weight" counts, the two
  RMSNorms included; biases do not. A norm stored as an offset from 1 (Gemma) counts with the scale
  it applies, 1 + w, as it would be stored in a Llama.

The "+" heuristic (on by default, for both criteria, as in the original's block_prune.py) takes
blocks 0-3 and the last two out of the candidates; ``plus_heuristic=False`` is the original's
``--no_plus_heuristic``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, List, Literal, Optional, Sequence

from pydantic import Field

from methods import gradients
from methods.core.errors import UsageError
from methods.core.numerics import widened
from methods.options import method_options

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn

FIRST_KEPT = 4   # blocks 0..3 are never candidates under "+"
LAST_KEPT = 2    # nor are the last two


Reduction = Literal["sum", "mean", "max", "prod"]


@method_options
class Options:
    criterion: Annotated[Literal["ppl", "taylor"], Field(
        description="block importance: perplexity without the block, or Taylor+ (first-order salience)")]
    remove_layers: Annotated[int, Field(ge=1, description="how many blocks to delete")]
    plus_heuristic: Annotated[bool, Field(
        description="keep blocks 0-3 and the last two out of the candidates (the '+')")] = True
    norm_power: Annotated[int, Field(ge=1, description="taylor: p in |W * G|^p")] = 1
    weight_reduction: Annotated[Reduction, Field(
        description="taylor: over a weight's rows (matrix) or entries (norm vector)")] = "sum"
    block_reduction: Annotated[Reduction, Field(description="taylor: over a block's weight scores")] = "sum"
    # The original ran LLaMA-1's Taylor analysis on the CPU in fp32, and Llama-2's (--use_bfloat) in
    # the loaded bf16.
    grad_dtype: Annotated[gradients.GradDtype, Field(
        description="taylor: dtype of the backward pass ('model': the loaded dtype)")] = "float32"


def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> dict:
    from methods import surgery
    from methods.depth import on_device

    total = surgery.check_removable(model, options.remove_layers)
    pool = candidates(range(total), total, options.plus_heuristic)
    if options.remove_layers > len(pool):
        raise UsageError(f"remove_layers={options.remove_layers} exceeds the {len(pool)} candidate blocks left "
                         f"of {total} after the '+' heuristic (blocks 0-3 and the last two are kept)")
    # Both criteria run the model whole, as the original did; the gradient pass moves it itself.
    if options.criterion == "ppl":
        with on_device(model, device):
            scores = ppl_scores(model, calib)
    else:
        scores = taylor_scores(model, calib, options, device)
    order = rank(scores)
    removed = blocks_to_remove(order, options.remove_layers, total, options.plus_heuristic)
    surgery.remove_layers(model, removed)
    return {
        "criterion": options.criterion,
        "scores": {"block": scores, "order": order},
        "layers_removed": removed,
        "layers_kept": [i for i in range(total) if i not in removed],
    }


# ----------------------------------------------------------------------------- ranking and selection

def rank(scores: Sequence[float]) -> List[int]:
    """Block indices, least important (lowest score) first; ties keep index order, as Python's sort.

    A NaN score (a forward that overflowed) ranks last: such a block is not safe to remove.
    """
    return sorted(range(len(scores)), key=lambda i: (math.isnan(scores[i]), scores[i]))


def candidates(order: Sequence[int], num_layers: int, plus_heuristic: bool) -> List[int]:
    """`order` without the blocks the "+" heuristic protects (all of it when the heuristic is off)."""
    order = [int(i) for i in order]
    if not plus_heuristic:
        return order
    protected = set(range(FIRST_KEPT)) | set(range(num_layers - LAST_KEPT, num_layers))
    return [i for i in order if i not in protected]


def blocks_to_remove(order: Sequence[int], k: int, num_layers: int, plus_heuristic: bool) -> List[int]:
    """The first `k` candidates of `order`, in removal order."""
    pool = candidates(order, num_layers, plus_heuristic)
    if k > len(pool):
        raise UsageError(f"cannot remove {k} blocks: only {len(pool)} candidates")
    return pool[:k]


# ----------------------------------------------------------------------------- PPL criterion

def ppl_scores(model: nn.Module, calib: torch.Tensor) -> List[float]:
    """Per block b: the calibration perplexity of the model with b skipped (no weight is copied)."""
    from methods.anatomy import decoder_layers
    from methods.depth import layers_skipped
    from methods.scoring import perplexity

    scores = []
    for block in range(len(decoder_layers(model))):
        with layers_skipped(model, [block]):
            scores.append(perplexity(model, calib, "rows"))
    return scores


# ----------------------------------------------------------------------------- Taylor criterion

def taylor_scores(model: nn.Module, calib: torch.Tensor, options: Options,
                  device: Optional[torch.device] = None) -> List[float]:
    """Per block: the reduction of its weights' |W * G|^p scores (see the module docstring).

    The pass runs on `device` (default: where the model is)."""
    import torch

    from methods.anatomy import anatomy_of, decoder_layers
    from methods.depth import input_device

    weights = [[(name, p) for name, p in layer.named_parameters() if "weight" in name]
               for layer in decoder_layers(model)]
    anatomy = anatomy_of(model)
    norms = {f"{name}.weight" for name in anatomy.norms}
    scores = []
    device = input_device(model) if device is None else device
    with gradients.on_device(model, device, options.grad_dtype, trainable=[p for block in weights for _, p in block]):
        gradients.backward(model, calib)
        for block in weights:
            values = []
            for name, p in block:
                # The product in the dtype the backward ran in, then fp32, as the original did.
                weight = p.detach() + anatomy.norm_offset if anatomy.norm_offset and name in norms else p.detach()
                values.append(_weight_score(widened(weight * p.grad), name, options))
                p.grad = None  # free as we go: a 7B model's fp32 gradients alone take 26 GB
            scores.append(_reduce(torch.tensor(values, dtype=torch.float32), options.block_reduction).item())
    return scores


def _weight_score(salience: torch.Tensor, name: str, options: Options) -> float:
    powered = salience.abs().pow(options.norm_power)
    if powered.dim() == 2:      # [out, in]: one value per output row first
        per_unit = powered.sum(dim=1)
    elif powered.dim() == 1:    # a norm's weight vector
        per_unit = powered
    else:
        raise UsageError(f"cannot score block weight {name} of shape {list(salience.shape)}")
    return _reduce(per_unit, options.weight_reduction).item()


def _reduce(values: torch.Tensor, how: str) -> torch.Tensor:
    import torch

    if how == "sum":
        return values.sum(dim=0)
    if how == "mean":
        return values.mean(dim=0)
    if how == "max":
        return values.max(dim=0)[0]
    return torch.prod(values, dim=0)
