"""What the depth methods (ShortGPT, Minitron-depth, Shortened LLaMA) and Minitron-width share.

* Whole-model passes over the calibration rows, one row per forward (batch 1), as the originals score.
* Hooks that see each decoder layer's input and output hidden states under every transformers
  version: before 4.48 a layer gets ``hidden_states`` positionally and returns a tuple, later
  versions may pass it by keyword and return the tensor itself. Indexing ``[0]`` on a bare tensor
  would silently take the first batch element, so the hooks look at the type.
* ``layers_skipped``: the model with some decoder layers left out, temporarily and without copying
  a weight, the way Minitron's block scan and Shortened LLaMA's PPL criterion score a candidate.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from methods import surgery
from methods.anatomy import decoder_layers

LayerIO = Callable[[int, torch.Tensor, torch.Tensor], None]


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tuple before transformers 4.48)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def watch_layers(model: nn.Module, on_layer: LayerIO) -> Iterator[None]:
    """Call on_layer(index, input, output) after every decoder layer's forward while inside."""
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        def hook(_module, args, kwargs, output, index=index):
            on_layer(index, layer_input(args, kwargs), layer_output(output))

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The whole model on `device` while inside, back where it was afterwards.

    These methods score with full forward passes (the originals run the model whole), so the model
    visits the compute device as one piece rather than layer by layer.
    """
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def run_rows(model: nn.Module, calib: torch.Tensor) -> None:
    """One forward of the decoder stack per calibration row (batch 1), for hooks to watch.

    The base model is enough: no method here looks at logits while gathering statistics, and
    Llama-3's 128k-entry lm_head would be the largest tensor of the pass.
    """
    device = input_device(model)
    with torch.no_grad():
        for row in calib:
            model.model(input_ids=row.reshape(1, -1).to(device), use_cache=False)


@contextlib.contextmanager
def layers_skipped(model: nn.Module, skip: Sequence[int]) -> Iterator[None]:
    """The model without the decoder layers `skip` while inside; nothing is copied or freed.

    The stack is cut as surgery.remove_layers cuts it (renumbered, config following), so a KV cache
    built during scoring (lm-eval may build one) sees a contiguous stack; everything is put back on
    exit.
    """
    layers = decoder_layers(model)
    drop = set(int(i) for i in skip)
    config = model.config
    saved_config = {name: getattr(config, name) for name in ("num_hidden_layers",) + surgery.PER_LAYER_CONFIG
                    if hasattr(config, name)}
    saved_idx = [(module, module.layer_idx) for module in model.modules() if hasattr(module, "layer_idx")]
    try:
        surgery.keep_layers(model, [i for i in range(len(layers)) if i not in drop])
        yield
    finally:
        model.model.layers = layers
        for module, index in saved_idx:
            module.layer_idx = index
        for name, value in saved_config.items():
            setattr(config, name, value)
        for name in surgery.PER_LAYER_CONFIG:
            if name not in saved_config and hasattr(config, name):  # the cut filled it in (layer_types)
                delattr(config, name)


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cosine over the hidden dimension, no epsilon: a zero vector gives NaN (callers
    decide what NaN means, as the originals do)."""
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
