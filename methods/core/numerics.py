"""The precision statistics and scores are accumulated in: at least float32, float64 for a float64 model.

The originals accumulate their statistics (input norms, Hessians, fluctuations, importances) in float32
whatever the model's dtype (`.float()`). A model computed in float64 (`lpc prune --compute-dtype
float64`, the smoke profile's `compute_dtype`: results that do not depend on a machine's rounding) keeps
float64 throughout instead of being rounded back to float32 at every statistic. For float32, float16 and
bfloat16 models these are exactly `.float()` and float32 buffers, so the originals' rounding is kept.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only; the functions import what they compute with
    import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    import torch

    return torch.promote_types(dtype, torch.float32)


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.float()`, except that float64 stays float64."""
    return tensor.to(accumulation_dtype(tensor.dtype))


def running_zeros(current: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A statistic's zero-initialised buffer, widened to float64 the first time a float64 input arrives."""
    import torch

    wanted = accumulation_dtype(like.dtype)
    return current if current.dtype == wanted or wanted != torch.float64 else current.to(wanted)
