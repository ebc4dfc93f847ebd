"""Where things live inside a Llama-like Hugging Face causal LM.

Every method reaches into the model through these helpers, so supporting another decoder-only
architecture with the same parts (Mistral, Qwen2, ...) is a change here, not in each method.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from methods.core.errors import UsageError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (`model.model.layers` for every Llama-like HF model)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UsageError(
            f"{type(model).__name__} is not a decoder-only Llama-like model (no model.model.layers)")
    return layers


def check_llama_like(model: nn.Module) -> None:
    """Refuse models whose blocks lack the seven Llama projections the methods prune."""
    layers = decoder_layers(model)
    if len(layers) == 0:
        raise UsageError("the model has no decoder layers")
    for index, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        missing = [n for n in ATTENTION_PROJECTIONS if not isinstance(getattr(attn, n, None), nn.Linear)]
        missing += [n for n in MLP_PROJECTIONS if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if missing:
            raise UsageError(
                f"{type(model).__name__} is not a Llama-like decoder: layer {index} lacks {', '.join(missing)}")


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


def sparsity_by_module(model: nn.Module) -> Dict[str, float]:
    """Measured fraction of exact zeros in each prunable Linear weight."""
    return {name: float((m.weight == 0).float().mean()) for name, m in prunable_linears(model).items()}


def overall_sparsity(model: nn.Module) -> float:
    """Zeros over all prunable Linear weights, counted as the originals' check_sparsity does."""
    zeros = total = 0
    for module in prunable_linears(model).values():
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    return zeros / total if total else 0.0

