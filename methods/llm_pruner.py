"""LLM-Pruner (Ma et al. 2023, arXiv:2305.11627), as horseee/LLM-Pruner @ 128a07d runs it.

Block mode (`hf_prune.py --block_wise`, the paper's main setting) prunes, in each decoder layer of
`layers` (START:END, end exclusive; the scripts use 4:30 of 32), whole attention heads and MLP
channels; channel mode (`--channel_wise`, the paper's "Channel" row) prunes the hidden (residual)
dimension of the whole model. Importance is scored once on the dense model; there is no weight
merging and no cross-layer competition.

Groups and scores, as the original's dependency graph and importance classes produce them:

* attention group of a layer: q/k/v output rows and o_proj input columns of the same channel
  (MHA, root q_proj). Grouped-query attention follows `llama3.py` (root k_proj): a key/value
  channel's group holds its k/v rows and the query rows / o_proj columns that read it, so whole
  key/value groups go together with the query heads `repeat_kv` gives them (kv head h <-> query
  heads h*g .. h*g+g-1; checked against the original's pruning groups). The original *scores* the
  query channels onto key/value channels differently: it folds the query vector as
  `view(g, kv_channels).sum(0)`, i.e. kv channel c collects query channels c, c+kv_channels, ...
  (query heads h, h+kv_heads, ..., not the ones removed with h). `gqa_importance="strided"` (the
  default) reproduces that; `"grouped"` sums the query heads that are actually removed together.
* MLP group: gate/up output rows and down_proj input columns of one intermediate channel.
* hidden group (channel mode): every parameter with a residual-stream axis: embedding columns,
  every residual norm of every layer and the final norm, q/k/v/gate/up input columns, o/down output
  rows, lm_head input columns.

Other architectures (methods/architectures.py): a member is a projection's part, so the q, k and v
(gate and up) rows of a fused Linear are three (two) members, scored as the separate Linears of a
Llama would be; a norm stored as an offset from 1 (Gemma) is scored by the scale it applies, 1 + w,
the weight whose removal the Taylor term estimates.

Member scores, per channel: Taylor criteria use the salience s = W*G of one backward pass of the
causal-LM loss on the whole calibration batch (labels = inputs): element1 sum|s| (param_first),
vector |sum s| (vectorize), element2 sum|W*A*W| (param_second) and param_mix sum|W*G - W*A*W/2| with
A = sum over samples of g_n^2/N from N extra per-sample backward passes; over a Linear's row for
output channels, its column for input channels; a norm's own |s|. Magnitude criteria (l2, l1) use
sum |W|^p (no square root). A group's score is the sum of its members (Taylor, `grouping_strategy
sum`) or their mean (magnitude); a head is the sum of its head_dim channels; random draws
torch.rand(channels) per group. Each group then loses `n - int(n * (1 - ratio))` channels (n = the
root's channels), in whole heads for attention (`(n - int(...)) // head_dim` heads): the lowest
scores by torch.argsort.

Precision: gradients and scores are computed in `grad_dtype` on the compute device (methods/gradients.py).
float32 is the upstream README's CPU setting; "float16" reproduces the collection's `--device cuda`
runs (model.half()), where element2's g^2/N underflows; "model" keeps the loaded dtype. The model is
copied to the device in that dtype once and its own tensors are put back afterwards, untouched.

Random importance draws from torch's global generator in layer order, attention before
MLP (the order the original's pruner visits its groups); the caller's seeding decides the draw
(`lpc repro` and `lpc prune` seed torch with the calibration / --seed value). The original's
`--test_before_train` generation samples before pruning and so changes the draw.

Where the original fails, this refuses with a UsageError instead: a ratio that removes fewer
channels than one head (the original stops with torch.cat of an empty list), and a
ratio that would remove every unit of a group (the original silently leaves such a group
unpruned). Two extensions: element2 / param_mix also work in channel mode (the original's channel
branch never runs the per-sample passes and stops on the missing `acc_grad`), and l1 / l2 in channel
mode never count the embedding (the original drops its matrix-shaped score, or crashes on it when
the vocabulary is a multiple of the hidden size).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

from pydantic import Field, model_validator

from methods import gradients
from methods.architectures import submodule
from methods.core.errors import UsageError
from methods.options import method_options

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn

# importance name -> (criterion, variant): the original's --pruner_type / --taylor.
IMPORTANCE = {
    "element1": ("taylor", "param_first"),
    "element2": ("taylor", "param_second"),
    "vector": ("taylor", "vectorize"),
    "param_mix": ("taylor", "param_mix"),
    "l2": ("magnitude", 2),
    "l1": ("magnitude", 1),
    "random": ("random", None),
}
DEFAULT_LAYERS = "4:30"  # the scripts' block_{attention,mlp}_layer_{start,end} (the code default is 3:31)
_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@method_options
class Options:
    pruning_ratio: Annotated[float, Field(
        gt=0, lt=1, description="fraction of every pruned group's channels (heads, MLP or hidden) removed")]
    importance: Annotated[Literal["element1", "element2", "vector", "param_mix", "l2", "l1", "random"], Field(
        description="channel importance: Taylor (element1, element2, vector, param_mix), magnitude or random")
    ] = "element1"
    # YAML reads an unquoted 4:30 as the base-60 integer 270: a range is a string, quoted in YAML.
    layers: Annotated[Optional[str], Field(
        description="START:END, the decoder layers pruned in block mode, end exclusive; default 4:30")] = None
    mode: Annotated[Literal["block", "channel"], Field(
        description="block: heads and MLP channels of each layer; channel: the hidden size of the whole model")
    ] = "block"
    grad_dtype: Annotated[gradients.GradDtype, Field(
        description="dtype of the gradients and scores ('model': the loaded dtype)")] = "float32"
    gqa_importance: Annotated[Literal["strided", "grouped"], Field(
        description="how query channels score a key/value group: the original's stride, or the removed heads")
    ] = "strided"

    @model_validator(mode="after")
    def _layers_fit_the_mode(self) -> "Options":
        if self.mode == "channel" and self.layers is not None:
            raise ValueError("layers applies to block mode only: channel mode prunes the hidden size of every layer")
        if self.mode == "block":
            self.layer_range()
        return self

    def layer_range(self) -> Tuple[int, int]:
        """(start, end) of the layers to prune, checked for form only (the model is not known here)."""
        spec = DEFAULT_LAYERS if self.layers is None else self.layers
        match = _RANGE.match(spec)
        if not match:
            raise UsageError(f"layers must be 'START:END' (end exclusive), got {spec!r}")
        start, end = int(match.group(1)), int(match.group(2))
        if start >= end:
            raise UsageError(f"layers {spec!r} is an empty range (END must be greater than START)")
        return start, end


# ----------------------------------------------------------------------------- entry point

def prune(model: nn.Module, calib: torch.Tensor, options: Options, device: torch.device) -> dict:
    from methods import surgery
    from methods.anatomy import decoder_layers

    layers = decoder_layers(model)
    criterion, variant = IMPORTANCE[options.importance]
    if options.mode == "block":
        start, end = options.layer_range()
        if end > len(layers):
            raise UsageError(f"layers {start}:{end} is out of bounds: the model has {len(layers)} decoder layers "
                             f"(valid: 0 <= START < END <= {len(layers)})")
        plan = [_layer_plan(layers[i], i, options) for i in range(start, end)]
        groups = [g for p in plan for g in (p.attention, p.mlp)]
    else:
        plan = []
        groups = [_hidden_group(model, options)]
    for group in groups:
        group.check()

    scores = _score(model, groups, calib, criterion, variant, options, device)

    report: Dict[str, object] = {"layers": _dense_units(layers)}
    if options.mode == "block":
        report["layers_pruned"] = [start, end]
        head_scores, mlp_scores = {}, {}
        kept = {}
        for p in plan:
            heads, mlp = scores[id(p.attention)], scores[id(p.mlp)]
            head_scores[str(p.index)], mlp_scores[str(p.index)] = _floats(heads), _floats(mlp)
            kept[p.index] = (p.attention.keep(heads), p.mlp.keep(mlp))
        for index, (units, channels) in kept.items():
            q_heads, kv_heads = _query_heads(layers[index], units)
            entry = surgery.keep_heads(layers[index], q_heads, kv_heads)
            entry["mlp_channels_kept"] = surgery.keep_mlp_channels(layers[index], channels)
            report["layers"][index] = entry
        report["scores"] = {"heads": head_scores, "mlp_channels": mlp_scores}
        # What a "heads" score ranks: a query head (MHA) or a key/value group with its query heads (GQA).
        report["head_unit"] = "key/value group" if any(p.gqa for p in plan) else "head"
    else:
        group = groups[0]
        hidden = scores[id(group)]
        report["hidden_kept"] = surgery.keep_hidden_channels(model, group.keep(hidden))
        report["scores"] = {"hidden_channels": _floats(hidden)}
    return report


# ----------------------------------------------------------------------------- groups

@dataclass
class Member:
    """One parameter of a pruning group, on the group's channel axis."""

    label: str
    param: nn.Parameter
    axis: str                     # out | in | norm | embed
    rows: Optional[slice] = None  # the part's rows of a fused Linear (None: all of it)
    offset: float = 0.0           # a norm weight stored as an offset from this scale (Gemma)

    def weight(self) -> torch.Tensor:
        weight = self.of(self.param)
        return weight + self.offset if self.offset else weight

    def of(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The member's rows of its parameter, or of a tensor shaped like it (a gradient)."""
        return tensor if tensor is None or self.rows is None else tensor[self.rows]


def _part(found: dict, part: str, axis: str) -> Member:
    piece = found[part]
    return Member(part, piece.linear.weight, axis, None if piece.whole else piece.rows)


@dataclass
class Group:
    """One of the original's pruning groups: `members` share the root's channel axis."""

    name: str
    channels: int                 # the root's channel count n (for the removal count)
    unit: int                     # channels per ranked unit: head_dim for attention, else 1
    members: List[Member]         # in the original's order
    ratio: float
    query_fold: int = 1           # GQA: query channels per key/value channel
    query_members: Tuple[str, ...] = ()

    @property
    def removed_channels(self) -> int:
        # MetaPruner.prune_local: current - int(initial * (1 - ratio)), float arithmetic as in Python.
        return self.channels - int(self.channels * (1 - self.ratio))

    @property
    def removed_units(self) -> int:
        return self.removed_channels // self.unit

    def check(self) -> None:
        removed, units = self.removed_channels, self.channels // self.unit
        if self.unit > 1 and 0 < removed < self.unit:
            what = "key/value" if self.query_fold > 1 else "attention"
            raise UsageError(
                f"pruning_ratio {self.ratio} removes {removed} of the {self.channels} {what} channels of {self.name}, "
                f"fewer than one head ({self.unit} channels): LLM-Pruner removes whole heads"
                f"{' (whole key/value groups)' if self.query_fold > 1 else ''} and the original crashes here; "
                f"use pruning_ratio >= {self.unit / self.channels:.4g} for this model")
        if self.removed_units >= units:
            raise UsageError(f"pruning_ratio {self.ratio} would remove every unit of {self.name}")

    def keep(self, scores: torch.Tensor) -> List[int]:
        """Dense indices of the units that survive, ascending (the original slices, keeping order)."""
        import torch

        drop = set(torch.argsort(scores)[: self.removed_units].tolist())
        return [u for u in range(scores.numel()) if u not in drop]


@dataclass
class LayerPlan:
    index: int
    attention: Group
    mlp: Group
    gqa: bool


def _layer_plan(layer: nn.Module, index: int, options: Options) -> LayerPlan:
    from methods import surgery
    from methods.anatomy import attention_shape, mlp_width, parts

    heads, kv_heads, dim = attention_shape(layer)
    surgery.kv_group_of(layer)  # refuses query heads that do not split evenly over key/value heads
    found = parts(layer)
    gqa = kv_heads != heads
    if gqa:
        # llama3.py: root k_proj; member order of its dependency group.
        members = [_part(found, p, axis) for p, axis in (("k", "out"), ("o", "in"), ("v", "out"), ("q", "out"))]
        attention = Group(f"layer {index} attention", kv_heads * dim, dim, members, options.pruning_ratio,
                          query_fold=heads // kv_heads, query_members=("q", "o"))
    else:
        members = [_part(found, p, axis) for p, axis in (("q", "out"), ("o", "in"), ("v", "out"), ("k", "out"))]
        attention = Group(f"layer {index} attention", heads * dim, dim, members, options.pruning_ratio)
    mlp_group = Group(f"layer {index} MLP", mlp_width(layer), 1,
                      [_part(found, p, axis) for p, axis in (("gate", "out"), ("up", "out"), ("down", "in"))],
                      options.pruning_ratio)
    return LayerPlan(index, attention, mlp_group, gqa)


def _hidden_group(model: nn.Module, options: Options) -> Group:
    from methods.anatomy import anatomy_of, decoder_layers, final_norm, parts

    embed = model.get_input_embeddings()
    anatomy = anatomy_of(model)
    members: List[Member] = [Member("embed_tokens", embed.weight, "embed")]
    # One layer in execution order: a norm reads the residual, the projections read or write it, an
    # output norm (Gemma 2) closes each block.
    first, second = anatomy.input_norms
    attn_out, mlp_out = (anatomy.output_norms + (None, None))[:2]
    order = ((first, "norm"), ("q", "in"), ("k", "in"), ("v", "in"), ("o", "out"), (attn_out, "norm"),
             (second, "norm"), ("gate", "in"), ("up", "in"), ("down", "out"), (mlp_out, "norm"))
    for i, layer in enumerate(decoder_layers(model)):
        found = parts(layer)
        for name, axis in order:
            if name is None:
                continue
            if axis == "norm":
                members.append(Member(f"{i}.{name}", submodule(layer, name).weight, axis, offset=anatomy.norm_offset))
            else:
                members.append(_part(found, name, axis))
    members.append(Member("norm", final_norm(model).weight, "norm", offset=anatomy.norm_offset))
    head = model.get_output_embeddings()
    if head is not None:
        members.append(Member("lm_head", head.weight, "in"))
    return Group("the hidden dimension", embed.weight.shape[1], 1, members, options.pruning_ratio)


# ----------------------------------------------------------------------------- scoring

def _score(model: nn.Module, groups: Sequence[Group], calib: torch.Tensor, criterion: str, variant,
           options: Options, device: torch.device) -> Dict[int, torch.Tensor]:
    """Per group: the unit scores the original ranks (heads / key-value groups, channels)."""
    import torch

    out: Dict[int, torch.Tensor] = {}
    if criterion == "random":
        for group in groups:
            channels = torch.rand(group.channels)  # RandomImportance: one uniform per root channel
            out[id(group)] = _per_unit(channels, group)
        return out
    weights = {id(m.param): m.param for g in groups for m in g.members}
    with gradients.on_device(model, device, options.grad_dtype,
                             trainable=weights.values() if criterion == "taylor" else ()):
        grads: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        if criterion == "taylor":
            grads = _taylor_gradients(model, calib, list(weights.values()), device,
                                      second_order=variant in ("param_second", "param_mix"))
        with torch.no_grad():
            for group in groups:
                member_scores = []
                for member in group.members:
                    if criterion == "taylor":
                        grad, acc = (member.of(g) for g in grads[id(member.param)])
                        score = _taylor_member(member.weight(), grad, acc, member.axis, variant)
                    else:
                        score = _magnitude_member(member.weight(), member.axis, variant)
                        if score is None:
                            continue
                    member_scores.append(_fold(score, group, member.label, options.gqa_importance))
                stacked = torch.stack(member_scores, dim=0)
                channels = stacked.sum(0) if criterion == "taylor" else stacked.mean(0)
                out[id(group)] = _per_unit(channels, group).cpu()
    return out


def _per_unit(channels: torch.Tensor, group: Group) -> torch.Tensor:
    # MetaPruner: consecutive_groups = head_dim sums each head's channels into one score.
    return channels.view(-1, group.unit).sum(1) if group.unit > 1 else channels


def _taylor_member(weight: torch.Tensor, grad: torch.Tensor, acc: Optional[torch.Tensor], axis: str,
                   variant: str) -> torch.Tensor:
    if variant == "param_first" or variant == "vectorize":
        salience = weight * grad
    elif variant == "param_second":
        salience = weight * acc * weight
    else:  # param_mix: first order minus half the diagonal second-order term
        salience = weight * grad - 0.5 * weight * acc * weight
    if axis == "norm":
        return salience.abs()
    dim = 1 if axis == "out" else 0   # rows for output channels; columns for input / embedding channels
    if variant == "vectorize":
        return salience.sum(dim).abs()
    return salience.abs().sum(dim)


def _magnitude_member(weight: torch.Tensor, axis: str, p: int) -> Optional[torch.Tensor]:
    if axis == "embed":
        # The original's MagnitudeImportance returns the embedding's whole |W|^p matrix here, which
        # its alignment step drops (vocab not a multiple of hidden) or crashes on: it never counts.
        return None
    norm = weight.abs().pow(p)
    if axis == "norm":
        return norm
    return norm.sum(1) if axis == "out" else norm.sum(0)


def _fold(score: torch.Tensor, group: Group, label: str, how: str) -> torch.Tensor:
    """Bring a member's per-channel score onto the root's channels (only GQA query members differ)."""
    if group.query_fold == 1 or label not in group.query_members:
        return score
    if how == "strided":
        # The original's alignment: view(len // kv_channels, kv_channels).sum(0).
        return score.view(group.query_fold, group.channels).sum(0)
    kv_heads = group.channels // group.unit
    return score.view(kv_heads, group.query_fold, group.unit).sum(1).reshape(group.channels)


def _taylor_gradients(model: nn.Module, calib: torch.Tensor, weights: List[torch.Tensor], device: torch.device,
                      *, second_order: bool) -> Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """G (one backward of the mean causal-LM loss over the whole batch) and, for second-order
    criteria, A = sum_n g_n * g_n / N from one backward per sample, computed first as the original
    does, in the weights' dtype."""
    import torch

    tokens = calib.to(device)
    samples = tokens.shape[0]
    acc: Dict[int, torch.Tensor] = {}
    if second_order:
        for row in range(samples):
            gradients.backward(model, tokens[row:row + 1])
            for weight in weights:
                term = weight.grad * weight.grad / samples
                acc[id(weight)] = term if id(weight) not in acc else acc[id(weight)] + term
                weight.grad = None
    gradients.backward(model, tokens)
    grads = {}
    for weight in weights:
        grads[id(weight)] = (weight.grad, acc.get(id(weight)))
        weight.grad = None
    return grads


# ----------------------------------------------------------------------------- report helpers

def _query_heads(layer: nn.Module, kept: List[int]) -> Tuple[List[int], List[int]]:
    """Units kept by the attention group -> (query heads, key/value heads) of the dense layer."""
    from methods.anatomy import attention_shape

    heads, kv_heads, _ = attention_shape(layer)
    if heads == kv_heads:
        return kept, kept
    size = heads // kv_heads
    return [h * size + j for h in kept for j in range(size)], kept


def _dense_units(layers: Sequence[nn.Module]) -> List[dict]:
    """Every unit of every layer, as dense indices: the report of a layer nothing is removed from."""
    from methods.anatomy import attention_shape, mlp_width

    out = []
    for layer in layers:
        heads, kv_heads, _ = attention_shape(layer)
        out.append({"heads_kept": list(range(heads)), "kv_heads_kept": list(range(kv_heads)),
                    "mlp_channels_kept": list(range(mlp_width(layer)))})
    return out


def _floats(values: torch.Tensor) -> List[float]:
    # float32 precision is all the scores have; 7 significant digits keep reports small.
    return [float(f"{v:.7g}") for v in values.float().tolist()]

