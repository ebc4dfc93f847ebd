"""Gradient passes for the methods that rank by Taylor salience (LLM-Pruner, Shortened LLaMA).

``on_device`` gives the body the model's parameters on the compute device in the gradient dtype,
with ``requires_grad`` only on the weights being scored; ``backward`` runs one pass of the
causal-LM loss. On exit the model holds exactly the tensors it had before: the copies made for the
pass are dropped instead of being cast back, so a float16 pass over a float32 model cannot round its
weights. Buffers (rotary tables) visit the device in their own dtype: a round trip through a
lower precision would change them.

The gradient dtype is a method option, ``grad_dtype``: ``model`` keeps each parameter's dtype,
the others cast every floating-point parameter.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Optional, get_args

from methods.core.errors import UsageError

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch
    from torch import nn

# The one declaration of the option's values; both methods' Options use this type.
GradDtype = Literal["model", "float32", "float16", "bfloat16"]
# The dtype names (torch's) of each choice; "model" keeps the model's own.
GRAD_DTYPES = dict(zip(get_args(GradDtype), (None, "float32", "float16", "bfloat16")))


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device, grad_dtype: str,
              trainable: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """While inside: parameters on `device` in `grad_dtype`, gradients enabled for `trainable` only.

    Afterwards every parameter holds its own tensor again, with its requires_grad flag and no
    gradient.
    """
    import torch

    dtype: Optional[torch.dtype] = getattr(torch, GRAD_DTYPES[grad_dtype]) if GRAD_DTYPES[grad_dtype] else None
    trainable_ids = {id(p) for p in trainable}
    saved = []
    for param in model.parameters():
        saved.append((param, param.data, param.requires_grad))
        param.data = param.data.to(device=device, dtype=dtype if param.is_floating_point() else None)
        param.requires_grad_(id(param) in trainable_ids)
        param.grad = None
    buffers = [(module, name, buf) for module in model.modules() for name, buf in module.named_buffers(recurse=False)
               if buf is not None]
    for module, name, buf in buffers:
        module._buffers[name] = buf.to(device)
    try:
        yield
    finally:
        for param, data, requires_grad in saved:
            param.data = data
            param.grad = None
            param.requires_grad_(requires_grad)
        for module, name, buf in buffers:
            module._buffers[name] = buf
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def backward(model: nn.Module, tokens: torch.Tensor) -> None:
    """Accumulate dL/dW of the mean causal-LM loss over `tokens` (labels = inputs) into `.grad`."""
    import torch

    ids = tokens.to(device=model.get_input_embeddings().weight.device, dtype=torch.long)
    with torch.enable_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if not torch.isfinite(loss):
            raise UsageError(f"the calibration loss is {loss.item()}: no usable gradients for Taylor importance "
                             "(try grad_dtype float32)")
        loss.backward()
