"""Structural surgery: remove attention heads, MLP channels, hidden channels and whole layers.

Every structured method (Wanda-sp, FLAP, LLM-Pruner, Minitron, ShortGPT, Shortened LLaMA, Sheared
LLaMA) decides *what* to remove and calls these functions to remove it, so the model, its config and
its checkpoint always agree. Indices are into the layer's current units; methods that prune once from
the dense model therefore pass dense indices, which is what prune.json records. Where a unit's rows
and columns are, fused or not, and which norms and biases travel with it, is the architecture's
declaration (methods/architectures.py, read through methods/anatomy.py).

Grouped-query attention: query head h belongs to key/value head h // (heads / kv_heads), as in
transformers' `repeat_kv`. `keep_heads` keeps whole key/value groups and, inside each kept group,
the same number of query heads (repeat_kv needs equal groups); anything else is a usage error.

After width surgery call `sync_config(model)`: a result whose layers share one shape the stock config
states in every supported transformers version stays the stock checkpoint; anything else becomes the
architecture's per-layer format (methods/modeling_lpc.py), which saves its per-layer widths and
reloads with identical logits.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from methods import modeling_lpc
from methods.anatomy import anatomy_of, attention_shape, decoder_layers, final_norm, layer_norms, mlp_width, parts
from methods.architectures import FIELDS, READ_RESIDUAL, WRITE_RESIDUAL, submodule
from methods.core.errors import UsageError

# Config entries that hold one value per decoder layer and must follow layer removal.
PER_LAYER_CONFIG = ("layer_types",) + modeling_lpc.LAYER_FIELDS


def head_dim(layer: nn.Module) -> int:
    return attention_shape(layer)[2]


def kv_group_of(layer: nn.Module) -> List[int]:
    """For each query head of the layer, the key/value head it reads."""
    heads, kv_heads, _ = attention_shape(layer)
    if kv_heads == 0 or heads % kv_heads:
        raise UsageError(f"{heads} query heads do not split evenly over {kv_heads} key/value heads")
    size = heads // kv_heads
    return [h // size for h in range(heads)]


def _slice_linear(linear: nn.Linear, rows: Optional[Sequence[int]] = None,
                  cols: Optional[Sequence[int]] = None) -> nn.Linear:
    weight = linear.weight.data
    bias = None if linear.bias is None else linear.bias.data
    if rows is not None:
        index = torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)
        weight = weight.index_select(0, index)
        bias = None if bias is None else bias.index_select(0, index)
    if cols is not None:
        index = torch.as_tensor(list(cols), dtype=torch.long, device=weight.device)
        weight = weight.index_select(1, index)
    # Built on the meta device: initialising weights that are overwritten at once costs seconds on 7B.
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.contiguous() if rows is not None or cols is not None else weight.clone())
    if bias is not None:
        new.bias = nn.Parameter(bias.clone())
    return new


def _replace(layer: nn.Module, path: str, linear: nn.Linear) -> None:
    parent, _, name = path.rpartition(".")
    setattr(submodule(layer, parent), name, linear)


def _cut(layer: nn.Module, keep: Dict[str, List[int]], cols: Sequence[str] = ()) -> None:
    """Keep, of every part named in `keep`, the listed rows (columns for the parts in `cols`), part by
    part inside a fused module, in the module's row order."""
    anatomy = anatomy_of(layer)
    found = parts(layer)
    for path in anatomy.modules(list(keep)):
        names = [p for p in keep if anatomy.projections[p] == path]
        linear = found[names[0]].linear
        if names[0] in cols:
            _replace(layer, path, _slice_linear(linear, cols=keep[names[0]]))
            continue
        stacked = [p for p in anatomy.fused_with(names[0])]
        rows = [found[p].start + r for p in stacked
                for r in (keep[p] if p in keep else range(found[p].size))]
        _replace(layer, path, _slice_linear(linear, rows=rows))
def _channels(heads: Sequence[int], dim: int) -> List[int]:
    return [h * dim + d for h in heads for d in range(dim)]


def keep_heads(layer: nn.Module, q_heads: Sequence[int], kv_heads: Optional[Sequence[int]] = None) -> Dict[str, List[int]]:
    """Keep query heads `q_heads` and key/value heads `kv_heads` (default: the groups of `q_heads`).

    Kept heads stay in their original order. Returns {"heads_kept", "kv_heads_kept"} (sorted).
    """
    groups = kv_group_of(layer)
    heads, total_kv, dim = attention_shape(layer)
    q = sorted(set(int(h) for h in q_heads))
    if any(h < 0 or h >= heads for h in q):
        raise UsageError(f"query head index out of range 0..{heads - 1}: {q}")
    kv = sorted(set(groups[h] for h in q)) if kv_heads is None else sorted(set(int(h) for h in kv_heads))
    if any(h < 0 or h >= total_kv for h in kv):
        raise UsageError(f"key/value head index out of range 0..{total_kv - 1}: {kv}")
    if not q:
        raise UsageError("pruning would remove every attention head of a layer")
    per_group = {g: sum(1 for h in q if groups[h] == g) for g in kv}
    orphans = [h for h in q if groups[h] not in kv]
    if orphans or len(set(per_group.values())) != 1 or 0 in per_group.values():
        raise UsageError(f"kept query heads {q} with key/value heads {kv} break the key/value grouping: "
                         "every kept group needs the same number (>= 1) of its own query heads")
    q_rows, kv_rows = _channels(q, dim), _channels(kv, dim)
    _cut(layer, {"q": q_rows, "k": kv_rows, "v": kv_rows, "o": q_rows}, cols=("o",))
    attn = layer.self_attn
    modeling_lpc.set_attention_width(attn, len(q), len(kv))
    _own_heads(layer, len(q), len(kv))
    return {"heads_kept": q, "kv_heads_kept": kv}


def _own_heads(layer: nn.Module, heads: int, kv_heads: int) -> None:
    """Stock attention code may read head counts from its config: the layer gets a view with its own."""
    config = layer.self_attn.__dict__.get("config")
    if config is not None:
        shared = config._shared if isinstance(config, modeling_lpc.LayerConfig) else config
        modeling_lpc.own_config(layer, shared, num_attention_heads=heads, num_key_value_heads=kv_heads)


def keep_mlp_channels(layer: nn.Module, channels: Sequence[int]) -> List[int]:
    """Keep the listed intermediate channels, in the order given (gate/up rows, down columns)."""
    keep = [int(c) for c in channels]
    size = mlp_width(layer)
    if len(set(keep)) != len(keep) or any(c < 0 or c >= size for c in keep):
        raise UsageError(f"MLP channel indices must be distinct and in 0..{size - 1}")
    _cut(layer, {"gate": keep, "up": keep, "down": keep}, cols=("down",))
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = len(keep)
    return keep


def add_output_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    """Add `bias` to the Linear's output (creating the bias if it has none): FLAP's compensation."""
    bias = bias.to(device=linear.weight.device, dtype=linear.weight.dtype).reshape(linear.out_features)
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.clone())
    else:
        with torch.no_grad():
            linear.bias.add_(bias)


def keep_hidden_channels(model: nn.Module, channels: Sequence[int]) -> List[int]:
    """Keep the listed residual-stream channels everywhere they appear, in the order given.

    Embedding columns, every residual norm's weight, the input columns of the projections that read
    the residual and the output rows (and biases) of those that write it, the final norm and lm_head
    input columns. Tied embeddings stay tied. An embedding scale (Gemma's sqrt(hidden_size)) is the
    per-layer format's to keep (sync_config).
    """
    embed = model.get_input_embeddings()
    size = embed.weight.shape[1]
    keep = [int(c) for c in channels]
    if not keep or len(set(keep)) != len(keep) or any(c < 0 or c >= size for c in keep):
        raise UsageError(f"hidden channel indices must be distinct, non-empty and in 0..{size - 1}")
    index = torch.as_tensor(keep, dtype=torch.long, device=embed.weight.device)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    embed.weight = nn.Parameter(embed.weight.data.index_select(1, index).contiguous())
    embed.embedding_dim = len(keep)
    anatomy = anatomy_of(model)
    for layer in decoder_layers(model):
        for path in anatomy.modules(READ_RESIDUAL):
            _replace(layer, path, _slice_linear(submodule(layer, path), cols=keep))
        for path in anatomy.modules(WRITE_RESIDUAL):
            _replace(layer, path, _slice_linear(submodule(layer, path), rows=keep))
        for module in (layer, layer.mlp):
            if hasattr(module, "hidden_size"):
                module.hidden_size = len(keep)
        for norm in layer_norms(layer):
            _slice_norm(norm, keep)
    _slice_norm(final_norm(model), keep)
    if head is not None:
        if tied:
            head.weight = embed.weight
        else:
            sliced = _slice_linear(head, cols=keep)
            head.weight, head.in_features = sliced.weight, len(keep)
    return keep


def _slice_norm(norm: nn.Module, keep: Sequence[int]) -> None:
    index = torch.as_tensor(list(keep), dtype=torch.long, device=norm.weight.device)
    norm.weight = nn.Parameter(norm.weight.data.index_select(0, index).contiguous())


def check_removable(model: nn.Module, count: int) -> int:
    """The model's depth, after refusing to remove all of it (callers ask before spending on scores)."""
    total = len(decoder_layers(model))
    if count >= total:
        raise UsageError(f"cannot remove {count} of the model's {total} layers: at least one must remain")
    return total


def remove_layers(model: nn.Module, indices: Sequence[int]) -> List[int]:
    """Delete whole decoder layers; renumber the rest so caching and saving see a contiguous stack."""
    total = len(decoder_layers(model))
    drop = sorted(set(int(i) for i in indices))
    if any(i < 0 or i >= total for i in drop):
        raise UsageError(f"layer index out of range 0..{total - 1}: {drop}")
    check_removable(model, len(drop))
    keep_layers(model, [i for i in range(total) if i not in drop])
    return drop


def keep_layers(model: nn.Module, kept: Sequence[int]) -> None:
    """Make the decoder stack the layers `kept` (current indices, ascending), renumbered 0..n-1.

    Each layer's (and its attention's) layer_idx picks its KV-cache slot, and per-layer config
    lists and num_hidden_layers describe the stack, so all of them follow.
    """
    layers = decoder_layers(model)
    total = len(layers)
    config = model.config
    anatomy = anatomy_of(model)
    if anatomy.layer_types is not None and not getattr(config, "layer_types", None):
        # Older transformers derive a layer's attention type from its index; after renumbering only
        # the list can say which type each kept layer has.
        config.layer_types = [anatomy.layer_types(config, i) for i in range(total)]
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        for module in (layer, layer.self_attn):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for name in PER_LAYER_CONFIG:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == total:
            setattr(config, name, [values[i] for i in kept])
    setattr(config, FIELDS["layers"], len(kept))


def layer_widths(model: nn.Module) -> List[Dict[str, int]]:
    """Per layer: query heads, key/value heads, MLP channels, and whether o_proj/down_proj have biases."""
    out = []
    for layer in decoder_layers(model):
        heads, kv_heads, _ = attention_shape(layer)
        found = parts(layer)
        out.append({"heads": heads, "kv_heads": kv_heads, "intermediate": mlp_width(layer),
                    "o_proj_bias": found["o"].linear.bias is not None,
                    "down_proj_bias": found["down"].linear.bias is not None})
    return out


def sync_config(model: nn.Module) -> None:
    """Make model.config describe the pruned model, switching to the per-layer format if needed."""
    config = model.config
    anatomy = anatomy_of(model)
    widths = layer_widths(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    dim = head_dim(decoder_layers(model)[0])
    # Read before hidden_size follows the pruned model: the scale stays the unpruned model's.
    dense_hidden = getattr(config, FIELDS["hidden"])
    scale = (getattr(config, "embed_scale", None) or dense_hidden ** 0.5) if anatomy.embed_scale else None
    stock = not config.model_type.startswith("lpc_") and _stock_expresses(model, widths, hidden, dim, scale)
    setattr(config, FIELDS["hidden"], hidden)
    setattr(config, FIELDS["layers"], len(widths))
    config.head_dim = dim
    if not stock:
        _to_per_layer_format(model, widths, dim, scale)
        return
    for unit in ("heads", "kv_heads", "intermediate"):
        setattr(config, FIELDS[unit], widths[0][unit])


def _stock_expresses(model: nn.Module, widths: List[Dict[str, int]], hidden: int, dim: int,
                     scale: Optional[float]) -> bool:
    """Whether the stock config, in every supported transformers version, builds exactly this model."""
    anatomy = anatomy_of(model)
    config = model.config
    first = widths[0]
    if any(w != first for w in widths):
        return False
    if first["heads"] * dim != hidden and not anatomy.explicit_head_dim:
        return False
    with torch.device("meta"):  # the biases the stock constructor gives a layer of this config
        found = parts(modeling_lpc.stock_classes(anatomy)["layer"](config, 0))
    if (first["o_proj_bias"], first["down_proj_bias"]) != (found["o"].linear.bias is not None,
                                                           found["down"].linear.bias is not None):
        return False
    if scale is not None and scale != hidden ** 0.5:
        return False
    types = getattr(config, "layer_types", None)
    return anatomy.layer_types is None or not types or \
        list(types) == [anatomy.layer_types(config, i) for i in range(len(widths))]


def _to_per_layer_format(model: nn.Module, widths: List[Dict[str, int]], dim: int, scale: Optional[float]) -> None:
    anatomy = anatomy_of(model)
    if len({(w["o_proj_bias"], w["down_proj_bias"]) for w in widths}) != 1:
        raise UsageError("o_proj/down_proj biases must be present in every layer or in none")
    fmt = modeling_lpc.format_of(anatomy)
    modeling_lpc.register()
    old = model.config
    values = {k: v for k, v in old.to_dict().items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version")
              and k not in modeling_lpc.LAYER_FIELDS}
    # The stock fields hold the widest layer; the per-layer lists hold every layer's own.
    values.update({FIELDS[unit]: max(w[unit] for w in widths) for unit in ("heads", "kv_heads", "intermediate")})
    values.update(
        head_dim=dim, layer_num_attention_heads=[w["heads"] for w in widths],
        layer_num_key_value_heads=[w["kv_heads"] for w in widths],
        layer_intermediate_size=[w["intermediate"] for w in widths],
        o_proj_bias=widths[0]["o_proj_bias"], down_proj_bias=widths[0]["down_proj_bias"])
    if scale is not None:
        values["embed_scale"] = scale
    if anatomy.layer_types is not None:
        values["layer_types"] = list(getattr(old, "layer_types", None) or
                                     [anatomy.layer_types(old, i) for i in range(len(widths))])
    config = fmt.config(**values)
    config.architectures = [fmt.causal_lm.__name__]
    for attr in ("_attn_implementation_internal", "_name_or_path", "_commit_hash"):
        if hasattr(old, attr):
            setattr(config, attr, getattr(old, attr))
    # The format's class is the stock one with another constructor; the modules built by the stock
    # constructor already have their pruned shapes, so the class and config change, and what the
    # format's constructor does beyond shapes is done here.
    model.__class__ = fmt.causal_lm
    model.model.__class__ = fmt.model
    model.config = model.model.config = config
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config._from_model_config = False
    modeling_lpc.adopt(model.model, anatomy)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())
