"""The decoder-only architectures the kit prunes, each declared once.

A declaration says where a decoder layer keeps the parts a pruning unit is made of, and what travels
with a removed unit:

* projections: the module holding each of the seven parts q, k, v, o, gate, up, down. Parts named by
  the same module are fused into it, stacked by rows in the order q, k, v and gate, up (Phi-3's
  qkv_proj and gate_up_proj). A query head is head_dim rows of q and head_dim input columns of o; a
  key/value head head_dim rows of k and of v; an MLP channel a row of gate and of up and an input
  column of down; a hidden channel an input column of q, k, v, gate, up, an output row of o and
  down, an entry of every residual norm and a column of the embedding and the LM head. The biases
  of those rows travel with them (Qwen2's q/k/v biases).
* head_norms: norms over one head's head_dim channels, shared by every head (Qwen3's q_norm and
  k_norm); no removal touches them.
* input_norms: the two norms that read the residual stream before attention and before the MLP.
  output_norms: norms on a block's output before it is added to the residual (Gemma 2's post-norms);
  where they exist, they are the block's output, not o_proj or down_proj.
* norm_offset: a norm scales by offset + weight (Gemma stores its RMSNorm scale as an offset from 1).
* embed_scale: the embedding's output is multiplied by sqrt(hidden_size) (Gemma). After hidden
  channels are removed that factor stays the original constant.
* explicit_head_dim: every supported transformers version reads config.head_dim; otherwise some
  derive it as hidden_size / num_attention_heads, so a stock config needs heads x head_dim = hidden.
* layer_types: the attention type ("full_attention" or "sliding_attention") that the stock model of
  every supported transformers version gives layer i; None when every layer is alike.

Which config fields change with each removal is the same for all of them (FIELDS).

This file is standard library only: it is copied next to per-layer checkpoints, whose model class
(methods/modeling_lpc.py) reads it when loaded with trust_remote_code. Adding an architecture is one
declaration in ARCHITECTURES and its tests (docs/architectures.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

PARTS = ("q", "k", "v", "o", "gate", "up", "down")
STACKING = (("q", "k", "v"), ("gate", "up"))   # row order of parts fused into one module
READ_RESIDUAL = ("q", "k", "v", "gate", "up")  # their input columns are hidden channels
WRITE_RESIDUAL = ("o", "down")                 # their output rows are hidden channels

# unit -> the config field that counts it; every declared architecture uses transformers' names.
FIELDS: Mapping[str, str] = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                             "intermediate": "intermediate_size", "hidden": "hidden_size",
                             "layers": "num_hidden_layers"}

SEPARATE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
FUSED = {**SEPARATE, "q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj",
         "gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj"}

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Anatomy:
    name: str                      # its per-layer checkpoint format is model type lpc_<name>
    model_type: str                # the stock config's model_type (and transformers.models.<model_type>)
    prefix: str                    # transformers' class names: <prefix>Config, <prefix>DecoderLayer, ...
    projections: Mapping[str, str] = field(default_factory=lambda: dict(SEPARATE))
    head_norms: Tuple[str, ...] = ()
    input_norms: Tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    output_norms: Tuple[str, ...] = ()
    final_norm: str = "norm"       # inside the base model
    norm_offset: float = 0.0
    embed_scale: bool = False
    explicit_head_dim: bool = False
    layer_types: Optional[Callable[[Any, int], str]] = None

    def __post_init__(self):
        # FLAP's compensation bias and Sheared LLaMA's fold act on the whole o and down modules.
        for part in WRITE_RESIDUAL:
            if list(self.projections.values()).count(self.projections[part]) != 1:
                raise ValueError(f"{self.name}: {part} may not share its module with another part")

    def modules(self, parts=PARTS) -> Tuple[str, ...]:
        """The distinct modules holding `parts`, in part order."""
        return tuple(dict.fromkeys(self.projections[p] for p in parts))

    def fused_with(self, part: str) -> Tuple[str, ...]:
        """The parts stored in `part`'s module, in row order (just `part` when it has a module of its own)."""
        module = self.projections[part]
        for stack in STACKING:
            if part in stack:
                return tuple(p for p in stack if self.projections[p] == module)
        return (part,)

    @property
    def norms(self) -> Tuple[str, ...]:
        """Every per-layer norm on the residual stream, in execution order."""
        first, second = self.input_norms
        return (first,) + self.output_norms[:1] + (second,) + self.output_norms[1:]


def _sliding_after_max_window_layers(config, index: int) -> str:
    sliding = getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None) is not None
    return SLIDING if sliding and index >= config.max_window_layers else FULL


ARCHITECTURES: Dict[str, Anatomy] = {a.name: a for a in (
    Anatomy("llama", "llama", "Llama"),
    Anatomy("qwen2", "qwen2", "Qwen2", layer_types=_sliding_after_max_window_layers),
    Anatomy("qwen3", "qwen3", "Qwen3", head_norms=("self_attn.q_norm", "self_attn.k_norm"), explicit_head_dim=True,
            layer_types=_sliding_after_max_window_layers),
    Anatomy("mistral", "mistral", "Mistral", explicit_head_dim=True),
    Anatomy("gemma2", "gemma2", "Gemma2", input_norms=("input_layernorm", "pre_feedforward_layernorm"),
            output_norms=("post_attention_layernorm", "post_feedforward_layernorm"), norm_offset=1.0,
            embed_scale=True, explicit_head_dim=True,
            layer_types=lambda config, index: SLIDING if index % 2 == 0 else FULL),
    Anatomy("phi3", "phi3", "Phi3", projections=dict(FUSED)),
)}


def by_model_type(model_type: str) -> Optional[Anatomy]:
    """The declaration of a stock model type or of its per-layer format (lpc_<name>)."""
    for anatomy in ARCHITECTURES.values():
        if model_type in (anatomy.model_type, f"lpc_{anatomy.name}"):
            return anatomy
    return None


def by_layer_class(name: str) -> Optional[Anatomy]:
    """The declaration whose stock decoder layer class is called `name` (per-layer formats build stock layers)."""
    for anatomy in ARCHITECTURES.values():
        if name == f"{anatomy.prefix}DecoderLayer":
            return anatomy
    return None


def submodule(root, path: str):
    """root.a.b for path "a.b" (None where a step is missing)."""
    for step in path.split("."):
        root = getattr(root, step, None)
    return root
