"""A MaxText model configuration generated from a Hugging Face config, and the collection's training settings.

Standard library only: `lpc` (Python 3.9, no MaxText) validates a checkpoint and a TPU job with it
before anything is submitted, and the MaxText side (Python 3.12) builds its configs from it.

MaxText's `llama2` decoder block has one width for all layers, so a checkpoint converts when it is
a Llama whose layers all share one shape: dense Llama-2/3/3.1 and SmolLM2, depth-pruned, uniformly
MLP-pruned, and Minitron-width (an `lpc_llama` config whose per-layer lists are all equal, hidden
size 3072 with 32 heads of 128). Attention is always built as MaxText's Llama-3.1 rotary embedding
(interleaved channel pairs; the conversion permutes q/k to match), with Llama-3.1's frequency scaling
switched on exactly when the Hugging Face config asks for it; MaxText hard-codes that scaling's
constants, so any other rope scaling is refused rather than silently computed differently.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from methods.core.batching import accumulation_steps
from methods.core.errors import UsageError

# MaxText's LLaMARotaryEmbedding applies exactly these (scale 8, low/high frequency factors 1 and 4,
# original context 8192); a Hugging Face config asking for other values would compute another function.
LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def read_hf_config(model_dir: Path) -> Dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UsageError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None


def _rope(hf: Dict[str, Any]) -> Dict[str, Any]:
    """(theta, Llama-3.1 scaling on/off) from either config layout (transformers 5 `rope_parameters`, 4.x `rope_scaling`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if not params.get("rope_type") and scaling:
        params.update(scaling)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if float(theta) != int(theta):
        raise UsageError(f"rope_theta {theta} is not an integer; MaxText's rope_max_timescale is one")
    if kind == "default":
        return {"theta": int(theta), "llama31_scaling": False}
    if kind == "llama3":
        got = {k: params.get(k) for k in LLAMA31_ROPE}
        if all(got[k] is not None and float(got[k]) == float(v) for k, v in LLAMA31_ROPE.items()):
            return {"theta": int(theta), "llama31_scaling": True}
        raise UsageError(f"rope scaling {got} differs from Llama-3.1's {LLAMA31_ROPE}, "
                         "the only one MaxText's Llama rotary embedding computes")
    raise UsageError(f"rope type {kind!r} has no MaxText equivalent here (default and llama3 convert)")


def is_tied(hf: Dict[str, Any]) -> bool:
    return bool(hf.get("tie_word_embeddings", False))


def uniform_shape(hf: Dict[str, Any]) -> Dict[str, int]:
    """The one layer shape of a convertible checkpoint, or one UsageError line saying why there is none."""
    kind = hf.get("model_type")
    if kind not in ("llama", "lpc_llama"):
        raise UsageError(f"model type {kind!r} does not convert to MaxText here (Llama and the kit's lpc_llama do)")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    mlp = hf["intermediate_size"]
    layers = hf["num_hidden_layers"]
    if kind == "lpc_llama":
        lists = {name: hf.get(name) or [] for name in
                 ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")}
        if any(len(set(values)) > 1 for values in lists.values()):
            raise UsageError("non-uniform checkpoint (layers of different widths: "
                             + ", ".join(f"{k}={sorted(set(v))}" for k, v in lists.items() if len(set(v)) > 1)
                             + "); MaxText's decoder layers all share one shape")
        heads = (lists["layer_num_attention_heads"] or [heads])[0]
        kv_heads = (lists["layer_num_key_value_heads"] or [kv_heads])[0]
        mlp = (lists["layer_intermediate_size"] or [mlp])[0]
        if hf.get("o_proj_bias") or hf.get("down_proj_bias"):
            raise UsageError("checkpoint has o_proj/down_proj biases (FLAP); MaxText's Llama layers have none")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UsageError("checkpoint has attention or MLP biases; MaxText's Llama layers have none")
    if hf.get("hidden_act", "silu") != "silu":
        raise UsageError(f"activation {hf.get('hidden_act')!r}: MaxText's Llama block is SwiGLU (silu)")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise UsageError("pretraining_tp > 1 is not supported")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if heads % kv_heads:
        raise UsageError(f"{heads} query heads do not split into {kv_heads} key/value groups")
    return {"hidden": hf["hidden_size"], "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "mlp": mlp, "layers": layers, "vocab": hf["vocab_size"]}


def model_overrides(hf: Dict[str, Any]) -> Dict[str, Any]:
    """MaxText config keys describing the same network as the Hugging Face config `hf`."""
    shape = uniform_shape(hf)
    rope = _rope(hf)
    return {
        "decoder_block": "llama2",
        "base_emb_dim": shape["hidden"],
        "base_num_query_heads": shape["heads"],
        "base_num_kv_heads": shape["kv_heads"],
        "head_dim": shape["head_dim"],
        "base_mlp_dim": shape["mlp"],
        "base_num_decoder_layers": shape["layers"],
        "vocab_size": shape["vocab"],
        "mlp_activations": ["silu", "linear"],
        "normalization_layer_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_type": "llama3.1",
        "rope_use_scale": rope["llama31_scaling"],
        "rope_max_timescale": rope["theta"],
        # MaxText 0.2.5 computes a tied head with a bfloat16 copy of the embedding (attend_on_embedding
        # casts it), ~1e-3 off Hugging Face's fp32 logits on a tiny model; so a tied checkpoint is
        # converted untied, its output kernel a copy of the embedding (convert.py), and re-tied on export
        # while the two copies are still equal.
        "logits_via_embedding": False,
        "enable_dropout": False,
    }


def warmup_steps(steps: int, fraction: float = 0.05, cap: int = 2000) -> int:
    """The collection's warm-up: a fraction of the steps, at most `cap`."""
    return min(int(steps * fraction), cap)


def training_overrides(*, steps: int, global_batch: int, micro_batch: int, seqlen: int, lr: float,
                       warmup_fraction: float, warmup_cap: int, final_lr_fraction: float, beta1: float,
                       beta2: float, eps: float, weight_decay: float, grad_clip: float, devices: int,
                       seed: int = 0, checkpoint_period: Optional[int] = None) -> Dict[str, Any]:
    """MaxText keys for one training run with the collection's optimiser and schedule.

    MaxText's schedule (linear warm-up, cosine from the end of warm-up to lr x final fraction) is
    not the collection's patched one (quadratic warm-up, cosine measured from step 0, lr = min of
    the two); the difference is documented in the README's TPU section; no fork patches it.
    """
    accumulation = accumulation_steps(global_batch, micro_batch, devices)
    warm = warmup_steps(steps, warmup_fraction, warmup_cap)
    return {
        "steps": steps,
        "per_device_batch_size": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "max_target_length": seqlen,
        "learning_rate": lr,
        "warmup_steps_fraction": warm / steps if steps else 0.0,
        "learning_rate_schedule_steps": steps,
        "learning_rate_final_fraction": final_lr_fraction,
        "opt_type": "adamw",
        "adam_b1": beta1,
        "adam_b2": beta2,
        "adam_eps": eps,
        "adam_eps_root": 0.0,
        "adam_weight_decay": weight_decay,
        "gradient_clipping_threshold": grad_clip,
        "init_weights_seed": seed,
        "data_shuffle_seed": seed,
        "checkpoint_period": checkpoint_period or steps,
        "enable_checkpointing": True,
        "async_checkpointing": False,
        "scan_layers": True,
        "remat_policy": "full",
        "ici_fsdp_parallelism": -1,
    }

