"""Structural surgery: remove attention heads, MLP channels, hidden channels and whole layers.

Every structured method (Wanda-sp, FLAP, LLM-Pruner, Minitron, ShortGPT, Shortened LLaMA, Sheared
LLaMA) decides *what* to remove and calls these functions to remove it, so the model, its config and
its checkpoint always agree. Indices are into the layer's current units; methods that prune once from
the dense model therefore pass dense indices, which is what prune.json records.

Grouped-query attention: query head h belongs to key/value head h // (heads / kv_heads), as in
transformers' `repeat_kv`. `keep_heads` keeps whole key/value groups and, inside each kept group,
the same number of query heads (repeat_kv needs equal groups); anything else is a usage error.

After width surgery call `sync_config(model)`: uniform, Llama-representable widths stay a plain
Llama checkpoint; anything else becomes `LpcLlamaForCausalLM` (methods/modeling_lpc_llama.py),
which saves its per-layer widths and reloads with identical logits.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from methods.anatomy import decoder_layers
from methods.core.errors import UsageError
from methods.modeling_lpc_llama import (LpcLlamaConfig, LpcLlamaForCausalLM, LpcLlamaModel, register,
                                        set_attention_width)

# Config entries that hold one value per decoder layer and must follow layer removal.
PER_LAYER_CONFIG = ("layer_types", "layer_num_attention_heads", "layer_num_key_value_heads",
                    "layer_intermediate_size")


def head_dim(layer: nn.Module) -> int:
    attn = layer.self_attn
    dim = getattr(attn, "head_dim", None)
    if not dim:
        raise UsageError(f"{type(attn).__name__} does not expose head_dim")
    return int(dim)


def attention_shape(layer: nn.Module) -> tuple:
    """(query heads, key/value heads, head_dim) of one decoder layer, read off its projections."""
    dim = head_dim(layer)
    attn = layer.self_attn
    return attn.q_proj.out_features // dim, attn.k_proj.out_features // dim, dim


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
    attn = layer.self_attn
    attn.q_proj = _slice_linear(attn.q_proj, rows=_channels(q, dim))
    attn.k_proj = _slice_linear(attn.k_proj, rows=_channels(kv, dim))
    attn.v_proj = _slice_linear(attn.v_proj, rows=_channels(kv, dim))
    attn.o_proj = _slice_linear(attn.o_proj, cols=_channels(q, dim))
    set_attention_width(attn, len(q), len(kv), dim)
    return {"heads_kept": q, "kv_heads_kept": kv}


def keep_mlp_channels(layer: nn.Module, channels: Sequence[int]) -> List[int]:
    """Keep the listed intermediate channels, in the order given (gate/up rows, down columns)."""
    mlp = layer.mlp
    keep = [int(c) for c in channels]
    size = mlp.gate_proj.out_features
    if len(set(keep)) != len(keep) or any(c < 0 or c >= size for c in keep):
        raise UsageError(f"MLP channel indices must be distinct and in 0..{size - 1}")
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = _slice_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = _slice_linear(mlp.down_proj, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)
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

    Embedding columns, every RMSNorm weight, q/k/v and gate/up input columns, o_proj and down_proj
    output rows (and biases), the final norm and lm_head input columns. Tied embeddings stay tied.
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
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _slice_linear(getattr(attn, name), cols=keep))
        attn.o_proj = _slice_linear(attn.o_proj, rows=keep)
        mlp.gate_proj = _slice_linear(mlp.gate_proj, cols=keep)
        mlp.up_proj = _slice_linear(mlp.up_proj, cols=keep)
        mlp.down_proj = _slice_linear(mlp.down_proj, rows=keep)
        if hasattr(mlp, "hidden_size"):
            mlp.hidden_size = len(keep)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _slice_norm(norm, keep)
        if hasattr(layer, "hidden_size"):
            layer.hidden_size = len(keep)
    _slice_norm(model.model.norm, keep)
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
    model.model.layers = nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        for module in (layer, layer.self_attn):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    for name in PER_LAYER_CONFIG:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == total:
            setattr(config, name, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


def layer_widths(model: nn.Module) -> List[Dict[str, int]]:
    """Per layer: query heads, key/value heads, MLP channels, and whether o_proj/down_proj have biases."""
    out = []
    for layer in decoder_layers(model):
        heads, kv_heads, _ = attention_shape(layer)
        out.append({"heads": heads, "kv_heads": kv_heads, "intermediate": layer.mlp.gate_proj.out_features,
                    "o_proj_bias": layer.self_attn.o_proj.bias is not None,
                    "down_proj_bias": layer.mlp.down_proj.bias is not None})
    return out


def sync_config(model: nn.Module) -> None:
    """Make model.config describe the pruned model, switching to the per-layer format if needed."""
    config = model.config
    widths = layer_widths(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    dim = head_dim(decoder_layers(model)[0])
    first = widths[0]
    uniform = all(w == first for w in widths)
    plain_biases = (first["o_proj_bias"] == bool(getattr(config, "attention_bias", False))
                    and first["down_proj_bias"] == bool(getattr(config, "mlp_bias", False)))
    config.hidden_size = hidden
    config.head_dim = dim
    config.num_hidden_layers = len(widths)
    if isinstance(model, LpcLlamaForCausalLM) or not (uniform and plain_biases and first["heads"] * dim == hidden):
        _to_per_layer_format(model, widths, dim)
        return
    config.num_attention_heads = first["heads"]
    config.num_key_value_heads = first["kv_heads"]
    config.intermediate_size = first["intermediate"]


def _to_per_layer_format(model: nn.Module, widths: List[Dict[str, int]], dim: int) -> None:
    from transformers import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise UsageError(f"layers of different widths can only be saved for Llama models, not {type(model).__name__}")
    if len({(w["o_proj_bias"], w["down_proj_bias"]) for w in widths}) != 1:
        raise UsageError("o_proj/down_proj biases must be present in every layer or in none")
    register()
    old = model.config
    values = {k: v for k, v in old.to_dict().items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version")
              and k not in PER_LAYER_CONFIG[1:]}
    values.update(
        head_dim=dim, num_attention_heads=max(w["heads"] for w in widths),
        num_key_value_heads=max(w["kv_heads"] for w in widths),
        intermediate_size=max(w["intermediate"] for w in widths),
        layer_num_attention_heads=[w["heads"] for w in widths],
        layer_num_key_value_heads=[w["kv_heads"] for w in widths],
        layer_intermediate_size=[w["intermediate"] for w in widths],
        o_proj_bias=widths[0]["o_proj_bias"], down_proj_bias=widths[0]["down_proj_bias"])
    config = LpcLlamaConfig(**values)
    config.architectures = [LpcLlamaForCausalLM.__name__]
    for attr in ("_attn_implementation_internal", "_name_or_path", "_commit_hash"):
        if hasattr(old, attr):
            setattr(config, attr, getattr(old, attr))
    # LpcLlamaForCausalLM is LlamaForCausalLM with another constructor; the modules built by the
    # stock constructor already have their pruned shapes, so only the class and config change.
    model.__class__ = LpcLlamaForCausalLM
    model.model.__class__ = LpcLlamaModel
    model.config = model.model.config = config
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config._from_model_config = False
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "config"):
            layer.self_attn.config = config


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())
