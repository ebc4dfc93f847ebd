"""What a stage is asked to do, below both the recipe (which writes requests) and the stages (which
run them). A request lives as one value from the recipe to the stage: the in-process runner passes
it, and a submitted job reads it back from the manifest file the plan wrote (`lpc prune --request`).

    PruneRequest    lpc prune: model, method, options, calibration, dtypes, out
    TrainOptions    lpc train: training/options.py (the training layer's own request)
    EvalRequest     lpc eval:  which row of which recipe, on which checkpoint
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

from methods.core.errors import UsageError
from methods.core.identity import checkpoint_identity, data_identity

DENSE = "dense"   # the row that evaluates the unpruned model: every recipe has it, and it gates the others


@dataclass(frozen=True)
class PruneRequest:
    """What `lpc prune` is asked to do: every field that decides the pruned checkpoint, and where it goes."""
    model: str
    method: str
    out: Path
    options: Dict[str, Any] = field(default_factory=dict)
    calib: Optional[str] = None
    nsamples: Optional[int] = None           # None: 128, or the rows of a token file
    seqlen: Optional[int] = None             # None: the model's context (max 8192), or a token file's width
    seed: int = 0
    dtype: str = "float32"                   # the dtype the pruned checkpoint is saved in
    compute_dtype: Optional[str] = None      # the dtype the pruning computes in (None: dtype)
    revision: Optional[str] = None
    device: Optional[str] = None             # where layers are computed; not part of the identity
    calib_batch: Union[int, str] = 1         # samples per layer call in the calibration engine (or "auto")
    # For a method whose pruning is a training run: that run's `lpc train` settings (less model, out,
    # kind and the method options, which the request holds); seed and seqlen default to the request's.
    training: Optional[Dict[str, Any]] = None

    def identity(self, needs_calibration: bool) -> Dict[str, object]:
        from methods.core.models import resolve

        model = {**checkpoint_identity(self.model, resolve(self.model)), "revision": self.revision}
        if self.training is not None:
            # The run decides the result: its settings as `lpc train` reads them (defaults left out,
            # so writing one out changes nothing) and the content of its data.
            options = self.pruning_run()
            run = {k: v for k, v in options.fingerprint_fields().items() if k != "model"}
            data = {"data": data_identity(options.data)}
            if options.eval_data:
                data["eval_data"] = data_identity(options.eval_data)
            return {"model": model, "dtype": self.dtype, "method": self.method, "run": run, **data}
        calibration = None
        if needs_calibration:
            calibration = {"spec": self.calib, "nsamples": self.nsamples, "seqlen": self.seqlen,
                           "data": data_identity(self.calib)}
            # Batched calibration rounds differently, so it is a different result; batch 1 stays out of
            # the identity so that checkpoints pruned before the option existed still match.
            if self.calib_batch != 1:
                calibration["batch"] = self.calib_batch
        identity = {"model": model, "dtype": self.dtype, "method": self.method, "options": self.options,
                    "calibration": calibration, "seed": self.seed}
        # Absent when it is the saved dtype, so that checkpoints pruned before the option existed still match.
        if self.compute_dtype not in (None, self.dtype):
            identity["compute_dtype"] = self.compute_dtype
        return identity

    def pruning_run(self):
        """The `lpc train` options of the training run that is this prune (a method that prunes by one):
        kind = the method's, its options as the run's own settings, written into the out folder."""
        import methods
        from training.options import parse_options

        device = self.device or "auto"
        values = {"seed": self.seed, **({"seqlen": self.seqlen} if self.seqlen else {}), **(self.training or {}),
                  "model": self.model, "out": str(self.out), "kind": methods.get(self.method).training_kind,
                  "recipe": self.options, "device": "cuda" if device.startswith("cuda") else device}
        return parse_options(values, where=f"the {self.method} training run")

    def to_json(self) -> Dict[str, Any]:
        return {"stage": "prune", **{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "PruneRequest":
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or data.get("stage") != "prune" or not {"model", "method", "out"} <= set(data):
            raise UsageError(f"{where} is not a prune request (written by the kit's plan)")
        unknown = sorted(set(data) - fields - {"stage"})
        if unknown:
            raise UsageError(f"{where}: unknown field {', '.join(unknown)}")
        values = {k: v for k, v in data.items() if k in fields}
        return cls(**{**values, "out": Path(values["out"])})


@dataclass(frozen=True)
class EvalRequest:
    """What `lpc eval` is asked to do: a recipe row's metrics on a checkpoint, into the results folder."""
    method: str
    profile: str
    row: str
    model: str
    results_dir: Path
    recipe: Optional[Path] = None            # a recipe file instead of repro/recipes/<method>.yaml
    eval_batch_size: Optional[Union[int, str]] = None
    backend: str = "hf"
    gate: bool = False                        # the dense row: exit 1 when it is off its reference
    rehearsal: bool = False                   # the profile as a rehearsal runs it (repro/rehearsal.py)

    def to_json(self) -> Dict[str, Any]:
        return {"stage": "eval", **{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "EvalRequest":
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or data.get("stage") != "eval" or not {"method", "profile", "row", "model",
                                                                             "results_dir"} <= set(data):
            raise UsageError(f"{where} is not an eval request (written by the kit's plan)")
        values = {k: v for k, v in data.items() if k in fields}
        for key in ("results_dir", "recipe"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)


def write_request(request, path: Path) -> Path:
    """A request as the manifest file a stage command reads (`lpc prune|train|eval --request FILE`)."""
    from methods.core.results import write_json_atomic
    from training.stage import write_request as write_train_request

    if hasattr(request, "to_json"):
        write_json_atomic(path, request.to_json(), sort_keys=False)
        return path
    return write_train_request(request, path)


def read_request(path: Path, stage: str):
    """The request of `lpc <stage> --request FILE`, or one line saying what is wrong with the file."""
    from methods.core.results import read_json

    if stage == "train":
        from training.stage import read_request as read_train_request

        return read_train_request(path)
    data = read_json(Path(path))
    return {"prune": PruneRequest, "eval": EvalRequest}[stage].from_json(data, str(path))
