"""Per-layer checkpoint formats: the stock model of an architecture with each decoder layer at its own widths.

Width pruning leaves layers with different numbers of query heads, key/value heads and MLP channels,
sometimes a hidden size that is no longer heads x head_dim, biases the stock model does not have
(FLAP's on o_proj and down_proj), a Gemma 2 embedding scale that is no longer sqrt(hidden_size), or a
depth-pruned stack whose sliding/global pattern the stock config cannot state. A stock config holds
one width for all layers, so such a model is saved in the format of its architecture, model type
`lpc_<name>` (lpc_llama, lpc_qwen2, lpc_qwen3, lpc_mistral, lpc_gemma2, lpc_phi3): the stock config
plus one list entry per layer (`layer_num_attention_heads`, `layer_num_key_value_heads`,
`layer_intermediate_size`), the bias flags, and where they apply `embed_scale` and `layer_types`.

The model class is the stock `<Arch>ForCausalLM`; only its constructor differs. It builds each stock
decoder layer from a copy of the config carrying that layer's widths (so the stock constructor
sizes fused projections, per-head norms, rotary tables and scaling itself), then widens the residual
side to the model's hidden size. Forward, caching and generation are transformers' own, in whatever
version reads the checkpoint (4.43 to 5.x).

This file needs torch, transformers and architectures.py beside it: `save_pretrained` copies both
next to the weights, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and
lm-eval's `--model_args pretrained=dir,trust_remote_code=True` load the model without this kit.
Models whose layers all share a shape the stock config expresses are saved as the stock model.
"""
from __future__ import annotations

import copy
import functools
import importlib
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from .architectures import ARCHITECTURES, READ_RESIDUAL, SLIDING, Anatomy, submodule

LAYER_FIELDS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")
OWN_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class Format(NamedTuple):
    config: type
    model: type
    causal_lm: type


def stock_classes(anatomy: Anatomy) -> Optional[dict]:
    """transformers' classes of the architecture, or None where this version lacks it (Qwen3 before 4.51)."""
    try:
        modeling = importlib.import_module(f"transformers.models.{anatomy.model_type}.modeling_{anatomy.model_type}")
        configuration = importlib.import_module(
            f"transformers.models.{anatomy.model_type}.configuration_{anatomy.model_type}")
    except ImportError:
        return None
    names = {"config": (configuration, "Config"), "pretrained": (modeling, "PreTrainedModel"),
             "model": (modeling, "Model"), "causal_lm": (modeling, "ForCausalLM"),
             "layer": (modeling, "DecoderLayer")}
    return {key: getattr(module, anatomy.prefix + suffix) for key, (module, suffix) in names.items()}


class LayerConfig:
    """The model's config as one layer's modules see it: the layer's own head and channel counts, every
    other field (and every later change, such as the attention implementation) the model's.

    Stock attention code may read head counts from its config (Phi-3's splits qkv_proj by
    config.num_attention_heads), so a layer narrower than the config's maximum needs its own numbers.
    """

    def __init__(self, shared, **own):
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "_own", dict(own))

    def __getattr__(self, name):
        state = self.__dict__
        # Mid-copy there is nothing to delegate to yet; and copy/pickle protocol methods must be this
        # class's own, or a copy would come back as the shared config.
        if "_own" not in state or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        return state["_own"][name] if name in state["_own"] else getattr(state["_shared"], name)

    def __setattr__(self, name, value):
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._shared, name, value)


def own_config(layer: nn.Module, shared, **own) -> None:
    """Give every module of `layer` that keeps a config a LayerConfig over `shared` with `own` values."""
    for module in layer.modules():
        config = module.__dict__.get("config")
        if config is None:
            continue
        merged = dict(config._own, **own) if isinstance(config, LayerConfig) else own
        module.config = LayerConfig(shared, **merged)


def set_attention_width(attn: nn.Module, heads: int, kv_heads: int) -> None:
    """Make a stock attention module's shape attributes agree with its projections.

    Versions read different ones (`num_heads` and `hidden_size` up to 4.46, `num_key_value_groups`
    in all); attributes a version does not have are not added. head_dim, hence the scaling, never
    changes (Gemma 2 scales by query_pre_attn_scalar, not head_dim).
    """
    values = {"num_heads": heads, "num_key_value_heads": kv_heads,
              "num_key_value_groups": heads // kv_heads if kv_heads else 0, "hidden_size": heads * attn.head_dim}
    for name, value in values.items():
        if name == "num_key_value_groups" or hasattr(attn, name):
            setattr(attn, name, value)


def resized(linear: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """`linear` if it has this shape, else a fresh Linear on its device and dtype (weights are loaded later)."""
    weight = linear.weight
    if (linear.in_features, linear.out_features, linear.bias is not None) == (in_features, out_features, bias):
        return linear
    return nn.Linear(in_features, out_features, bias=bias, device=weight.device, dtype=weight.dtype)


def widen(layer: nn.Module, anatomy: Anatomy, hidden: int, o_bias: bool, down_bias: bool) -> None:
    """Give a stock layer built at hidden size heads x head_dim the model's hidden size on every residual
    side (the fresh parts are loaded later), and o_proj / down_proj the stated biases."""
    biases = {anatomy.projections["o"]: o_bias, anatomy.projections["down"]: down_bias}
    for path in anatomy.modules():
        parent, _, name = path.rpartition(".")
        owner = submodule(layer, parent)
        linear = getattr(owner, name)
        reads = path in anatomy.modules(READ_RESIDUAL)
        shape = (hidden, linear.out_features) if reads else (linear.in_features, hidden)
        setattr(owner, name, resized(linear, *shape, biases.get(path, linear.bias is not None)))
    for path in anatomy.norms:
        norm = submodule(layer, path)
        if norm.weight.shape[0] != hidden:
            weight = norm.weight
            norm.weight = nn.Parameter(torch.full((hidden,), 1.0 - anatomy.norm_offset, dtype=weight.dtype,
                                                  device=weight.device))
    for module in (layer, layer.mlp):
        if hasattr(module, "hidden_size"):
            module.hidden_size = hidden


def rotary_config(config):
    """A config from which every transformers version derives rotary tables of `config.head_dim`
    (versions before 4.45 compute it as hidden_size // num_attention_heads)."""
    rope = copy.deepcopy(config)
    rope.hidden_size = config.head_dim * config.num_attention_heads
    return rope


def set_layer_type(layer: nn.Module, config, kind: str) -> None:
    """Make a layer attend as `kind` says. Transformers 5.x reads config.layer_types when it builds a
    layer; 4.43's Gemma 2 derives the type from the layer's index, which depth pruning renumbers."""
    sliding = kind == SLIDING
    if hasattr(layer, "is_sliding"):
        layer.is_sliding = sliding
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):
        attn.sliding_window = config.sliding_window if sliding else None
    if hasattr(attn, "layer_type"):
        attn.layer_type = kind


def _scale_embedding(module: nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
    return output * module.lpc_embed_ratio


def keep_embed_scale(base: nn.Module, scale: float) -> None:
    """Make the embedding scale `scale` (the unpruned sqrt(hidden_size)), whatever the hidden size now is.

    Transformers 5.x keeps the scale in the embedding module; 4.43 multiplies by
    sqrt(config.hidden_size) in the model's forward, so there the embedding's output is corrected."""
    embed = base.embed_tokens
    if hasattr(embed, "scalar_embed_scale"):
        embed.scalar_embed_scale = scale
        with torch.no_grad():
            embed.embed_scale.fill_(scale)
        return
    embed.lpc_embed_ratio = scale / base.config.hidden_size ** 0.5
    if not getattr(embed, "lpc_embed_hooked", False):
        embed.register_forward_hook(_scale_embedding)
        embed.lpc_embed_hooked = True


def adopt(base: nn.Module, anatomy: Anatomy) -> None:
    """What the per-layer format does beyond shapes, for a freshly built model or one converted in memory:
    each layer's own config view, its attention type, the embedding scale."""
    config = base.config
    types = getattr(config, "layer_types", None)
    for index, layer in enumerate(base.layers):
        own = {name: getattr(config, field)[index] for name, field in zip(OWN_FIELDS, LAYER_FIELDS)}
        own_config(layer, config, **own)
        if anatomy.layer_types is not None and types:
            set_layer_type(layer, config, types[index])
    if anatomy.embed_scale and getattr(config, "embed_scale", None):
        keep_embed_scale(base, config.embed_scale)


def fit_preallocated_cache(base: nn.Module, cache) -> None:
    """Give a cache that older transformers preallocate for every layer alike (4.43's HybridCache for
    Gemma 2: the config's key/value heads everywhere, sliding by index parity) each layer's own key/value
    heads and attention type. Caches that size themselves from what they are given (5.x) are left alone."""
    keys, values = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)
    if hasattr(cache, "layers") or not isinstance(keys, list) or len(keys) != len(base.layers):
        return
    config = base.config
    types = getattr(config, "layer_types", None)
    sliding = getattr(cache, "is_sliding", None)
    for index in range(len(keys)):
        old = keys[index]
        length = old.shape[2]
        if sliding is not None and types:
            sliding[index] = types[index] == SLIDING
            length = min(config.sliding_window, cache.max_cache_len) if types[index] == SLIDING else cache.max_cache_len
        shape = (old.shape[0], config.layer_num_key_value_heads[index], length, old.shape[3])
        if tuple(old.shape) != shape:
            keys[index] = torch.zeros(shape, dtype=old.dtype, device=old.device)
            values[index] = torch.zeros(shape, dtype=old.dtype, device=old.device)


def _make_format(anatomy: Anatomy, stock: dict) -> Format:
    class Config(stock["config"]):
        model_type = f"lpc_{anatomy.name}"

        def __init__(self, layer_num_attention_heads: Optional[List[int]] = None,
                     layer_num_key_value_heads: Optional[List[int]] = None,
                     layer_intermediate_size: Optional[List[int]] = None,
                     o_proj_bias: bool = False, down_proj_bias: bool = False,
                     head_dim: Optional[int] = None, embed_scale: Optional[float] = None, **kwargs):
            heads = kwargs.pop("num_attention_heads", None) or 32
            if head_dim:
                # Constructors check hidden_size against num_attention_heads (5.x: divisible; Phi-3's
                # rope scaling: hidden_size // heads = head_dim), which pruned layers need not satisfy;
                # the real count is set once the stock constructor is done.
                hidden = kwargs.get("hidden_size") or 0
                kwargs.update(head_dim=head_dim,
                              num_attention_heads=hidden // head_dim if hidden and hidden % head_dim == 0 else 1)
            else:
                kwargs["num_attention_heads"] = heads
            super().__init__(**kwargs)
            self.num_attention_heads = heads
            layers = self.num_hidden_layers
            self.head_dim = head_dim or self.hidden_size // heads
            self.layer_num_attention_heads = list(layer_num_attention_heads or [heads] * layers)
            self.layer_num_key_value_heads = list(layer_num_key_value_heads or [self.num_key_value_heads] * layers)
            self.layer_intermediate_size = list(layer_intermediate_size or [self.intermediate_size] * layers)
            self.o_proj_bias = bool(o_proj_bias)
            self.down_proj_bias = bool(down_proj_bias)
            if embed_scale is not None:
                self.embed_scale = float(embed_scale)
            for name in LAYER_FIELDS:
                if len(getattr(self, name)) != layers:
                    raise ValueError(f"{name} has {len(getattr(self, name))} entries for {layers} layers")

        def validate(self):
            """Transformers 5.x's config checks (run on save), minus the hidden_size / heads relation:
            see __init__. Older versions have no such checks and never call this."""
            for check in getattr(type(self), "__class_validators__", ()):
                if check.__name__ != "validate_architecture":
                    check(self)

    class Model(stock["model"]):
        config_class = Config

        def __init__(self, config):
            layers = config.num_hidden_layers
            config.num_hidden_layers = 0  # the stock constructor builds embedding, norm, rotary table
            try:
                super().__init__(config)
            finally:
                config.num_hidden_layers = layers
            self.layers = nn.ModuleList(build_layer(anatomy, stock["layer"], config, i) for i in range(layers))
            if hasattr(self, "rotary_emb"):  # a model-level rotary table (Llama 4.43, every 5.x)
                self.rotary_emb = type(self.rotary_emb)(config=rotary_config(config))
            adopt(self, anatomy)

    class CausalLM(stock["causal_lm"]):
        config_class = Config

        def __init__(self, config):
            # The stock constructor minus the uniform model it would build and throw away.
            stock["pretrained"].__init__(self, config)
            self.model = Model(config)
            self.vocab_size = config.vocab_size
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def _get_cache(self, *args, **kwargs):
            cache = super()._get_cache(*args, **kwargs)
            fit_preallocated_cache(self.model, cache)
            return cache

    for cls, suffix in ((Config, "Config"), (Model, "Model"), (CausalLM, "ForCausalLM")):
        cls.__name__ = cls.__qualname__ = f"Lpc{anatomy.prefix}{suffix}"
        cls.__module__ = __name__
        globals()[cls.__name__] = cls
    return Format(Config, Model, CausalLM)


def build_layer(anatomy: Anatomy, layer_class: type, config, index: int) -> nn.Module:
    """Decoder layer `index` of a per-layer config: the stock layer built at its own widths."""
    heads = config.layer_num_attention_heads[index]
    stock = copy.deepcopy(config)
    stock.num_attention_heads = heads
    stock.num_key_value_heads = config.layer_num_key_value_heads[index]
    stock.intermediate_size = config.layer_intermediate_size[index]
    # Versions that derive head_dim from hidden_size / heads then derive this layer's.
    stock.hidden_size = heads * config.head_dim
    layer = layer_class(stock, index)
    widen(layer, anatomy, config.hidden_size, config.o_proj_bias, config.down_proj_bias)
    return layer


@functools.lru_cache(maxsize=None)
def _format(name: str) -> Optional[Format]:
    # Built on first use: each format imports its architecture's transformers modules, which a
    # process that never meets that architecture should not pay for.
    anatomy = ARCHITECTURES[name]
    stock = stock_classes(anatomy)
    return None if stock is None else _make_format(anatomy, stock)


def __getattr__(name: str):
    """`LpcLlamaForCausalLM` and the like, built on first use: what a checkpoint's auto_map names when
    transformers loads this file as remote code."""
    for arch, anatomy in ARCHITECTURES.items():
        if name in {f"Lpc{anatomy.prefix}{suffix}" for suffix in ("Config", "Model", "ForCausalLM")} and _format(arch):
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def format_of(anatomy: Anatomy) -> Optional[Format]:
    """The per-layer format of an architecture, or None where this transformers lacks the architecture."""
    return _format(anatomy.name)


def source_files() -> List[Path]:
    """The files a checkpoint in these formats needs beside its weights to load as remote code."""
    here = Path(__file__).resolve().parent
    return [here / "modeling_lpc.py", here / "architectures.py"]


def register(model_type: Optional[str] = None) -> None:
    """Let Auto* classes resolve every lpc_<name> type in this process (or only `model_type`, a
    checkpoint's), and save_pretrained write the auto_map and copy the code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type is not None and not model_type.startswith("lpc_"):
        return  # a stock checkpoint: nothing of ours to register
    names = [model_type[len("lpc_"):]] if model_type is not None else list(ARCHITECTURES)
    for fmt in (f for f in map(_format, (n for n in names if n in ARCHITECTURES)) if f is not None):
        try:
            AutoConfig.register(fmt.config.model_type, fmt.config)
            AutoModelForCausalLM.register(fmt.config, fmt.causal_lm)
        except ValueError:
            pass  # already registered
        fmt.config.register_for_auto_class()
        fmt.causal_lm.register_for_auto_class("AutoModelForCausalLM")
