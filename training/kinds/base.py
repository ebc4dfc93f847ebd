"""What a training kind is: its options and checks, and its hooks into the engine's loop.

A kind is one file of this package and one line of its registry (`training/kinds/__init__.py`).
`Kind` holds what the stage asks of it before anything is loaded; `Extension` is what it adds to a
run of the loop (training/engine.py), each hook a no-op unless the kind says otherwise:

    per micro-batch    sample(step, micro) -> loss(model, ids) -> objective(loss, step) -> backward
    per step           clip(...) -> after_clip() -> optimizer steps (+ its own optimizers) -> after_step(...)
    per log record     record(step)
    around evaluation  evaluating()
    checkpoints        state_dict() / load_state_dict() when `stateful`
    at the export      fold(model), when the kind changes the model before it is saved
    in train.json      report()
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from training.options import TrainOptions


@dataclass(frozen=True)
class Kind:
    name: str
    description: str                     # --kind's help
    needs_steps: bool = True             # --steps is required (LoRA: its recipe's epochs otherwise)
    takes_teacher: bool = False          # --teacher is required (and only this kind takes one)
    settings: Optional[str] = None       # what its --option KEY=VALUE settings are, if it takes any
    distributed: bool = True             # runs on the engine under torchrun (LoRA: one process, its own loop)
    dynamic_loading: bool = True         # --domains (dynamic batch loading) applies
    engines: Tuple[str, ...] = ("hf",)   # the engines that train it (MaxText: continued pre-training only)

    def check_options(self, options: "TrainOptions") -> None:
        """The kind's own rules on its options (and settings), beyond the common ones; raises ValueError
        or UsageError (one line)."""

    def check_inputs(self, options: "TrainOptions", config, model_path: str) -> None:
        """Checks on the checkpoints it will read, before the model is loaded; raises UsageError."""

    def extension(self, model, options: "TrainOptions", run) -> "Extension":
        """What it adds to the loop, built on the model before FSDP2 wraps it and before its weights are
        read: on a sharded run its parameters are still empty (meta), so a kind that needs the weights
        (sparse's zeros) or another model (kd's teacher) gets them in `Extension.sharded`."""
        return Extension()

    def train_alone(self, options: "TrainOptions", *, model_path: str, tokenizer, log: Callable[[str], None]):
        """A kind that is not `distributed` trains here, in this process, with its own loop: returns
        (the trained model, its report)."""
        raise NotImplementedError(f"kind {self.name} trains on the engine")


class Extension:
    """A kind's hooks into one run of the loop; every default leaves the loop as plain cross-entropy."""

    stateful = False
    optimizers: List = []

    def sharded(self, model, run, shard: Callable) -> None:
        """After FSDP2 has wrapped the model and its weights are loaded (`shard` wraps another model the
        same way; training/loading.py loads one into its shards)."""

    def sample(self, step: int, micro: int) -> None:
        """Before each micro-batch's forward."""

    def loss(self, model, ids):
        from training.losses import lm_loss

        return lm_loss(model(input_ids=ids, use_cache=False).logits, ids)

    def objective(self, loss, step: int):
        """What is minimised: the loss, plus any term of the kind's."""
        return loss

    def clip(self, model, max_norm: float):
        """Clip the gradients; returns their norm before clipping."""
        import torch

        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def after_clip(self) -> None:
        """Between clipping and the optimizer step."""

    def after_step(self, optimizer, step: int) -> None:
        """After the optimizers stepped (`step` counts from 1)."""

    def record(self, step: int) -> Dict[str, object]:
        """Fields added to the step's log record (`step` counts from 0)."""
        return {}

    def evaluating(self):
        """Around a held-out evaluation (dynamic batch loading)."""
        return contextlib.nullcontext()

    fold: Optional[Callable] = None

    def report(self) -> Dict[str, object]:
        return {}

