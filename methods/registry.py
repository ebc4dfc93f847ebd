"""The one list of methods the kit implements, and the image that reproduces each.

Imports nothing but the standard library, so that build tooling reads it without a venv:

    python3 methods/registry.py methods        # the method names, space-separated (the Makefile's METHODS)
    python3 methods/registry.py images         # <method>:<image> pairs (docker/images.mk's IMAGE_OF_<m>)
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional


@dataclass(frozen=True)
class Method:
    name: str
    module: str                  # methods.<module> holds `Options` and `prune(model, calib, options, device)`
    needs_calibration: bool
    family: str                  # which pinned image reproduces it (docker/<family>/)
    structured: bool = True      # removes units (then the config is re-synced) rather than zeroing weights
    needs_tokenizer: bool = False  # scores with lm-eval tasks, so prune() gets the tokenizer too
    # The training kind (training/kinds/) whose run is its pruning: prune() gets what the run learned
    # as `state` and folds it; `lpc prune` runs the training first.
    training_kind: Optional[str] = None
    # Its calibration statistics are sums over samples, so the engine may feed samples in chunks
    # (`--calib-batch`); the default batch 1 is what reproduces the original bit for bit.
    batched_calibration: bool = False
    # The module holding `prune`, where it is not `module`: one whose kernel needs torch at import (an
    # nn.Module of its own) keeps its options in a module that does not, for `lpc prune --help`.
    kernel: Optional[str] = None

    @property
    def trains(self) -> bool:
        """Some of its options prune by a training run (`prunes_by_training` says which)."""
        return self.training_kind is not None

    def prunes_by_training(self, options: Any) -> bool:
        """Whether pruning with these (validated) options is a training run: Sheared LLaMA's is, except
        its random-units control, whose options say `trains = False`."""
        return self.trains and getattr(options, "trains", True)

    @property
    def options_type(self) -> type:
        return importlib.import_module(f"methods.{self.module}").Options

    @property
    def run(self) -> Callable[..., dict]:
        return importlib.import_module(f"methods.{self.kernel or self.module}").prune


REGISTRY: Dict[str, Method] = {m.name: m for m in (
    Method("magnitude", "magnitude", needs_calibration=False, family="sparse", structured=False),
    Method("wanda", "wanda", needs_calibration=True, family="sparse", structured=False,
           batched_calibration=True),
    Method("sparsegpt", "sparsegpt", needs_calibration=True, family="sparse", structured=False,
           batched_calibration=True),
    Method("wanda-sp", "wanda_sp", needs_calibration=True, family="width", batched_calibration=True),
    Method("flap", "flap", needs_calibration=True, family="width"),
    Method("llm-pruner", "llm_pruner", needs_calibration=True, family="width"),
    Method("minitron-width", "minitron_width", needs_calibration=True, family="minitron"),
    Method("minitron-depth", "minitron_depth", needs_calibration=True, family="minitron", needs_tokenizer=True),
    Method("shortgpt", "shortgpt", needs_calibration=True, family="minitron"),
    Method("shortened", "shortened", needs_calibration=True, family="shortened"),
    Method("sheared", "sheared", needs_calibration=False, family="train", training_kind="sheared",
           kernel="sheared_model"),
)}


def main(argv) -> int:
    listings = {
        "methods": lambda: " ".join(REGISTRY),
        "images": lambda: " ".join(f"{m.name}:{m.family}" for m in REGISTRY.values()),
    }
    if len(argv) != 1 or argv[0] not in listings:
        print(f"usage: registry.py {{{','.join(listings)}}}", file=sys.stderr)
        return 2
    print(listings[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
