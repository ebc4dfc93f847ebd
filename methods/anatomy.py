"""Where things live inside a Llama-like Hugging Face causal LM.

Every method reaches into the model through these helpers, so supporting another decoder-only
architecture with the same parts (Mistral, Qwen2, ...) is a change here, not in each method.
"""
from __future__ import annotations

import os
from typing import Dict, Union

import torch
from torch import nn

from methods.errors import UsageError

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


def parse_batch_size(what: str, value: Union[int, str]) -> Union[int, str]:
    """A batch size as a user gives it (an int, its text, or "auto"); anything else is one UsageError line."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise UsageError(f"{what} must be a positive integer or 'auto', got {value!r}")
    return number


def batch_that_fits(per_item_bytes: int, count: int, device: torch.device, fraction: float = 0.25) -> int:
    """How many items of `per_item_bytes` working memory fit in `fraction` of what `device` has free
    (at least 1, at most `count`): the rule behind every "auto" batch size of the kit."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # no sysconf: assume a modest machine
            free = 2**30
    return max(1, min(count, int(fraction * free) // max(1, per_item_bytes)))


def compute_device(preferred: str | None = None) -> torch.device:
    """The device layers are moved to while they are processed: the one asked for, else CUDA if present."""
    if preferred:
        try:
            device = torch.device(preferred)
        except RuntimeError as exc:
            raise UsageError(f"unknown device {preferred!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {preferred!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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

