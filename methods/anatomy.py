"""Where things live inside a decoder-only Hugging Face causal LM, read off its declaration.

Every architecture the kit prunes is declared once in methods/architectures.py; every method and the
surgery reach into a model through the accessors here, so a method never names a module itself. A
`Part` is one of the seven projections of a decoder layer (q, k, v, o, gate, up, down) as rows of
the Linear that holds it: the whole Linear, or a slice of a fused one (Phi-3's qkv_proj).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from methods import architectures
from methods.architectures import Anatomy, submodule
from methods.core.errors import UsageError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (`model.model.layers` for every declared architecture)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UsageError(
            f"{type(model).__name__} is not a decoder-only Llama-like model (no model.model.layers)")
    return layers


def anatomy_of(module: nn.Module) -> Anatomy:
    """The declaration of a model (by its config's model type) or of one of its decoder layers (by class)."""
    config = getattr(module, "config", None)
    found = architectures.by_model_type(getattr(config, "model_type", "")) if config is not None else None
    found = found or architectures.by_layer_class(type(module).__name__)
    if found is None:
        known = ", ".join(architectures.ARCHITECTURES)
        raise UsageError(f"{type(module).__name__} is not a supported decoder architecture (supported: {known})")
    return found


def check_supported(model: nn.Module) -> Anatomy:
    """Refuse a model whose architecture is not declared, or whose layers lack a declared projection."""
    layers = decoder_layers(model)
    if len(layers) == 0:
        raise UsageError("the model has no decoder layers")
    anatomy = anatomy_of(model)
    for index, layer in enumerate(layers):
        missing = [p for p in anatomy.modules() if not isinstance(submodule(layer, p), nn.Linear)]
        if missing:
            raise UsageError(f"{type(model).__name__} does not match the {anatomy.name} declaration: "
                             f"layer {index} lacks {', '.join(missing)}")
    return anatomy


@dataclass
class Part:
    """Rows [start, start + size) of `linear`: one projection of a decoder layer."""

    linear: nn.Linear
    start: int
    size: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.size)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.size == self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The part's rows of the weight, a view (the weight itself for a whole Linear)."""
        return self.linear.weight if self.whole else self.linear.weight[self.rows]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        bias = self.linear.bias
        return bias if bias is None or self.whole else bias[self.rows]


def attention_shape(layer: nn.Module) -> Tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of one decoder layer, read off its projections."""
    anatomy = anatomy_of(layer)
    attn = layer.self_attn
    dim = getattr(attn, "head_dim", None)
    if not dim:
        raise UsageError(f"{type(attn).__name__} does not expose head_dim")
    dim = int(dim)
    heads = submodule(layer, anatomy.projections["o"]).in_features // dim
    stacked = anatomy.fused_with("k")
    rows = submodule(layer, anatomy.projections["k"]).out_features - (heads * dim if "q" in stacked else 0)
    return heads, rows // (dim * sum(1 for p in stacked if p != "q")), dim


def mlp_width(layer: nn.Module) -> int:
    """MLP channels of one decoder layer."""
    return submodule(layer, anatomy_of(layer).projections["down"]).in_features


def parts(layer: nn.Module) -> Dict[str, Part]:
    """The seven projections of one decoder layer, fused or not."""
    anatomy = anatomy_of(layer)
    heads, kv_heads, dim = attention_shape(layer)
    sizes = {"q": heads * dim, "k": kv_heads * dim, "v": kv_heads * dim, "gate": mlp_width(layer),
             "up": mlp_width(layer)}
    out: Dict[str, Part] = {}
    for part in architectures.PARTS:
        linear = submodule(layer, anatomy.projections[part])
        stacked = anatomy.fused_with(part)
        start = sum(sizes[p] for p in stacked[:stacked.index(part)])
        out[part] = Part(linear, start, sizes[part] if len(stacked) > 1 else linear.out_features)
    return out


def layer_norms(layer: nn.Module) -> List[nn.Module]:
    """The layer's norms on the residual stream, in execution order."""
    return [submodule(layer, name) for name in anatomy_of(layer).norms]


def final_norm(model: nn.Module) -> nn.Module:
    return getattr(model.model, anatomy_of(model).final_norm)


def norm_scale(norm: nn.Module, anatomy: Anatomy) -> torch.Tensor:
    """The factor a residual norm multiplies by: its weight, or offset + weight where stored as an offset."""
    return norm.weight + anatomy.norm_offset if anatomy.norm_offset else norm.weight


def linear_layers(layer: nn.Module) -> Dict[str, nn.Linear]:
    """Every nn.Linear inside one decoder block, by its name relative to the block, in module order.

    Module order (q, k, v, o, gate, up, down for Llama) is the order the originals prune in.
    """
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def prunable_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by full module name (embeddings and lm_head excluded)."""
    prefix = _layers_prefix(model)
    out: Dict[str, nn.Linear] = {}
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in linear_layers(layer).items():
            out[f"{prefix}.{index}.{name}"] = module
    return out


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise AssertionError("decoder layers not found among the model's modules")


def sparsity_report(model: nn.Module) -> Tuple[Dict[str, float], float]:
    """(fraction of exact zeros in each prunable Linear weight, zeros over all of them) in one pass over
    the weights: the overall figure is counted as the originals' check_sparsity counts it."""
    counts = {name: (m.weight.numel() - int(torch.count_nonzero(m.weight)), m.weight.numel())
              for name, m in prunable_linears(model).items()}
    zeros, total = sum(z for z, _ in counts.values()), sum(n for _, n in counts.values())
    return {name: z / n for name, (z, n) in counts.items()}, (zeros / total if total else 0.0)

