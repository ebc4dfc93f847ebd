"""Recovery after pruning: what a recipe's `recovery:` block asks for, run on the pruned model in place.

    report = training.recover(model, tokenizer, {"kind": "lora", ...}, device="cuda", seed=42)

`lora` (training/lora.py): LoRA fine-tuning with peft, merged back into the weights afterwards, so
the recovered model saves and evaluates like any other. Continued pre-training and distillation
(FSDP / MaxText) live beside it and are launched through jobman, not from a reproduction row.
"""
from __future__ import annotations

from methods.errors import UsageError

KINDS = ("lora",)


def recover(model, tokenizer, spec: dict, *, device: str = "cpu", seed: int = 0) -> dict:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "lora":
        from training import lora

        return lora.recover(model, tokenizer, spec, device=device, seed=seed)
    raise UsageError(f"unknown recovery kind {kind!r}; known: {', '.join(KINDS)}")
