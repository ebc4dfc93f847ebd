"""Sheared LLaMA's gates inside a model: the masked model that trains them, the fold that bakes them into
the weights, the removal of the zeroed units. The gates themselves, their distribution and the
Lagrangian are methods/sheared.py's; where each acts is the architecture's declaration.

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
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from methods import surgery
from methods.anatomy import Part, anatomy_of, attention_shape, decoder_layers, final_norm, parts
from methods.architectures import submodule


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
