"""Layer-by-layer calibration: the one engine every calibrated method runs on.

The model is never run whole. The calibration tokens go through the embedding once; a hook on the
first decoder layer records the hidden states *and every positional and keyword argument* the model
passes to that layer (attention mask, position ids, rotary embeddings, cache position, ... — whatever
this transformers version computes), then stops the forward. From there each decoder layer in turn
is moved to the compute device, fed the recorded inputs one sample at a time with the recorded
arguments, handed to the method (which hooks, scores and prunes it), run again to produce the next
layer's inputs, and moved back. Replaying the recorded arguments instead of rebuilding them is what
keeps the engine working from transformers 4.43 to 5.x and for grouped-query attention; moving one
layer at a time is what lets a model larger than the GPU be pruned.

All samples share one set of arguments, as in the originals: they have equal length and no padding,
so masks, positions and rotary tables are the same for every sample, and the batch-1 arguments
recorded from the first sample broadcast over a chunk of several. The mask is the one the model built
for the layer: a sliding-window model (Mistral) replays its sliding mask, and where layers differ in
attention type (`config.layer_types`: Gemma 2 alternates sliding and global layers) the arguments are
recorded once per type, each from the first layer of that type, and every layer replays its own.

Batch size. By default every sample goes through a layer alone, as the original implementations feed
them: that order of float operations is what reproduces their masks bit for bit (tests/test_golden_*).
`calibration_batch(n)` (the CLI's `--calib-batch N|auto`) lets the engine push chunks of `n` samples
through each layer in one call instead, or as many as fit a memory budget ("auto"): the same
arithmetic in a different rounding order, so masks agree with the default path within the golden
bands rather than exactly. Only statistics that are sums over samples may be gathered in chunks (the
registry's `batched_calibration`); FLAP's running fluctuation is not one.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from methods.anatomy import anatomy_of, decoder_layers, linear_layers
from methods.architectures import submodule
from methods.core.batching import batch_that_fits, parse_batch_size


class _Captured(Exception):
    """Raised by a hook to stop a forward once the inputs it needed have been recorded."""


@dataclass
class Batching:
    """How many samples go through a layer per call: asked (an int or "auto") and used (an int)."""

    requested: Union[int, str] = 1
    used: Optional[int] = None


_BATCHING: contextvars.ContextVar[Optional[Batching]] = contextvars.ContextVar("calibration_batching", default=None)


def parse_batch(value: Union[int, str]) -> Union[int, str]:
    """`--calib-batch` as given: a positive integer or "auto"; anything else is one UsageError line."""
    return parse_batch_size("calibration batch", value)


@contextlib.contextmanager
def calibration_batch(value: Union[int, str]) -> Iterator[Batching]:
    """Within this block the engine feeds `value` samples per layer call; the yielded record says
    how many it used once a method has run."""
    batching = Batching(parse_batch(value))
    token = _BATCHING.set(batching)
    try:
        yield batching
    finally:
        _BATCHING.reset(token)


class LayerInputs:
    """Hidden states entering the current decoder layer, one row per calibration sample."""

    def __init__(self, hidden: torch.Tensor, args: Tuple[Any, ...], kwargs: Dict[str, Any], batch: int = 1,
                 by_layer: Optional[List[Dict[str, Any]]] = None):
        self.hidden = hidden          # [nsamples, seqlen, hidden_size], model dtype, compute device
        self.args = args              # positional arguments after hidden_states (usually none)
        self.kwargs = kwargs          # keyword arguments the model passes to the current decoder layer
        self.batch = batch            # samples per layer call
        self.by_layer = by_layer      # each layer's keyword arguments, where layers differ

    def at(self, index: int) -> None:
        """Make the arguments those of decoder layer `index`."""
        if self.by_layer is not None:
            self.kwargs = self.by_layer[index]

    def chunks(self) -> Iterator[slice]:
        for first in range(0, self.hidden.shape[0], self.batch):
            yield slice(first, first + self.batch)

    def advance(self, layer: nn.Module) -> None:
        """Feed every sample through `layer` (`batch` at a time) and keep the outputs: they are the
        next layer's inputs."""
        for rows in self.chunks():
            out = layer(self.hidden[rows], *self.args, **self.kwargs)
            # transformers < 4.48 returns a tuple, newer versions the tensor itself.
            out = out[0] if isinstance(out, (tuple, list)) else out
            self.hidden[rows] = out.reshape(self.hidden[rows].shape)


def capture_layer_inputs(model: nn.Module, calib: torch.Tensor, device: torch.device) -> LayerInputs:
    """Run `calib` [nsamples, seqlen] up to the first decoder layer and record what it receives."""
    layers = decoder_layers(model)
    base = model.model
    # Everything of the base model that is not a decoder layer (embedding, rotary table, final norm)
    # is small; it visits the compute device for the capture.
    roots = [m for name, m in base.named_children() if m is not layers]
    homes = [_device_of(m) for m in roots]
    for module in roots:
        module.to(device)
    dtype = next(model.parameters()).dtype
    hidden: Optional[torch.Tensor] = None
    recorded: Dict[str, Any] = {}

    def hook(_module, args, kwargs):
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        hidden[sample_index] = hidden_states[0].to(hidden.dtype)
        if not recorded:
            recorded["args"] = tuple(args[1:])
            recorded["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    by_type: Dict[str, Dict[str, Any]] = {}
    types = list(getattr(model.config, "layer_types", None) or [])
    try:
        hidden = torch.zeros((calib.shape[0], calib.shape[1], model.config.hidden_size),
                             dtype=dtype, device=device)
        for sample_index in range(calib.shape[0]):
            with contextlib.suppress(_Captured), torch.no_grad():
                model(calib[sample_index:sample_index + 1].to(device), use_cache=False)
        handle.remove()  # the captures below must not write into `hidden`
        if len(set(types)) > 1:
            by_type[types[0]] = recorded["kwargs"]
            for kind in dict.fromkeys(types):
                if kind not in by_type:
                    by_type[kind] = _first_layer_kwargs(model, calib[:1].to(device), types.index(kind))
    finally:
        handle.remove()
        model.config.use_cache = use_cache
        for module, home in zip(roots, homes):
            module.to(home)
    for kwargs in [recorded["kwargs"], *by_type.values()]:
        kwargs["use_cache"] = False
        for key in ("past_key_value", "past_key_values", "cache"):
            if key in kwargs:
                kwargs[key] = None
    by_layer = [by_type[kind] for kind in types] if by_type else None
    return LayerInputs(hidden, recorded["args"], recorded["kwargs"], by_layer=by_layer)


def _first_layer_kwargs(model: nn.Module, row: torch.Tensor, index: int) -> Dict[str, Any]:
    """The keyword arguments the model passes to decoder layer `index`, recorded with the layers before
    it left out, so that it is the first one the forward reaches."""
    from methods.depth import layers_skipped

    recorded: Dict[str, Any] = {}

    def hook(_module, _args, kwargs):
        recorded.update((k, v) for k, v in kwargs.items() if k != "hidden_states")
        raise _Captured

    layer = decoder_layers(model)[index]
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with layers_skipped(model, range(index)), contextlib.suppress(_Captured), torch.no_grad():
            model(row, use_cache=False)
    finally:
        handle.remove()
    return recorded


LayerHandler = Callable[[int, nn.Module, LayerInputs], None]


def sequential_layers(model: nn.Module, calib: torch.Tensor, device: torch.device,
                      handle_layer: LayerHandler) -> None:
    """Process decoder layers in order, each seeing inputs produced by the already-processed layers.

    `handle_layer(index, layer, inputs)` runs with the layer on `device`; it may call
    `gather_inputs(layer, inputs, ...)` to gather statistics from the still-dense layer, then
    prune. Afterwards the engine runs the (pruned) layer to make the next inputs.
    """
    with torch.no_grad():
        inputs = capture_layer_inputs(model, calib, device)
    batching = _BATCHING.get() or Batching()
    inputs.batch = batching.used = resolve_batch(batching.requested, model, calib, device)
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        home = _device_of(layer)
        layer.to(device)
        inputs.at(index)
        handle_layer(index, layer, inputs)
        if index + 1 < len(layers):  # the last layer's outputs would feed nothing
            with torch.no_grad():
                inputs.advance(layer)
        layer.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def gather_inputs(layer: nn.Module, inputs: LayerInputs, collect: Dict[str, Callable[[torch.Tensor], None]]) -> None:
    """Feed every sample through the still-dense `layer`, calling collect[name](x) with the input x of
    each named Linear.

    Only inputs are wanted, so each sample's forward stops as soon as the last Linear the block runs
    (the MLP's down projection) has shown its input: its matmul and what follows would be thrown away.
    """
    modules = linear_layers(layer)
    last = submodule(layer, anatomy_of(layer).projections["down"])
    def observer(fn):
        def hook(_module, args):
            fn(args[0].detach())  # a pre-hook's return value would replace the Linear's arguments
        return hook

    handles = [modules[name].register_forward_pre_hook(observer(fn)) for name, fn in collect.items()]
    # Registered after the collectors, so it fires after them.
    handles.append(last.register_forward_pre_hook(_stop))
    try:
        with torch.no_grad():
            for rows in inputs.chunks():
                with contextlib.suppress(_Captured):
                    layer(inputs.hidden[rows], *inputs.args, **inputs.kwargs)
    finally:
        for handle in handles:
            handle.remove()


class SharedInputStatistics:
    """One statistic per distinct input of a block's Linears, gathered once.

    Llama feeds q/k/v the very same normed hidden states, and gate/up too; a statistic of the input
    (Wanda's norms, SparseGPT's Hessian) is then the same numbers for each, so it is computed once and
    shared: `owner[name]` names the Linear whose statistic `name` uses. Sharing is found, not assumed:
    two Linears share when their hooks receive the same tensor memory in the same forward (the
    tensors seen are held until the block is done, so their memory cannot be reused meanwhile).
    """

    def __init__(self, linears: Dict[str, nn.Module], make: Callable[[nn.Module], Any]):
        self._linears = linears
        self._make = make
        self.owner: Dict[str, str] = {}
        self.stats: Dict[str, Any] = {}
        self._seen: Dict[Tuple[int, Tuple[int, ...], Tuple[int, ...]], Tuple[torch.Tensor, str]] = {}

    def collectors(self) -> Dict[str, Callable[[torch.Tensor], None]]:
        return {name: functools.partial(self._add, name) for name in self._linears}

    def __getitem__(self, name: str) -> Any:
        return self.stats[self.owner[name]]

    def _add(self, name: str, x: torch.Tensor) -> None:
        if name not in self.owner:  # the first chunk decides who shares with whom
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in self._seen:
                self.owner[name] = self._seen[key][1]
                return
            self._seen[key] = (x, name)
            self.owner[name] = name
            self.stats[name] = self._make(self._linears[name])
        if self.owner[name] == name:
            self.stats[name].add(x)


def resolve_batch(requested: Union[int, str], model: nn.Module, calib: torch.Tensor, device: torch.device) -> int:
    """The samples per layer call: `requested` capped at the sample count, or for "auto" as many as
    keep one chunk's activations inside a decoder layer under a quarter of the free memory."""
    nsamples, seqlen = calib.shape
    if requested != "auto":
        return min(int(requested), nsamples)
    config = model.config
    # Per sample, the largest live set inside a Llama block: the residual and normed hidden states,
    # q/k/v/o, the three MLP activations and one attention score matrix per head (eager attention).
    elements = seqlen * (6 * config.hidden_size + 3 * config.intermediate_size + config.num_attention_heads * seqlen)
    return batch_that_fits(elements * next(model.parameters()).element_size(), nsamples, device)


def _stop(_module, _args):
    raise _Captured


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
