"""The batch rules of the kit, each written once: a batch size as a user gives it, how many items fit
in memory (every "auto" batch), how a global batch splits over processes and micro-batches, and the
device layers are computed on."""
from __future__ import annotations

import os
from typing import Optional, Union

from methods.core.errors import UsageError


def parse_batch_size(what: str, value: Union[int, str]) -> Union[int, str]:
    """A batch size as a user gives it (an int, its text, or "auto"); anything else is one UsageError line."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise UsageError(f"{what} must be a positive integer or 'auto', got {value!r}")
    return number


def batch_that_fits(per_item_bytes: int, count: int, device, fraction: float = 0.25) -> int:
    """How many items of `per_item_bytes` working memory fit in `fraction` of what `device` has free
    (at least 1, at most `count`): the rule behind every "auto" batch size of the kit."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # no sysconf: assume a modest machine
            free = 2**30
    return max(1, min(count, int(fraction * free) // max(1, per_item_bytes)))


def accumulation_steps(global_batch: int, micro_batch: int, world: int = 1) -> int:
    """Micro-batches per process in one optimizer step; a global batch that does not split evenly over
    `world` processes of `micro_batch` sequences is one UsageError line."""
    if global_batch % (micro_batch * world):
        processes = f" x {world} process{'es' if world > 1 else ''}" if world != 1 else ""
        raise UsageError(f"global batch {global_batch} is not divisible by micro batch {micro_batch}{processes}")
    return global_batch // (micro_batch * world)


def compute_device(preferred: Optional[str] = None):
    """The device layers are moved to while they are processed: the one asked for, else CUDA if present."""
    import torch

    if preferred:
        try:
            device = torch.device(preferred)
        except RuntimeError as exc:
            raise UsageError(f"unknown device {preferred!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {preferred!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
