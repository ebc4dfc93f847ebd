"""Sheared LLaMA's gates inside a model: the masked model that trains them, the fold that bakes them into
the weights, the removal of the zeroed units. The gates themselves (`Gates`: their hard-concrete
distribution, the Lagrangian) are here too, built from methods/sheared.py's declarations (options,
shapes, constants); where each acts is the architecture's declaration. `prune` is the method's: the
registry names this module as sheared's kernel, so that the options stay importable without torch.

Where the gates multiply a Hugging Face model (`Masking`, forward hooks): head gates scale each head's
attention output before o_proj; the layer gate and the hidden gates scale each block's output (the
o_proj and down_proj outputs, or, where the architecture closes a block with an output norm, that
norm's output: Gemma 2); MLP gates scale the up projection's output; every residual norm computes
its variance over the kept hidden channels only (gate != 0), normalises the whole vector and
multiplies its output by the hidden gates. `fold` multiplies the deterministic gates into the weights
the same way (head gates into v rows, layer and hidden gates into the block output's rows or norm,
MLP gates into up rows, hidden gates into every norm and the embedding columns; biases of scaled
rows with them, and a norm stored as an offset from 1 by the scale it applies) and `remove_zeroed`
cuts the zeroed units through methods/surgery.py.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods import surgery
from methods.anatomy import Part, anatomy_of, attention_shape, decoder_layers, final_norm, parts
from methods.architectures import submodule
from methods.core.errors import UsageError
from methods.sheared import (EPSILON, GATE_SETS, INIT_MEAN, INIT_STD, LIMIT_HIGH, LIMIT_LOW, LOG_ALPHA_RANGE,
                             SOFT_SHARPNESS, TEMPERATURE, Options, Shape, group_parameters, head_dim_of,
                             prunable_size, shape_of, target_for)


class Masking:
    """Forward hooks that multiply gate values into a Hugging Face model where the original does.

    `zs` None leaves the model as it is. The hooks read `zs` at call time, so one set of hooks serves
    every step (and FSDP's sharded layers, whose submodules keep their hooks).
    """

    def __init__(self, model: nn.Module, *, mask_embedding: bool = False):
        self.zs = None
        self.handles = []
        layers = decoder_layers(model)
        anatomy = anatomy_of(model)
        self.offset = anatomy.norm_offset
        if mask_embedding:
            self._hook(model.get_input_embeddings(), lambda _m, _a, out: self._hidden(out))
        for index, layer in enumerate(layers):
            found = parts(layer)
            for name in anatomy.input_norms:
                self._hook(submodule(layer, name), self._norm)
            self.handles.append(found["o"].linear.register_forward_pre_hook(
                lambda _m, args, i=index: self._heads(i, args)))
            if anatomy.output_norms:
                for name in anatomy.output_norms:
                    self._hook(submodule(layer, name), lambda m, a, out, i=index: self._norm(m, a, out, i))
            else:
                for part in ("o", "down"):
                    self._hook(found[part].linear, lambda _m, _a, out, i=index: self._block_output(i, out))
            up = found["up"]
            self._hook(up.linear, lambda _m, _a, out, i=index, up=up: self._channels(i, out, up))
        self._hook(final_norm(model), self._norm)
        heads, kv_heads, _ = attention_shape(layers[0])
        self.group_size = heads // kv_heads

    def _hook(self, module: nn.Module, fn) -> None:
        self.handles.append(module.register_forward_hook(fn))

    @contextlib.contextmanager
    def using(self, zs) -> Iterator[None]:
        before, self.zs = self.zs, zs
        try:
            yield
        finally:
            self.zs = before

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hidden(self, out: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.zs is None else out * self.zs.hidden.to(out.dtype)

    def _heads(self, index: int, args):
        if self.zs is None:
            return None
        x = args[0]
        z = self.zs.head[index].to(x.dtype)
        shape = x.shape
        # Query heads are laid out group by group (transformers' repeat_kv), so a group is a slice.
        x = x.reshape(*shape[:-1], z.shape[0], self.group_size, -1) * z[:, None, None]
        return (x.reshape(shape), *args[1:])

    def _block_output(self, index: int, out: torch.Tensor) -> Optional[torch.Tensor]:
        if self.zs is None:
            return None
        return out * self.zs.layer[index].to(out.dtype) * self.zs.hidden.to(out.dtype)

    def _channels(self, index: int, out: torch.Tensor, up: Part) -> Optional[torch.Tensor]:
        if self.zs is None:
            return None
        z = self.zs.intermediate[index].to(out.dtype)
        if up.whole:
            return out * z
        out = out.clone()  # the up rows of a fused gate_up projection
        out[..., up.rows] *= z
        return out

    def _norm(self, module: nn.Module, args, out: torch.Tensor, layer: Optional[int] = None) -> Optional[torch.Tensor]:
        """RMSNorm over the kept channels: their mean square normalises the whole vector. An output norm
        (`layer` given) is its block's output and also carries the layer gate."""
        if self.zs is None:
            return None
        x = args[0]
        hidden = self.zs.hidden
        kept = torch.nonzero(hidden != 0).reshape(-1)
        state = x.float()
        variance = state.index_select(-1, kept).pow(2).mean(-1, keepdim=True)
        if self.offset:  # Gemma: scale by offset + weight in float32, then cast
            normed = (state * torch.rsqrt(variance + module.eps) * (self.offset + module.weight.float())).type_as(x)
        else:
            normed = module.weight * (state * torch.rsqrt(variance + module.variance_epsilon)).to(x.dtype)
        normed = normed * hidden.to(normed.dtype)
        return normed if layer is None else normed * self.zs.layer[layer].to(normed.dtype)


def _scale_rows(part: Part, factor: torch.Tensor) -> None:
    weight = part.weight
    weight.mul_(factor.to(weight.dtype)[:, None])
    if part.bias is not None:
        part.bias.mul_(factor.to(weight.dtype))


def _scale_norm(norm: nn.Module, factor: torch.Tensor, offset: float) -> None:
    weight = norm.weight
    if offset:
        weight.copy_((weight + offset) * factor.to(weight.dtype) - offset)
    else:
        weight.mul_(factor.to(weight.dtype))


def fold(model: nn.Module, zs, *, into_lm_head: bool = True) -> None:
    """Multiply the gate values into the weights, so that the model computes what the masked one did."""
    anatomy = anatomy_of(model)
    hidden = zs.hidden
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(model)):
            found = parts(layer)
            v = found["v"]
            _scale_rows(v, zs.head[index].repeat_interleave(v.size // zs.head.shape[1]))
            block = zs.layer[index] * hidden
            if anatomy.output_norms:
                for name in anatomy.output_norms:
                    _scale_norm(submodule(layer, name), block, anatomy.norm_offset)
            else:
                for part in ("o", "down"):
                    _scale_rows(found[part], block)
            _scale_rows(found["up"], zs.intermediate[index])
            for name in anatomy.input_norms:
                _scale_norm(submodule(layer, name), hidden, anatomy.norm_offset)
        _scale_norm(final_norm(model), hidden, anatomy.norm_offset)
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embed.weight
        if tied and not into_lm_head:
            model.config.tie_word_embeddings = False
            head.weight = nn.Parameter(head.weight.detach().clone())
            tied = False
        embed.weight.mul_(hidden.to(embed.weight.dtype)[None, :])
        if head is not None and into_lm_head and not tied:
            head.weight.mul_(hidden.to(head.weight.dtype)[None, :])


def remove_zeroed(model: nn.Module, zs) -> dict:
    """Remove every unit whose gate is 0 (surgery); the report indexes the dense model."""
    layers = decoder_layers(model)
    group = surgery.kv_group_of(layers[0])
    size = len(group) // zs.head.shape[1]
    report_layers: List[Dict[str, List[int]]] = []
    removed = [i for i in range(len(layers)) if float(zs.layer[i]) == 0]
    for index, layer in enumerate(layers):
        if index in removed:
            report_layers.append({"heads_kept": [], "kv_heads_kept": [], "mlp_channels_kept": []})
            continue
        kv = torch.nonzero(zs.head[index] != 0).reshape(-1).tolist()
        heads = [g * size + j for g in kv for j in range(size)]
        entry = surgery.keep_heads(layer, heads, kv)
        entry["mlp_channels_kept"] = surgery.keep_mlp_channels(
            layer, torch.nonzero(zs.intermediate[index] != 0).reshape(-1).tolist())
        report_layers.append(entry)
    hidden_kept = surgery.keep_hidden_channels(model, torch.nonzero(zs.hidden != 0).reshape(-1).tolist())
    if removed:
        surgery.remove_layers(model, removed)
    return {"layers": report_layers, "hidden_kept": hidden_kept, "layers_removed": removed}


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
