"""The options of one training stage (`lpc train`), declared once with their ranges.

Defaults are the collection's continued pre-training settings (FMS-FSDP and MaxText): AdamW with
betas (0.9, 0.95), eps 1e-8, weight decay 0.1, gradient norm clipped at 1.0, warm-up over 5% of the
steps capped at 2000, cosine down to 10% of the peak learning rate.

Dynamic batch loading (the kinds that allow it; training/data.py `DomainStream`): `--domains` names the
domains, entries of the --data folder, with their initial proportions; every `--update-interval`
steps each domain's loss on held-out windows moves the proportions toward the domains furthest
above their `--reference-loss`.
"""
from __future__ import annotations

from typing import Any, Dict, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from methods.core.batching import accumulation_steps
from methods.core.errors import UsageError
from methods.options import one_line
from training.kinds import KINDS

# How far from 1 a sum of proportions may be (published proportions are rounded to 4 decimals).
PROPORTION_TOLERANCE = 1e-6


class TrainOptions(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    model: str = Field(description="the checkpoint to train: a directory, a hub id, or 'smoke'")
    kind: Literal[tuple(KINDS)] = Field(description="; ".join(f"{k.name}: {k.description}" for k in KINDS.values()))
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
    schedule: Literal["fms", "composer"] = Field(
        "fms", description="fms: min(quadratic warm-up, cosine from step 0) (the collection's FMS-FSDP and "
                           "MaxText); composer: linear warm-up, then cosine over the remaining steps "
                           "(Composer's, which the Sheared LLaMA runs used)")
    seed: int = Field(0, description="model-side randomness and the data order")
    shuffle: bool = Field(True, description="a seeded permutation of the windows per epoch")
    nproc: int = Field(1, ge=1, description="processes on this machine (torchrun)")
    save_every: int = Field(0, ge=0, description="a resumable checkpoint every K steps (0: only the last)")
    keep_checkpoints: bool = Field(False, description="keep the sharded checkpoints after the export")
    activation_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="cuda when available, else cpu")
    engine: Literal["hf", "maxtext"] = Field(
        "hf", description="hf: the kit's PyTorch trainer; maxtext: MaxText's trainer (TPU; kind cpt only)")
    tpu: Optional[str] = Field(
        None, description="--engine maxtext: the TPU slice this command runs on, every host of it (e.g. v4-32; "
                          "jobman's table gives its chips, which share the global batch)")
    phase: Literal["all", "prepare", "run", "export"] = Field(
        "all", description="--engine maxtext: all, or one part of a multi-host run: prepare (convert the "
                           "checkpoint and the data; one host), run (MaxText's trainer; every host of the "
                           "slice), export (the last checkpoint to Hugging Face and train.json; one host)")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    domains: Optional[Dict[str, float]] = Field(
        None, description="dynamic batch loading: domain -> initial proportion; each domain is the entry "
                          "of that name in the --data folder (a file, or a folder of text files)")
    reference_loss: Optional[Dict[str, float]] = Field(
        None, description="dynamic batch loading: domain -> the loss it should reach")
    update_interval: int = Field(0, ge=0, description="dynamic batch loading: steps between proportion "
                                                      "updates (0: the proportions never change)")
    update_rule: Literal["doremi", "bandit", "constant"] = Field(
        "doremi", description="dynamic batch loading: how losses move the proportions")
    clip_excess: bool = Field(False, description="dynamic batch loading: a loss below its reference counts as "
                                                 "no excess (the paper's rule; the original's code does not clip)")
    eval_windows: int = Field(8, ge=1, description="dynamic batch loading: held-out windows per domain whose "
                                                   "loss updates the proportions")
    eval_data: Optional[str] = Field(None, description="dynamic batch loading: a folder with the same domain "
                                                       "entries to measure the losses on (default: the last "
                                                       "--eval-windows windows of each domain are held out)")
    recipe: Dict[str, Any] = Field(default_factory=dict,
                                   description="lora: the LoRA recipe's other fields (r, alpha, precision, ...); "
                                               "sheared: the method's options (target_shape, ...)")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainOptions":
        kind = KINDS[self.kind]
        self._check_maxtext(kind)  # first: the rest checks settings of kinds MaxText does not train
        if kind.needs_steps and self.steps is None:
            raise ValueError(f"kind {self.kind} needs --steps")
        if self.recipe and not kind.settings:
            takes = " or ".join(k.settings for k in KINDS.values() if k.settings)
            raise ValueError(f"--option settings are {takes}; kind {self.kind} takes none")
        kind.check_options(self)
        self._check_domains(kind)
        if self.teacher and not kind.takes_teacher:
            teachers = ", ".join(k.name for k in KINDS.values() if k.takes_teacher)
            raise ValueError(f"--teacher is only used by kind {teachers}, not {self.kind}")
        accumulation_steps(self.global_batch, self.micro_batch)
        return self

    def _check_maxtext(self, kind) -> None:
        if self.engine != "maxtext":
            given = "--tpu" if self.tpu is not None else "--phase" if self.phase != "all" else None
            if given:
                raise ValueError(f"{given} is an --engine maxtext setting (the hf engine runs under torchrun)")
            return
        if self.tpu is not None:
            tpu_slice(self.tpu)
        # What MaxText 0.2.5's pre-training trainer can express; the rest is the kit's own PyTorch engine.
        if "maxtext" not in kind.engines:
            trained = ", ".join(k.name for k in KINDS.values() if "maxtext" in k.engines)
            raise ValueError(f"--engine maxtext trains kind {trained} only, not {self.kind}; use --engine hf")
        if self.nproc != 1:
            raise ValueError("--engine maxtext runs one process per host (MaxText shards over its devices); "
                             "drop --nproc")
        if self.domains is not None:
            raise ValueError("--engine maxtext reads one token file; dynamic batch loading (--domains) needs "
                             "--engine hf")

    def _check_domains(self, kind) -> None:
        dynamic = ("reference_loss", "eval_data") if self.domains is None else ()
        given = [name for name in dynamic if getattr(self, name) is not None]
        if self.domains is None and self.update_interval:
            given.append("update_interval")
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is a dynamic batch loading setting; it needs --domains")
        if self.domains is None:
            return
        if not kind.dynamic_loading:
            raise ValueError(f"kind {self.kind} trains on instruction data; dynamic batch loading (--domains) "
                             "needs another kind")
        if not self.domains:
            raise ValueError("--domains must name at least one domain")
        negative = [name for name, p in self.domains.items() if p < 0]
        if negative:
            raise ValueError(f"--domains: proportion of {negative[0]} is negative ({self.domains[negative[0]]})")
        total = sum(self.domains.values())
        if abs(total - 1) > PROPORTION_TOLERANCE:
            raise ValueError(f"--domains: the proportions sum to {total:.6g}, not 1")
        if self.reference_loss is not None:
            unknown = [name for name in self.reference_loss if name not in self.domains]
            missing = [name for name in self.domains if name not in self.reference_loss]
            if unknown:
                raise ValueError(f"--reference-loss names unknown domain {unknown[0]!r} (the domains: "
                                 f"{', '.join(self.domains)})")
            if missing:
                raise ValueError(f"--reference-loss lacks domain {missing[0]!r}")
        elif self.update_interval and self.update_rule != "constant":
            raise ValueError(f"--update-interval with rule {self.update_rule} needs --reference-loss per domain")

    def fingerprint_fields(self) -> dict:
        """What decides the result: everything but where it goes and how it is scheduled on machines.
        Fields at their defaults are left out, so that a new option does not change earlier runs' identity."""
        return self.model_dump(exclude={"out", "nproc", "save_every", "keep_checkpoints", "device", "tpu", "phase"},
                               exclude_defaults=True)


def tpu_slice(text: str):
    """`--tpu TYPE` as jobman's table describes the slice (hosts, chips), or one UsageError line."""
    from jobman.accelerators import tpu_slice as jobman_tpu_slice
    from jobman.errors import UsageError as JobmanUsageError

    try:
        return jobman_tpu_slice(text)
    except JobmanUsageError as exc:
        raise UsageError(f"--tpu: {exc}") from None


def parse_options(values: dict, *, where: str = "lpc train") -> TrainOptions:
    """TrainOptions from a dict, or one UsageError line naming the first bad field."""
    try:
        return TrainOptions(**values)
    except ValidationError as exc:
        raise UsageError(f"{where}: {one_line(exc, TrainOptions.model_fields)}") from None
