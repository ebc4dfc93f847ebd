"""The options of one training stage (`lpc train`), declared once with their ranges.

Defaults are the collection's continued pre-training settings (FMS-FSDP and MaxText): AdamW with
betas (0.9, 0.95), eps 1e-8, weight decay 0.1, gradient norm clipped at 1.0, warm-up over 5% of the
steps capped at 2000, cosine down to 10% of the peak learning rate.
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from methods.errors import UsageError
from methods.options import one_line

KINDS = ("cpt", "kd", "sparse", "lora")


class TrainOptions(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    model: str = Field(description="the checkpoint to train: a directory, a hub id, or 'smoke'")
    kind: Literal["cpt", "kd", "sparse", "lora"] = Field(
        description="cpt: next-token cross-entropy; kd: distillation from --teacher; "
                    "sparse: cross-entropy keeping the pruned zeros at zero; lora: LoRA recovery")
    data: str = Field(description="token file, local text, 'smoke', an FMS arrow folder, or a hub name")
    steps: Optional[int] = Field(None, ge=1, description="optimizer steps (lora: default, the recipe's epochs)")
    global_batch: int = Field(ge=1, description="sequences per optimizer step, over all processes")
    micro_batch: int = Field(ge=1, description="sequences per forward pass on one process")
    seqlen: int = Field(ge=2, description="tokens per sequence")
    lr: float = Field(gt=0, description="peak learning rate")
    out: str = Field(description="the output directory (the trained checkpoint and train.json)")
    teacher: Optional[str] = Field(None, description="kd: the teacher checkpoint")
    kd_temperature: float = Field(1.0, gt=0, description="kd: softmax temperature T")
    kd_alpha: float = Field(1.0, ge=0, le=1, description="kd: weight of the KL term (1 = pure distillation)")
    warmup_fraction: float = Field(0.05, ge=0, le=1, description="warm-up steps as a fraction of --steps")
    warmup_cap: int = Field(2000, ge=0, description="at most this many warm-up steps")
    final_lr_fraction: float = Field(0.1, ge=0, le=1, description="the cosine ends at lr times this")
    seed: int = Field(0, description="model-side randomness and the data order")
    shuffle: bool = Field(True, description="a seeded permutation of the windows per epoch")
    nproc: int = Field(1, ge=1, description="processes on this machine (torchrun)")
    save_every: int = Field(0, ge=0, description="a resumable checkpoint every K steps (0: only the last)")
    keep_checkpoints: bool = Field(False, description="keep the sharded checkpoints after the export")
    activation_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="cuda when available, else cpu")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    recipe: Dict[str, Any] = Field(default_factory=dict,
                                   description="lora: the LoRA recipe's other fields (r, alpha, precision, ...)")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainOptions":
        if self.kind != "lora" and self.steps is None:
            raise ValueError(f"kind {self.kind} needs --steps")
        if self.kind != "lora" and self.recipe:
            raise ValueError(f"--option settings are LoRA recipe fields; kind {self.kind} takes none")
        if self.kind == "kd" and not self.teacher:
            raise ValueError("kind kd needs --teacher")
        if self.kind != "kd" and self.teacher:
            raise ValueError(f"--teacher is only used by kind kd, not {self.kind}")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global batch {self.global_batch} is not divisible by micro batch {self.micro_batch}")
        return self

    def fingerprint_fields(self) -> dict:
        """What decides the result: everything but where it goes and how it is scheduled on machines."""
        return self.model_dump(exclude={"out", "nproc", "save_every", "keep_checkpoints", "device"})


def parse_options(values: dict) -> TrainOptions:
    """TrainOptions from a dict, or one UsageError line naming the first bad field."""
    try:
        return TrainOptions(**values)
    except ValidationError as exc:
        raise UsageError(f"lpc train: {one_line(exc, TrainOptions.model_fields)}") from None
