"""Sheared LLaMA (Xia et al. 2023, arXiv:2310.06694): targeted structured pruning with learned
hard-concrete L0 gates, as princeton-nlp/LLM-Shearing runs it.

Four gate sets over a Llama: one per attention head of every layer, one per MLP channel of every
layer, one per layer (shared by its attention and MLP outputs), one per hidden channel (shared by
every layer). Each gate is a hard-concrete variable with log-alpha parameter a, stretch interval
(l, r) = (-0.1, 1.1) and temperature T = 2/3:

* sample (training): u ~ U(1e-6, 1 - 1e-6), z = clamp(sigmoid((log u - log(1 - u) + a) / T)(r - l) + l, 0, 1),
  one draw per forward pass, shared by the batch;
* keep probability: 1 - Q(0) with Q(0) = clamp(sigmoid(T log(x / (1 - x)) - a), 1e-6, 1 - 1e-6),
  x = -l / (r - l); a row's expected sparsity is 1 - (sum of its keep probabilities) / row size;
* deterministic gate: soft = sigmoid(0.8 a / T) with the k smallest set to 0, k = row size - target
  size (`target=True`), else round(row size - expected kept) with Python's banker's rounding. Rows
  are per layer for heads and MLP channels, the whole vector for layers and hidden channels. The kept
  values stay soft, and it is these soft values that are folded into the pruned weights.

a starts at N(5, 0.01) and is clamped to [ln 0.01, ln 100] before every use. The objective is the
language-model cross-entropy plus, per gate set m, mean over its rows of
lambda1_m (s_m - t_m) + lambda2_m (s_m - t_m)^2, where s_m is the expected sparsity and t_m ramps
linearly from `start_sparsity` to the target's sparsity over the Lagrangian warm-up. The lambdas
start at 0 and are trained by gradient ascent (the training engine's `sheared` kind,
training/engine.py). `Gates` without a target shape (the original's untargeted mode, which its
golden fixtures cover; the options always name a target) constrain the overall expected sparsity of
the prunable parameters instead.

Where the gates multiply the model while it is sheared (`Masking`), how they are folded into its
weights and how the zeroed units go: methods/sheared_model.py. Pruning (`prune`) takes the
deterministic gates at the target size, folds them and removes the zeroed units.

Grouped-query attention (the original is MHA only): one gate per key/value group, multiplying every
query head that reads it, so whole groups are removed as the kit's other width methods do; under
MHA a group is one head. A group's parameters (q and o rows of its heads, its k and v rows) are what
the expected size counts per head gate.

Quirks of the original, kept by default, each with its correction as an option:

* `mask_embedding=False`: while shearing, the token embedding is not multiplied by the hidden gates
  (the original's model computes its gates after the embedding); the norms still ignore the pruned
  channels, but the kept ones are not scaled. True applies the gates to the embedding as well, so
  the trained model is the one the fold produces.
* `fold_hidden_into_lm_head=True`: the fold multiplies the LM head's columns by the hidden gates
  although the final norm already carries them, so the pruned model's logits differ from the masked
  model's. False folds them into the final norm only. With tied embeddings the shared matrix takes
  the gates once, which is the original's arithmetic; False then unties the head.
* The proportion update of dynamic batch loading does not clip the loss excess at 0: that rule
  lives with the data (training/data.py, `--clip-excess`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Dict, Optional, Union

from pydantic import Field

from methods.architectures import by_model_type
from methods.core.errors import UsageError
from methods.options import method_options

LIMIT_LOW, LIMIT_HIGH = -0.1, 1.1          # the stretch interval of the hard-concrete distribution
TEMPERATURE = 2.0 / 3.0
EPSILON = 1e-6                             # keeps the uniform noise and Q(0) off 0 and 1
SOFT_SHARPNESS = 0.8                       # deterministic gates: sigmoid(0.8 a / T)
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
INIT_MEAN, INIT_STD = 5.0, 1e-2
GATE_SETS = ("head", "intermediate", "layer", "hidden")   # also the order of the Lagrangian's sum

@dataclass(frozen=True)
class Shape:
    """The widths the gates act on: hidden channels, query and key/value heads, layers, MLP channels."""
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

# The paper's targets for a Llama-2-7B source (MHA, head_dim 128).
PRESETS: Dict[str, Shape] = {
    "2.7b": Shape(2560, 20, 20, 32, 6912),
    "1.3b": Shape(2048, 16, 16, 24, 5504),
    "370m": Shape(1024, 8, 8, 24, 2816),
}
SHAPE_KEYS = tuple(Shape.__dataclass_fields__)

@method_options
class Options:
    target_shape: Annotated[Union[str, Dict[str, int]], Field(
        description="the pruned shape: 2.7b, 1.3b, 370m, a config.json, or a mapping of hidden_size, "
                    "num_attention_heads, num_key_value_heads, num_hidden_layers, intermediate_size")]
    lagrangian_warmup_fraction: Annotated[float, Field(
        ge=0, le=1, description="the target sparsity ramps up over this fraction of the steps "
                                "(the collection's 0.1; the original's 0.2)")] = 0.1
    start_sparsity: Annotated[float, Field(ge=0, lt=1, description="where the ramp starts")] = 0.0
    mask_lr: Annotated[float, Field(
        gt=0, description="learning rate of the gates and (by gradient ascent) of the Lagrange multipliers, "
                          "scheduled like the weights'")] = 1.0
    eval_target_model: Annotated[bool, Field(
        description="evaluations while shearing use gates at the target size (default: at the current "
                    "expected size, as the collection's scripts)")] = False
    mask_embedding: Annotated[bool, Field(
        description="multiply the token embedding by the hidden gates while shearing (the original does not)")
    ] = False
    fold_hidden_into_lm_head: Annotated[bool, Field(
        description="fold the hidden gates into the LM head as well as the final norm, as the original does")
    ] = True
    random_units: Annotated[Optional[int], Field(
        description="the control: no training, keep a random choice of units at the target shape drawn "
                    "with this seed, weights unscaled")] = None

    @property
    def trains(self) -> bool:
        """Whether pruning needs the training run (the random control does not)."""
        return self.random_units is None

# ----------------------------------------------------------------------------- shapes

def shape_of(config) -> Shape:
    """The source model's shape, refusing one whose layers differ in width."""
    if any(getattr(config, name, None) for name in ("layer_num_attention_heads", "layer_intermediate_size")):
        widths = {(h, kv, i) for h, kv, i in zip(config.layer_num_attention_heads, config.layer_num_key_value_heads,
                                                 config.layer_intermediate_size)}
        if len(widths) > 1:
            raise UsageError("sheared needs a source whose layers all have the same widths")
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Shape(config.hidden_size, heads, kv, config.num_hidden_layers, config.intermediate_size)

def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

def read_target(spec: Union[str, Dict[str, int]]) -> Dict[str, int]:
    """A target shape's numbers, from a preset name, a config.json or a mapping (not yet checked)."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(SHAPE_KEYS))
        if unknown:
            raise UsageError(f"target shape: unknown key {', '.join(unknown)} (expected {', '.join(SHAPE_KEYS)})")
        values = dict(spec)
    elif spec.lower() in PRESETS:
        return asdict(PRESETS[spec.lower()])
    elif spec.endswith(".json"):
        path = Path(spec).expanduser()
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"target shape {spec}: cannot read it ({type(exc).__name__})") from None
        if not isinstance(values, dict):
            raise UsageError(f"target shape {spec}: not a JSON object")
        values = {k: v for k, v in values.items() if k in SHAPE_KEYS}
    else:
        raise UsageError(f"target shape {spec!r}: not one of {', '.join(PRESETS)} nor a .json file")
    values.setdefault("num_key_value_heads", values.get("num_attention_heads"))
    missing = [k for k in SHAPE_KEYS if values.get(k) is None]
    if missing:
        raise UsageError(f"target shape lacks {', '.join(missing)}")
    bad = [k for k in SHAPE_KEYS if not isinstance(values[k], int) or isinstance(values[k], bool) or values[k] < 1]
    if bad:
        raise UsageError(f"target shape: {bad[0]} must be a positive integer, got {values[bad[0]]!r}")
    return values

def target_for(config, spec: Union[str, Dict[str, int]]) -> Shape:
    """The target shape for a source config, or one UsageError line saying why it cannot be reached."""
    source = shape_of(config)
    values = read_target(spec)
    for key in SHAPE_KEYS:
        if values[key] > getattr(source, key):
            what = "key/value heads" if key == "num_key_value_heads" else key
            raise UsageError(f"target {what} {values[key]} is more than the source's {getattr(source, key)}")
    target = Shape(**values)
    anatomy = by_model_type(getattr(config, "model_type", ""))
    if not (anatomy and anatomy.explicit_head_dim) and target.hidden_size % target.num_attention_heads:
        raise UsageError(f"target hidden_size {target.hidden_size} is not divisible by its "
                         f"{target.num_attention_heads} attention heads")
    if target.num_attention_heads != target.num_key_value_heads * source.group_size:
        raise UsageError(f"whole key/value groups are gated, so the target keeps the source's {source.group_size} "
                         f"query head(s) per key/value head: {target.num_key_value_heads} key/value heads need "
                         f"num_attention_heads {target.num_key_value_heads * source.group_size}, "
                         f"not {target.num_attention_heads}")
    return target

def prunable_size(shape: Shape, head_dim: int) -> int:
    """Parameters of the gated units: every layer's attention and MLP projections (no embeddings, no norms)."""
    return shape.num_hidden_layers * (shape.num_key_value_heads * group_parameters(shape, head_dim)
                                      + 3 * shape.hidden_size * shape.intermediate_size)

def group_parameters(shape: Shape, head_dim: int) -> int:
    """One key/value group: its query heads' q and o rows and its own k and v rows (4 d head_dim under MHA)."""
    return shape.hidden_size * head_dim * (2 * shape.group_size + 2)
