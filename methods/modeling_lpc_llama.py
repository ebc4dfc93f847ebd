"""A Llama whose decoder layers may differ in width: the checkpoint format of structurally pruned models.

Width pruning (FLAP's adaptive structure, LLM-Pruner, Minitron with head pruning) leaves layers with
different numbers of query heads, key/value heads and MLP channels, sometimes a hidden size that is
no longer heads x head_dim, and (FLAP) biases on o_proj and down_proj. A stock `LlamaConfig` holds
one width for all layers, so such a model is saved with this config class instead: the stock fields
plus one list entry per layer. The model class is the stock `LlamaForCausalLM`; only its constructor
differs, building each stock decoder layer at its own widths. Forward, caching and generation are
transformers' own, so the format follows whatever transformers version reads it (4.40 to 5.x).

This file is self-contained (torch and transformers only): `save_pretrained` copies it next to the
weights, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (and lm-eval's
`--model hf --model_args pretrained=dir,trust_remote_code=True`) load the model without this kit.
Models whose layers all share one Llama-representable shape are saved as plain Llama instead.
"""
from __future__ import annotations

import copy
import inspect
from typing import List, Optional

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

MODEL_TYPE = "lpc_llama"


class LpcLlamaConfig(LlamaConfig):
    """LlamaConfig plus per-layer widths; `head_dim` is always explicit."""

    model_type = MODEL_TYPE

    def __init__(self, layer_num_attention_heads: Optional[List[int]] = None,
                 layer_num_key_value_heads: Optional[List[int]] = None,
                 layer_intermediate_size: Optional[List[int]] = None,
                 o_proj_bias: bool = False, down_proj_bias: bool = False,
                 head_dim: Optional[int] = None, **kwargs):
        if head_dim:
            kwargs["head_dim"] = head_dim
        # Transformers 5.x validates hidden_size % num_attention_heads == 0 inside the constructor.
        # With an explicit head_dim and per-layer head counts that relation does not hold for pruned
        # models and nothing relies on it, so the check sees one head and the real count is set after.
        heads = kwargs.pop("num_attention_heads", None)
        super().__init__(num_attention_heads=1 if head_dim else heads or 32, **kwargs)
        if head_dim:
            self.num_attention_heads = heads or 32
        layers = self.num_hidden_layers
        self.head_dim = head_dim or self.hidden_size // self.num_attention_heads
        self.layer_num_attention_heads = list(layer_num_attention_heads or [self.num_attention_heads] * layers)
        self.layer_num_key_value_heads = list(layer_num_key_value_heads or [self.num_key_value_heads] * layers)
        self.layer_intermediate_size = list(layer_intermediate_size or [self.intermediate_size] * layers)
        self.o_proj_bias = bool(o_proj_bias)
        self.down_proj_bias = bool(down_proj_bias)
        for name in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size"):
            if len(getattr(self, name)) != layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {layers} layers")


    def validate(self):
        """Transformers 5.x's config checks (run on save), minus hidden_size % num_attention_heads:
        see __init__. Older versions have no such checks and never call this."""
        for check in getattr(type(self), "__class_validators__", ()):
            if check.__name__ != "validate_architecture":
                check(self)


def set_attention_width(attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Make a stock attention module's shape attributes agree with its projections.

    Different transformers versions read different ones: `num_heads`/`hidden_size` (<= 4.46),
    `num_key_value_groups` (all), `head_dim` (all). Attributes a version does not have are not added.
    """
    values = {"num_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "num_key_value_groups": heads // kv_heads if kv_heads else 0,
              "hidden_size": heads * head_dim, "scaling": head_dim ** -0.5}
    for name, value in values.items():
        if name in ("head_dim", "num_key_value_groups") or hasattr(attn, name):
            setattr(attn, name, value)


def _resized(linear: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A fresh Linear of the given shape, on the old one's device and dtype (weights are loaded later)."""
    weight = linear.weight
    if (linear.in_features, linear.out_features, linear.bias is not None) == (in_features, out_features, bias):
        return linear
    return nn.Linear(in_features, out_features, bias=bias, device=weight.device, dtype=weight.dtype)


def shape_layer(layer: nn.Module, hidden: int, heads: int, kv_heads: int, head_dim: int,
                intermediate: int, o_proj_bias: bool = False, down_proj_bias: bool = False) -> None:
    """Give a stock decoder layer the stated widths (fresh, uninitialised projections where they differ)."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.q_proj = _resized(attn.q_proj, hidden, heads * head_dim, attn.q_proj.bias is not None)
    attn.k_proj = _resized(attn.k_proj, hidden, kv_heads * head_dim, attn.k_proj.bias is not None)
    attn.v_proj = _resized(attn.v_proj, hidden, kv_heads * head_dim, attn.v_proj.bias is not None)
    attn.o_proj = _resized(attn.o_proj, heads * head_dim, hidden, o_proj_bias)
    set_attention_width(attn, heads, kv_heads, head_dim)
    mlp.gate_proj = _resized(mlp.gate_proj, hidden, intermediate, mlp.gate_proj.bias is not None)
    mlp.up_proj = _resized(mlp.up_proj, hidden, intermediate, mlp.up_proj.bias is not None)
    mlp.down_proj = _resized(mlp.down_proj, intermediate, hidden, down_proj_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate
    if hasattr(mlp, "hidden_size"):
        mlp.hidden_size = hidden


def rotary_config(config: LlamaConfig) -> LlamaConfig:
    """A config from which every transformers version derives rotary tables of `config.head_dim`.

    Versions before 4.45 compute the rotary dimension as hidden_size // num_attention_heads; once
    the hidden size or head count is pruned that is no longer the head dimension.
    """
    rope = copy.deepcopy(config)
    rope.hidden_size = config.head_dim * config.num_attention_heads
    return rope


class LpcLlamaModel(LlamaModel):
    config_class = LpcLlamaConfig

    def __init__(self, config: LpcLlamaConfig):
        layers = config.num_hidden_layers
        config.num_hidden_layers = 0      # the stock constructor builds embedding, norm, rotary table
        try:
            super().__init__(config)
        finally:
            config.num_hidden_layers = layers
        self.layers = nn.ModuleList(self._build_layer(config, index) for index in range(layers))
        if hasattr(self, "rotary_emb"):  # model-level rotary table of transformers >= 4.43
            self.rotary_emb = type(self.rotary_emb)(config=rotary_config(config))

    @staticmethod
    def _build_layer(config: LpcLlamaConfig, index: int) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # Built at one head per layer, a shape every version's constructor accepts (before 4.45
        # it insists hidden_size % num_heads == 0), then given its real widths.
        stock = copy.deepcopy(config)
        stock.num_attention_heads = stock.num_key_value_heads = 1
        stock.head_dim = config.hidden_size
        stock.intermediate_size = config.layer_intermediate_size[index]
        layer = LlamaDecoderLayer(stock, index)
        if hasattr(layer.self_attn, "config"):
            layer.self_attn.config = config
        legacy_rope = False
        if hasattr(layer.self_attn, "rotary_emb"):  # per-attention rotary table of transformers < 4.48
            rotary = type(layer.self_attn.rotary_emb)
            if "config" in inspect.signature(rotary.__init__).parameters:
                layer.self_attn.rotary_emb = rotary(config=rotary_config(config))
            else:  # before 4.43 the table is built from the attention's own head_dim
                legacy_rope = True
        shape_layer(layer, config.hidden_size, config.layer_num_attention_heads[index],
                    config.layer_num_key_value_heads[index], config.head_dim,
                    config.layer_intermediate_size[index], config.o_proj_bias, config.down_proj_bias)
        if legacy_rope:
            layer.self_attn._init_rope()
        return layer


class LpcLlamaForCausalLM(LlamaForCausalLM):
    config_class = LpcLlamaConfig

    def __init__(self, config: LpcLlamaConfig):
        # LlamaForCausalLM.__init__ minus the uniform LlamaModel it would build and throw away.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LpcLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def register() -> None:
    """Let Auto* classes resolve `lpc_llama` in this process, and save_pretrained write auto_map + this file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, LpcLlamaConfig)
        AutoModelForCausalLM.register(LpcLlamaConfig, LpcLlamaForCausalLM)
    except ValueError:
        pass  # already registered
    LpcLlamaConfig.register_for_auto_class()
    LpcLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
