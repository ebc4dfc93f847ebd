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

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from methods.architectures import by_model_type
from methods.core.errors import UsageError
from methods.options import method_options
from methods.sheared_model import Masking, fold, remove_zeroed  # noqa: F401  (the method's public parts)

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


# ----------------------------------------------------------------------------- gates

@dataclass
class Zs:
    """One value of every gate: head [layers, kv groups], intermediate [layers, channels], layer
    [layers], hidden [hidden channels]."""
    head: torch.Tensor
    intermediate: torch.Tensor
    layer: torch.Tensor
    hidden: torch.Tensor

    def as_tuple(self):
        return self.head, self.intermediate, self.layer, self.hidden


class Gates(nn.Module):
    """The log-alphas of the four gate sets and the Lagrange multipliers of one shearing run.

    `target` None: the constraint is on the overall expected sparsity, ramped to `target_sparsity`.
    """

    def __init__(self, source: Shape, head_dim: int, target: Optional[Shape] = None, *,
                 target_sparsity: Optional[float] = None, warmup_steps: int = 0, start_sparsity: float = 0.0,
                 seed: int = 0):
        super().__init__()
        if (target is None) == (target_sparsity is None):
            raise UsageError("sheared gates need a target shape or an overall target sparsity (exactly one)")
        self.source, self.target, self.head_dim = source, target, head_dim
        self.target_sparsity = target_sparsity
        self.warmup_steps, self.start_sparsity = warmup_steps, start_sparsity
        s = source
        shapes = {"head": (s.num_hidden_layers, s.num_key_value_heads),
                  "intermediate": (s.num_hidden_layers, s.intermediate_size),
                  "layer": (s.num_hidden_layers,), "hidden": (s.hidden_size,)}
        generator = torch.Generator().manual_seed(seed)
        self.log_alpha = nn.ParameterDict({
            m: nn.Parameter(torch.randn(shape, generator=generator) * INIT_STD + INIT_MEAN) for m, shape in shapes.items()})
        names = [f"lambda_{i}_{m}" for m in GATE_SETS for i in (1, 2)] if target else ["lambda_1", "lambda_2"]
        self.lambdas = nn.ParameterDict({n: nn.Parameter(torch.zeros(())) for n in names})
        # Each unit's parameters, for the expected size: a key/value group, or one MLP channel (its gate,
        # up and down weights); both are spread over the hidden channels they read or write.
        self.group_parameters = group_parameters(source, head_dim)
        self.channel_parameters = 3 * source.hidden_size
        self.prunable_size = prunable_size(source, head_dim)

    # -- sizes --------------------------------------------------------------------------------------

    def mask_size(self, name: str) -> int:
        return self.log_alpha[name].shape[-1]

    def target_size(self, name: str) -> Optional[int]:
        t = self.target
        if t is None:
            return None
        return {"head": t.num_key_value_heads, "intermediate": t.intermediate_size, "layer": t.num_hidden_layers,
                "hidden": t.hidden_size}[name]

    def full_target_sparsity(self, name: Optional[str] = None) -> float:
        """A gate set's sparsity at the target (None: the overall one the untargeted Lagrangian uses)."""
        if name is None:
            if self.target is None:
                return self.target_sparsity
            return 1 - prunable_size(self.target, self.head_dim) / self.prunable_size
        return 1 - self.target_size(name) / self.mask_size(name)

    def target_sparsity_at(self, step: int, name: Optional[str] = None) -> float:
        """The linear ramp from start_sparsity to the target over the Lagrangian warm-up."""
        ramp = 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)
        return (self.full_target_sparsity(name) - self.start_sparsity) * ramp + self.start_sparsity

    # -- the distribution ---------------------------------------------------------------------------

    def constrain(self) -> None:
        with torch.no_grad():
            for a in self.log_alpha.values():
                a.clamp_(*LOG_ALPHA_RANGE)

    def cdf_qz(self, name: str) -> torch.Tensor:
        """Q(0): the probability that a gate is exactly 0."""
        x = (0 - LIMIT_LOW) / (LIMIT_HIGH - LIMIT_LOW)
        return torch.sigmoid(math.log(x / (1 - x)) * TEMPERATURE - self.log_alpha[name]).clamp(EPSILON, 1 - EPSILON)

    def expected_score(self, name: str) -> torch.Tensor:
        return 1 - self.cdf_qz(name)

    def expected_sparsity(self, name: str) -> torch.Tensor:
        """Per row: per layer for heads and MLP channels, a scalar for layers and hidden channels."""
        return 1 - self.expected_score(name).sum(-1) / self.mask_size(name)

    def expected_parameters(self) -> torch.Tensor:
        """Expected size of the prunable parameters: a unit counts as its keep probability times its
        layer's and each hidden channel's."""
        score = {m: self.expected_score(m) for m in GATE_SETS}
        heads = score["head"] * score["layer"][:, None]
        channels = score["intermediate"] * score["layer"][:, None]
        d = self.source.hidden_size
        return (torch.outer(score["hidden"], heads.reshape(-1)).sum() * self.group_parameters / d
                + torch.outer(score["hidden"], channels.reshape(-1)).sum() * self.channel_parameters / d)

    def expected_overall_sparsity(self) -> torch.Tensor:
        return 1 - self.expected_parameters() / self.prunable_size

    def lagrangian(self, step: int) -> torch.Tensor:
        """The Lagrangian term at optimizer step `step` (0-based), with this step's target."""
        self.constrain()
        lam = self.lambdas
        if self.target is None:
            gap = self.expected_overall_sparsity() - self.target_sparsity_at(step)
            return lam["lambda_1"] * gap + lam["lambda_2"] * gap ** 2
        total = torch.zeros((), device=self.log_alpha["head"].device)
        for m in GATE_SETS:
            gap = self.expected_sparsity(m) - self.target_sparsity_at(step, m)
            total = total + (lam[f"lambda_1_{m}"] * gap + lam[f"lambda_2_{m}"] * gap ** 2).mean()
        return total

    # -- gate values --------------------------------------------------------------------------------

    def sample(self, eps: Optional[Dict[str, torch.Tensor]] = None, *,
               generator: Optional[torch.Generator] = None) -> Zs:
        """Training gates: one hard-concrete draw per gate (noise from `eps`, else from `generator`)."""
        self.constrain()
        values = {}
        for m in GATE_SETS:
            a = self.log_alpha[m]
            u = eps[m] if eps is not None else torch.rand(a.shape, generator=generator) * (1 - 2 * EPSILON) + EPSILON
            u = u.to(device=a.device, dtype=a.dtype)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / TEMPERATURE)
            values[m] = F.hardtanh(s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW, min_val=0.0, max_val=1.0)
        return Zs(**values)

    def deterministic(self, *, target: bool = True) -> Zs:
        """Evaluation gates: soft values with the k smallest of every row set to 0, k from the target
        size (`target`, when there is one) or from the current expected size."""
        self.constrain()
        values = {}
        with torch.no_grad():
            for m in GATE_SETS:
                a = self.log_alpha[m]
                soft = torch.sigmoid(a / TEMPERATURE * SOFT_SHARPNESS)
                rows, scores = soft.reshape(-1, a.shape[-1]).clone(), self.expected_score(m).reshape(-1, a.shape[-1])
                for row, score in zip(rows, scores):
                    if target and self.target is not None:
                        zeros = self.mask_size(m) - self.target_size(m)
                    else:
                        zeros = round(self.mask_size(m) - float(score.sum()))
                    if zeros > 0:
                        row[torch.topk(row, zeros, largest=False).indices] = 0
                values[m] = rows.reshape(a.shape)
        return Zs(**values)

    def summary(self, step: int) -> dict:
        """Expected sparsities now and at the target, the multipliers: what a log line and a report hold."""
        with torch.no_grad():
            self.constrain()
            out = {"expected_sparsity": {m: float(self.expected_sparsity(m).mean()) for m in GATE_SETS},
                   "target_sparsity": {m: self.target_sparsity_at(step, m) for m in GATE_SETS} if self.target else {},
                   "expected_parameters": float(self.expected_parameters()),
                   "prunable_parameters": self.prunable_size,
                   "lambdas": {n: float(p) for n, p in self.lambdas.items()}}
        if self.target is not None:
            out["target_parameters"] = prunable_size(self.target, self.head_dim)
            out["expected_over_target"] = out["expected_parameters"] / out["target_parameters"]
        return out

    @classmethod
    def for_model(cls, model: nn.Module, options: Options, *, steps: int, seed: int = 0) -> "Gates":
        config = model.config
        warmup = int(round(options.lagrangian_warmup_fraction * steps))
        return cls(shape_of(config), head_dim_of(config), target_for(config, options.target_shape),
                   warmup_steps=warmup, start_sparsity=options.start_sparsity, seed=seed)


def random_gates(model: nn.Module, target: Shape, seed: int) -> Gates:
    """Gates whose log-alphas are uniform random numbers: their deterministic form at the target keeps a
    random choice of units (every unit equally likely) in every row."""
    config = model.config
    gates = Gates(shape_of(config), head_dim_of(config), target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.rand(a.shape, generator=generator))
    return gates


def prune(model: nn.Module, calib, options: Options, device: torch.device, *, state: Optional[Gates]) -> dict:
    """Fold the deterministic gates at the target size into the trained model, then remove the zeros.

    `state` is what the shearing run learned (its Gates); the run itself is the training engine's
    `sheared` kind, which calls this at its export. `random_units` (the control) needs no state: it
    removes a seeded random choice of units and scales nothing.
    """
    target = target_for(model.config, options.target_shape)
    if options.random_units is not None:
        state = random_gates(model, target, options.random_units)
        zs = state.deterministic(target=True)
        zs = Zs(*((z != 0).to(z.dtype) for z in zs.as_tuple()))
    else:
        if state is None:
            raise UsageError("method 'sheared' prunes what its training run learned: run it through lpc prune "
                             "--method sheared with the training settings (or lpc train --kind sheared)")
        if state.target != target or state.source != shape_of(model.config):
            raise UsageError("the gates were trained for another source or target shape than this model and "
                             "--target-shape")
        zs = state.deterministic(target=True)
        fold(model, zs, into_lm_head=options.fold_hidden_into_lm_head)
    report = remove_zeroed(model, zs)
    report["target"] = asdict(target)
    report["scores"] = {m: state.log_alpha[m].detach().tolist() for m in GATE_SETS}
    report["gates"] = state.summary(state.warmup_steps)
    return report
