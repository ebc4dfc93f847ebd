"""Minitron width pruning (Sreenivas et al. 2024, arXiv:2408.11796; LLM Pruning Collection
``prune_width.py``): rank MLP neurons and residual-stream channels by activation magnitude on the
calibration rows, keep the top ones, optionally prune query heads.

Statistics, from one pass of every calibration row (batch 1) through the dense model:

* MLP neurons of layer l: the input of ``mlp.down_proj`` (act(gate) * up), [batch, seq, ffn].
* Hidden channels: the outputs of *both* RMSNorms of *every* layer, all 2L of them summed into one
  vector (the final norm and the embedding are not watched). These are the norms that feed attention
  and the MLP (the anatomy's input norms: Gemma 2's pre_feedforward_layernorm, not its
  post_attention_layernorm, which is a block's output norm there).
* Query heads (only with ``num_heads``): the input of ``o_proj`` (per-head attention output).

Aggregation of one hooked tensor x [batch, seq, units]:

``aggregation="collection"`` (default)
    sum over seq of (mean over batch of |x|)^2, summed over passes and over hooks, no square root;
    computed in x's dtype and added into a float32 buffer, as the collection does.
``aggregation="nvidia"`` (NVIDIA Model-Optimizer's Megatron plugin, whose tensors are [seq, batch, units])
    sum over batch of (mean over seq of |x|)^2, summed over passes, square root per hook, then the
    hooks' roots summed (for hidden channels, the sum of per-norm L2 values). Computed in float32.

With batch 1 the collection's score is the sum over all calibration tokens of x^2 and NVIDIA's the
sum over rows of (mean_t |x|)^2: rankings can differ.

Selection: the top ``hidden_size`` channels and, per layer, the top ``ffn_hidden_size`` neurons, in
importance order (descending, ``torch.sort``); that order becomes the pruned model's channel order,
as in the collection (every consumer is permuted alike, so the function is unchanged).

Heads are not scored by the collection at all (``num_heads=None``, the default: the paper reports
that keeping every head works better). With ``num_heads`` set, query heads are ranked as NVIDIA does,
inside each key/value group: a head's score is the L2 norm over its head_dim channels of the per-
channel o_proj-input importance (aggregated as above), and every group keeps
num_heads / kv_heads heads; every key/value head stays. head_dim never changes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Dict, List, Literal, Optional

from pydantic import Field

from methods.architectures import submodule
from methods.core.errors import UsageError
from methods.core.numerics import running_zeros, widened
from methods.options import method_options

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn


@method_options
class Options:
    hidden_size: Annotated[int, Field(ge=1, description="hidden (residual) channels kept")]
    ffn_hidden_size: Annotated[int, Field(ge=1, description="MLP channels kept in every layer")]
    aggregation: Annotated[Literal["collection", "nvidia"], Field(
        description="how activations are aggregated into importance: the collection's or NVIDIA's rule")
    ] = "collection"
    num_heads: Annotated[Optional[int], Field(
        ge=1, description="query heads kept per layer, ranked inside each key/value group (default: all)")] = None


class Importance:
    """One accumulator per hooked tensor, aggregated over calibration passes by one of the rules."""

    def __init__(self, size: int, aggregation: str, device: torch.device):
        import torch

        self.aggregation = aggregation
        self.total = torch.zeros(size, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Fold in one hooked tensor x [batch, seq, units]."""
        x = x.detach()
        self.total = running_zeros(self.total, x)
        if self.aggregation == "collection":
            self.total += x.abs().mean(dim=0).pow(2).sum(dim=0)
        else:
            self.total += widened(x).abs().mean(dim=1).pow(2).sum(dim=0)

    @property
    def value(self) -> torch.Tensor:
        """The hook's contribution to a ranking (after the per-hook square root for NVIDIA)."""
        return self.total if self.aggregation == "collection" else self.total.sqrt()


def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> dict:
    from methods import depth, surgery
    from methods.anatomy import decoder_layers

    layers = decoder_layers(model)
    _check_targets(model, options)
    with depth.on_device(model, device):
        stats = gather(model, calib, options, device)
    hidden_score = sum(s.value for s in stats["norms"])
    mlp_scores = [s.value for s in stats["mlp"]]
    report_layers: List[Dict[str, List[int]]] = [{} for _ in layers]
    scores: Dict[str, object] = {"hidden": hidden_score.tolist(), "mlp_channels": [s.tolist() for s in mlp_scores]}
    if options.num_heads is not None:
        head_scores = [head_importance(layer, s.value) for layer, s in zip(layers, stats["heads"])]
        scores["heads"] = [h.tolist() for h in head_scores]
        for index, (layer, score) in enumerate(zip(layers, head_scores)):
            report_layers[index].update(surgery.keep_heads(layer, heads_to_keep(layer, score, options.num_heads)))
    for index, (layer, score) in enumerate(zip(layers, mlp_scores)):
        keep = top(score, options.ffn_hidden_size)
        report_layers[index]["mlp_channels_kept"] = surgery.keep_mlp_channels(layer, keep)
    hidden_kept = surgery.keep_hidden_channels(model, top(hidden_score, options.hidden_size))
    return {"hidden_kept": hidden_kept, "layers": report_layers, "scores": scores,
            "aggregation": options.aggregation, "passes": int(calib.shape[0])}


def gather(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> Dict[str, list]:
    """Run the calibration rows once through the dense model with every hook in place."""
    from methods import depth
    from methods.anatomy import anatomy_of, decoder_layers, parts

    hidden = model.get_input_embeddings().weight.shape[1]
    stats: Dict[str, list] = {"norms": [], "mlp": [], "heads": []}
    handles = []

    def new(kind: str, size: int) -> Importance:
        stats[kind].append(Importance(size, options.aggregation, device))
        return stats[kind][-1]

    # The collection adds every norm's statistic into one buffer as the forward reaches it; NVIDIA
    # keeps one per norm for its per-hook square root. Sharing the buffer keeps the collection's
    # float32 summation order, which matters where two channels nearly tie.
    shared = new("norms", hidden) if options.aggregation == "collection" else None
    norms = anatomy_of(model).input_norms
    for layer in decoder_layers(model):
        for norm in (submodule(layer, name) for name in norms):
            stat = shared or new("norms", hidden)
            handles.append(norm.register_forward_hook(lambda _m, _a, out, stat=stat: stat.add(out)))
        found = parts(layer)
        inputs = [("mlp", found["down"].linear)]
        if options.num_heads is not None:
            inputs.append(("heads", found["o"].linear))
        for kind, linear in inputs:
            stat = new(kind, linear.in_features)
            handles.append(linear.register_forward_pre_hook(lambda _m, args, stat=stat: stat.add(args[0])))
    try:
        depth.run_rows(model, calib)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def top(score: torch.Tensor, size: int) -> List[int]:
    """The `size` highest-scoring indices, highest first (the collection's torch.sort, descending)."""
    import torch

    return torch.sort(score, descending=True).indices[:size].tolist()


def head_importance(layer: nn.Module, channel_score: torch.Tensor) -> torch.Tensor:
    """Per query head: the L2 norm of its channels' importance."""
    from methods.anatomy import attention_shape

    heads, _, dim = attention_shape(layer)
    return channel_score.reshape(heads, dim).norm(dim=1)


def heads_to_keep(layer: nn.Module, head_score: torch.Tensor, num_heads: int) -> List[int]:
    """The best num_heads / kv_heads query heads of every key/value group."""
    from methods import surgery

    groups = surgery.kv_group_of(layer)
    kv_heads = max(groups) + 1
    per_group = num_heads // kv_heads
    keep: List[int] = []
    for group in range(kv_heads):
        members = [h for h, g in enumerate(groups) if g == group]
        ranked = sorted(members, key=lambda h: float(head_score[h]), reverse=True)
        keep.extend(ranked[:per_group])
    return sorted(keep)


def _check_targets(model: nn.Module, options: Options) -> None:
    from methods.anatomy import attention_shape, decoder_layers, mlp_width

    hidden = model.get_input_embeddings().weight.shape[1]
    if options.hidden_size > hidden:
        raise UsageError(f"hidden_size {options.hidden_size} is larger than the model's {hidden}")
    layers = decoder_layers(model)
    narrowest = min(mlp_width(layer) for layer in layers)
    if options.ffn_hidden_size > narrowest:
        raise UsageError(f"ffn_hidden_size {options.ffn_hidden_size} is larger than the model's MLP "
                         f"({narrowest} channels)")
    if options.num_heads is None:
        return
    for index, layer in enumerate(layers):
        heads, kv_heads, _ = attention_shape(layer)
        if options.num_heads > heads:
            raise UsageError(f"num_heads {options.num_heads} is more than layer {index}'s {heads} query heads")
        if options.num_heads % kv_heads:
            raise UsageError(f"num_heads {options.num_heads} is not a multiple of the {kv_heads} key/value heads "
                             f"(layer {index}): every key/value group must keep the same number of query heads")
