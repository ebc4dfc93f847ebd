"""lora: LoRA recovery (LLM-Pruner's post_training.py, which Shortened LLaMA repeats), in one process with
its own loop (training/lora.py), the adapters merged back into the model. Its settings are the LoRA
recipe's fields; `lpc train`'s own flags set the ones they name (LORA_FLAGS)."""
from __future__ import annotations

from typing import Annotated, Dict, Literal, Optional, Tuple

from pydantic import Field, ValidationError, model_validator

from methods.core.batching import accumulation_steps
from methods.core.errors import UsageError
from methods.options import declared, method_options, one_line
from training.kinds.base import Kind

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
# `lpc train` flags that set LoRA recipe fields (the flag -> the recipe field).
LORA_FLAGS = {"data": "data", "lr": "lr", "global_batch": "batch_size", "micro_batch": "micro_batch_size",
              "seqlen": "cutoff_len", "steps": "max_steps"}


@method_options
class LoraRecipe:
    """A LoRA train spec's fields (`lpc train --kind lora`); defaults are the paper's command line."""

    data: Annotated[str, Field(min_length=1, description="'alpaca-cleaned', 'smoke' or a JSONL file")] = \
        "alpaca-cleaned"
    r: Annotated[int, Field(ge=1, description="LoRA rank")] = 8
    alpha: Annotated[int, Field(ge=1, description="LoRA alpha (the update is scaled by alpha / r)")] = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    targets: Annotated[Tuple[Annotated[str, Field(min_length=1)], ...],
                       Field(min_length=1, description="Linear module names that get adapters")] = TARGETS
    cutoff_len: Annotated[int, Field(ge=1)] = 256
    micro_batch_size: Annotated[int, Field(ge=1)] = 4
    batch_size: Annotated[int, Field(ge=1)] = 64
    epochs: Annotated[int, Field(ge=1)] = 2
    lr: Annotated[float, Field(gt=0)] = 1e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    val_set_size: Annotated[int, Field(ge=0)] = 2000
    split_seed: Annotated[int, Field(ge=0)] = 42
    eval_steps: Annotated[int, Field(ge=1)] = 100
    select_best: bool = False
    max_steps: Optional[Annotated[int, Field(ge=1)]] = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    train_on_inputs: bool = False
    add_eos_token: bool = False
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    pad_token_id: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _whole_steps(self) -> "LoraRecipe":
        accumulation_steps(self.batch_size, self.micro_batch_size)
        return self

    @classmethod
    def from_spec(cls, spec: dict) -> "LoraRecipe":
        """The recipe from a mapping (YAML or --option values), or one UsageError line."""
        fields = declared(cls)
        unknown = sorted(set(spec) - set(fields))
        if unknown:
            raise UsageError(f"lora recovery takes no option {', '.join(unknown)}; known: {', '.join(fields)}")
        values = dict(spec)
        targets = values.get("targets")
        if isinstance(targets, str):
            values["targets"] = tuple(t for t in targets.split(",") if t)
        elif isinstance(targets, list):
            values["targets"] = tuple(targets)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise UsageError(f"lora: {one_line(exc, fields)}") from None

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size



def lora_spec(options) -> Dict[str, object]:
    """The LoRA recipe fields of `lpc train --kind lora`: the flags, then --option for the others."""
    taken = sorted(set(options.recipe) & set(LORA_FLAGS.values()))
    if taken:
        flags = ", ".join("--" + k.replace("_", "-") for k, v in LORA_FLAGS.items() if v in taken)
        raise UsageError(f"lora: set {', '.join(taken)} with {flags}, not as a LoRA option")
    spec = {**options.recipe}
    for flag, name in LORA_FLAGS.items():
        if getattr(options, flag) is not None:
            spec[name] = getattr(options, flag)
    return spec


class Lora(Kind):
    def check_options(self, options) -> None:
        LoraRecipe.from_spec(lora_spec(options))  # every field checked before a model is loaded

    def train_alone(self, options, *, model_path: str, tokenizer, log):
        from methods.core.batching import compute_device
        from methods.core.models import load_model, stored_dtype
        from training import lora

        # The base weights stay in the dtype they were saved in (fp16 for the papers' LLaMA rows);
        # only the adapters train in fp32.
        model, _ = load_model(model_path, dtype=stored_dtype(model_path), load_tokenizer=False)
        device = str(compute_device(None if options.device == "auto" else options.device))
        report = lora.recover(model, tokenizer, LoraRecipe.from_spec(lora_spec(options)), device=device,
                              seed=options.seed)
        return model, report


KIND = Lora("lora", "LoRA recovery", needs_steps=False, settings="LoRA recipe fields", distributed=False,
            dynamic_loading=False)
