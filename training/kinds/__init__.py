"""The training kinds, one file each, registered here as the methods are in methods/registry.py.

    cpt      next-token cross-entropy (continued pre-training)
    kd       distillation from a teacher
    sparse   cross-entropy keeping a pruned model's zeros at zero
    lora     LoRA recovery, merged back (its own loop, one process)
    sheared  Sheared LLaMA's pruning run (gates and a Lagrangian, then folded and removed)

A kind is compared by name only here: everything else asks its `Kind` (training/kinds/base.py).
Adding a kind: one file holding a `KIND`, and one entry below.
"""
from __future__ import annotations

from typing import Dict

from methods.core.errors import UsageError
from training.kinds import cpt, kd, lora, sheared, sparse
from training.kinds.base import Extension, Kind

KINDS: Dict[str, Kind] = {k.name: k for k in (cpt.KIND, kd.KIND, sparse.KIND, lora.KIND, sheared.KIND)}

__all__ = ["KINDS", "Extension", "Kind", "get"]


def get(name: str) -> Kind:
    if name not in KINDS:
        raise UsageError(f"unknown training kind {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]
