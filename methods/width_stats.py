"""What Wanda-sp and FLAP share: units, the uniform selection rule, applying a selection, diagnostics.

Both methods score the *input columns* of o_proj and down_proj. An MLP channel is one down_proj
column (plus the matching gate/up rows). An attention unit is one key/value group: its key and value
head plus the query heads that read it (for multi-head attention, one head). Its o_proj columns are
contiguous, because query head h reads key/value head h // (heads / kv_heads) (methods/surgery.py).

The originals only know multi-head attention; removing whole groups is the smallest change that
keeps grouped-query attention valid (every kept group keeps all of its query heads).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

from methods import surgery
from methods.anatomy import anatomy_of, attention_shape
from methods.architectures import submodule
from methods.core.errors import UsageError


def group_layout(layer: nn.Module) -> Tuple[int, int, int]:
    """(key/value groups, query heads per group, head_dim) of one decoder layer."""
    heads, kv_heads, head_dim = attention_shape(layer)
    surgery.kv_group_of(layer)  # refuses a grouping that does not split evenly
    return kv_heads, heads // kv_heads, head_dim


def scored_linears(layer: nn.Module) -> Dict[str, nn.Linear]:
    """The two Linears whose input columns both methods score, o and down, by their path in the layer."""
    paths = [anatomy_of(layer).projections[part] for part in ("o", "down")]
    return {path: submodule(layer, path) for path in paths}


def per_group(channel_values: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """o_proj input-channel values [heads * head_dim] -> [groups, channels of one group]."""
    groups, size, head_dim = group_layout(layer)
    return channel_values.reshape(groups, size * head_dim)


def uniform_keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The originals' per-layer rule: threshold = the int(ratio * n)-th smallest score, keep score >= it.

    Ties at the threshold are all kept, so fewer than int(ratio * n) units may go; that is the
    original's behaviour and is reproduced, not corrected.
    """
    remove = int(ratio * scores.numel())
    threshold = torch.sort(scores)[0][remove]
    return scores >= threshold


def apply_selection(layer: nn.Module, keep_groups: torch.Tensor, keep_channels: torch.Tensor) -> Dict[str, List[int]]:
    """Remove the unselected key/value groups and MLP channels of one (still dense) layer.

    Returns the layer's report entry in dense indices. A layer may not lose every group or every
    channel: the caller names the layer in that error before anything is cut.
    """
    _, size, _ = group_layout(layer)
    kv_kept = [int(g) for g in torch.nonzero(keep_groups).flatten()]
    heads_kept = [g * size + i for g in kv_kept for i in range(size)]
    channels = [int(c) for c in torch.nonzero(keep_channels).flatten()]
    if len(kv_kept) < keep_groups.numel():
        surgery.keep_heads(layer, heads_kept, kv_kept)
    if len(channels) < keep_channels.numel():
        surgery.keep_mlp_channels(layer, channels)
    return {"heads_kept": heads_kept, "kv_heads_kept": kv_kept, "mlp_channels_kept": channels}


def check_not_emptied(method: str, keep_groups: List[torch.Tensor], keep_channels: List[torch.Tensor]) -> None:
    """Refuse a selection that empties a layer's attention or MLP, naming the first such layer."""
    for index, (groups, channels) in enumerate(zip(keep_groups, keep_channels)):
        if not bool(groups.any()):
            raise UsageError(f"{method} would remove every attention head of layer {index}; "
                             "use a lower --pruning-ratio or --structure UL-UM")
        if not bool(channels.any()):
            raise UsageError(f"{method} would remove every MLP channel of layer {index}; "
                             "use a lower --pruning-ratio or --structure UL-UM")


def floats(values: torch.Tensor) -> List[float]:
    """JSON-able scores: 9 significant digits round-trip float32 exactly and keep prune.json small."""
    return [float(f"{v:.9g}") for v in values.detach().float().cpu().flatten().tolist()]


# ----------------------------------------------------------------------------- diagnostics

_RECORDERS: List[Dict[Tuple[int, str, str], torch.Tensor]] = []


@contextlib.contextmanager
def recording() -> Iterator[Dict[Tuple[int, str, str], torch.Tensor]]:
    """Collect the calibration statistics a width method computes, keyed (layer, module, statistic).

    The golden tests compare them with the originals' recorded statistics; statistics are too large
    for the report, and nothing is kept when nobody records.
    """
    record: Dict[Tuple[int, str, str], torch.Tensor] = {}
    _RECORDERS.append(record)
    try:
        yield record
    finally:
        _RECORDERS.remove(record)


def publish(layer: int, module: str, statistic: str, value: torch.Tensor) -> None:
    for record in _RECORDERS:
        record[(layer, module, statistic)] = value.detach().float().cpu().clone()
