"""A method's recipe, `repro/recipes/<method>.yaml`: what to load, how to calibrate and train, the rows.

One profile of a recipe reads:

    model: smoke                     # what every row starts from (a hub id, a directory, or 'smoke')
    dtype: float32
    calibration: {spec: smoke, nsamples: 16, seqlen: 256, seed: 0}
    training:                        # named train specs: `lpc train` options less --model and --out
      cpt: {kind: cpt, data: smoke, steps: 30, global_batch: 8, micro_batch: 8, seqlen: 256, lr: 3.0e-4}
      kd: {kind: kd, teacher: dense, ...}      # teacher `dense`: the profile's own unpruned model
    rows:
      dense: {}                      # the model itself, evaluated
      n8: {remove_layers: 8}         # method options: prune, then evaluate
      n8-cpt: {remove_layers: 8, train: cpt}   # prune, train with spec `cpt`, evaluate

A row is a pipeline of stages (repro/plan.py): prune (every row but the dense one), train (rows
with `train:`), evaluate. A method whose pruning is a training run (Sheared LLaMA) names the train
spec of that run with `pruning_run: <spec>` (its kind is the method's name; the row's method options
become the run's own settings): `shear-cpt: {target_shape: 1.3b, pruning_run: shear, train: cpt}`. The models below are the schema; a train spec is checked by building the
very options `lpc train` would run with, so a bad spec fails when the recipe is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Dict, Literal, Optional, Union

from pydantic import BeforeValidator, Field, ValidationError, model_validator

from methods.core.errors import UsageError
from methods.core.identity import fingerprint
from repro.requests import DENSE, PruneRequest
from repro.schema import Model, SchemaError, read_yaml, validate

RECIPES = Path(__file__).resolve().parent / "recipes"
# A row's key naming its train spec, and the key naming the spec of the training run that is its
# prune stage (methods whose pruning is a training run); every other key of a row is a method option.
TRAIN = "train"
PRUNING_RUN = "pruning_run"
ROW_STAGE_KEYS = (TRAIN, PRUNING_RUN)
# A train spec's teacher that means the profile's own (unpruned) model.
TEACHER_DENSE = "dense"
# Set by the pipeline for every row: the stage's input and output checkpoints.
PIPELINE_FIELDS = ("model", "out")


BatchSize = Union[Annotated[int, Field(gt=0)], Literal["auto"]]


class RecipeCalibration(Model):
    spec: str                        # a dataset spec or file, as `lpc prune --calib` takes it
    nsamples: Annotated[int, Field(gt=0)]
    seqlen: Annotated[int, Field(gt=0)]
    seed: Optional[int] = None
    # Samples per layer call in the calibration engine (wanda, sparsegpt, wanda-sp); absent = 1, the
    # originals' bit-exact order.
    batch: Optional[BatchSize] = None


_no_options = BeforeValidator(lambda v: {} if v is None else v)


class RecipeProfile(Model):
    """One profile of repro/recipes/<method>.yaml: what to load, how to calibrate and train, the rows."""
    # Absent keys stay absent (the run's defaults apply): the config is part of every row's fingerprint.
    model: str
    revision: Optional[str] = None
    dtype: Optional[str] = None
    # The dtype the prune stage computes in (scores, statistics, weight updates; a pruning run's
    # training); its checkpoint is saved in `dtype`. The smoke profiles use float64: their results
    # then do not depend on the machine's float32 rounding (README, "Results across machines").
    compute_dtype: Optional[Literal["float32", "float64"]] = None
    device: Optional[str] = None
    # Evaluation batch (lm-eval requests and perplexity windows); absent = 1, the papers' setting.
    batch_size: Optional[BatchSize] = None
    limit: Optional[Annotated[int, Field(gt=0)]] = None   # lm-eval examples per task (smoke runs)
    calibration: Optional[RecipeCalibration] = None
    # train spec name -> `lpc train` options less model and out (checked below, as lpc train would)
    training: Optional[Dict[str, Annotated[Dict[str, Any], _no_options]]] = None
    table: Optional[str] = None                           # a table file, relative to the recipe
    # row id -> method options, plus `train: <spec>` ({} for the dense row); methods.make_options checks them
    rows: Annotated[Dict[str, Annotated[Dict[str, Any], _no_options]], Field(min_length=1)]

    @model_validator(mode="after")
    def _training_resolves(self):
        specs = self.training or {}
        runs: Dict[str, list] = {}   # spec -> the rows whose prune stage it is
        for row in self.rows:
            name = self._spec_named(row, PRUNING_RUN, "the dense row is not pruned")
            if name is None:
                continue
            kinds = _pruning_kinds()
            if specs[name].get("kind") not in kinds:
                raise SchemaError(("rows", row, PRUNING_RUN), f"spec {name!r} has kind {specs[name].get('kind')!r}; "
                                  f"a pruning run is of a method that prunes by training ({', '.join(kinds)})")
            runs.setdefault(name, []).append(row)
        for name, spec in specs.items():
            try:
                # A pruning run's own settings are its rows' method options.
                for settings in [{k: v for k, v in self.rows[r].items() if k not in ROW_STAGE_KEYS}
                                 for r in runs.get(name, [])] or [None]:
                    train_options(spec, model="<pruned>", out="<trained>", dense=self.model, settings=settings)
            except UsageError as exc:
                raise SchemaError(("training", name), str(exc)) from None
        for row in self.rows:
            self._spec_named(row, TRAIN, "the dense row evaluates the model itself; train a pruned row")
        return self

    def _spec_named(self, row: str, key: str, dense_refusal: str) -> Optional[str]:
        """The train spec a row names under `key` (None when it names none), or the one-line refusal."""
        name = self.rows[row].get(key)
        if name is None:
            return None
        if row == DENSE:
            raise SchemaError(("rows", row, key), dense_refusal)
        specs = self.training or {}
        if not isinstance(name, str) or name not in specs:
            known = ", ".join(specs) or "none (the profile has no `training:` block)"
            raise SchemaError(("rows", row, key), f"names no train spec: {name!r} (known: {known})")
        return name


class RecipeFile(Model):
    method: Optional[str] = None
    table: Optional[str] = None                           # the table's name (default: the method)
    profiles: Dict[str, Any]                              # validated one at a time, as a run reads one


def train_options(spec: Dict[str, Any], *, model: str, out: str, dense: str, settings: Optional[dict] = None):
    """The `lpc train` options of a train spec for one row: `model` in, `out` out; `teacher: dense`
    is the profile's model; `settings`: a pruning run's method options (the run's --option values).
    Refused in one line as `lpc train` would refuse them (LoRA's fields too)."""
    from methods.options import one_line
    from training.options import TrainOptions

    taken = [key for key in PIPELINE_FIELDS if key in spec]
    if taken:
        raise UsageError(f"{', '.join(taken)} is set by the pipeline (the pruned checkpoint, the row's work "
                         "folder), not by a train spec")
    values = {**spec, "model": str(model), "out": str(out)}
    if settings is not None:
        values["recipe"] = settings
    if values.get("teacher") == TEACHER_DENSE:
        values["teacher"] = dense
    try:
        return TrainOptions(**values)
    except ValidationError as exc:
        raise UsageError(one_line(exc, TrainOptions.model_fields)) from None


@dataclass
class Recipe:
    method: str
    profile: str
    config: dict                     # the profile as written, less rows and table
    rows: Dict[str, dict]            # row id -> method options and `train` ({} for the dense row)
    table: Path
    path: Path                       # the recipe file (jobs submitted elsewhere read it again)

    def options(self, row: str) -> dict:
        """The method options of a row: everything but the names of its train specs."""
        return {k: v for k, v in self.rows[row].items() if k not in ROW_STAGE_KEYS}

    def pruning_run(self, row: str) -> Optional[dict]:
        """The train spec of the training run that is the row's prune stage, if its method prunes so."""
        name = self.rows[row].get(PRUNING_RUN)
        return None if name is None else self.config["training"][name]

    def train_spec(self, row: str) -> Optional[dict]:
        name = self.rows[row].get(TRAIN)
        return None if name is None else self.config["training"][name]

    def train_options(self, row: str, *, model, out):
        spec = self.train_spec(row)
        return None if spec is None else train_options(spec, model=str(model), out=str(out), dense=self.config["model"])

    def prune_request(self, row: str, *, out) -> PruneRequest:
        """The prune stage of a row, as `lpc prune` would be asked for it."""
        calibration = self.config.get("calibration") or {}
        return PruneRequest(model=self.config["model"], method=self.method, out=Path(out), options=self.options(row),
                            calib=calibration.get("spec"), nsamples=calibration.get("nsamples"),
                            seqlen=calibration.get("seqlen"), calib_batch=calibration.get("batch", 1), seed=self.seed,
                            dtype=self.config.get("dtype", "float32"), compute_dtype=self.config.get("compute_dtype"),
                            revision=self.config.get("revision"),
                            device=self.config.get("device"), training=self.pruning_run(row))

    @property
    def rehearsal(self) -> bool:
        """A rehearsal of the profile (repro/rehearsal.py): its results' cells are REHEARSED, not compared."""
        return bool(self.config.get("rehearsal"))

    @property
    def seed(self) -> int:
        """The run's seed (the calibration seed, as the originals seed their entry points)."""
        return int((self.config.get("calibration") or {}).get("seed") or 0)

    def fingerprint(self, row: str, metrics: Dict[str, dict]) -> str:
        """Identity of a row's inputs: a finished result counts only if this still matches.

        The dense row does not depend on the method (only calibration and training are method-specific,
        and the dense row uses neither), so every method's recipe shares one dense result per profile.
        A row depends on its own train spec only, not on the others of the profile.
        """
        # The dense row is neither calibrated, pruned nor trained.
        skip = ("training",) if row != DENSE else ("calibration", "training", "compute_dtype")
        config = {k: v for k, v in self.config.items() if k not in skip}
        identity = {"config": config, "options": self.rows[row], "metrics": metrics}
        if row != DENSE:
            identity["method"] = self.method
        if self.train_spec(row) is not None:
            identity["training"] = self.train_spec(row)
        if self.pruning_run(row) is not None:
            identity["pruning_run"] = self.pruning_run(row)
        return fingerprint(identity)


def load_recipe(method: str, profile: str, path: Optional[Path] = None, *,
                eval_batch_size: Union[int, str, None] = None, rehearsal: bool = False) -> Recipe:
    """The recipe's profile; `eval_batch_size` (`--eval-batch-size`) replaces its evaluation batch, and
    so changes the rows' fingerprints as any other recipe setting would; `rehearsal`: the profile as a
    rehearsal runs it on the CPU against the stand-in mirror (repro/rehearsal.py)."""
    path = Path(path) if path else RECIPES / f"{method}.yaml"
    if not path.is_file():
        raise UsageError(f"no recipe for method {method!r} ({path})")
    data = validate(RecipeFile, read_yaml(path, "recipe") or {}, path.name)
    if profile not in data.profiles:
        raise UsageError(f"recipe {path.name} has no profile {profile!r}; it has {', '.join(data.profiles)}")
    raw = validate(RecipeProfile, data.profiles[profile], f"{path.name}:{profile}")
    _check_pruning_runs(raw, data.method or method, f"{path.name}:{profile}")
    config = raw.model_dump(exclude_unset=True, exclude={"rows", "table"})
    if eval_batch_size is not None:
        from methods.core.batching import parse_batch_size

        config["batch_size"] = parse_batch_size("--eval-batch-size", eval_batch_size)
    rows = raw.rows
    if rehearsal:
        from repro import rehearsal as rehearsing

        config, rows = rehearsing.recipe_config(config, rows, data.method or method)
    table = path.parent / (raw.table or f"../tables/{data.table or method}.yaml")
    return Recipe(data.method or method, profile, config, rows, table.resolve(), path.resolve())


def _pruning_kinds():
    from methods.registry import REGISTRY

    return [m.training_kind for m in REGISTRY.values() if m.trains]


def _check_pruning_runs(profile: RecipeProfile, method: str, where: str) -> None:
    """`pruning_run` belongs to methods whose pruning is a training run, and names a run of their kind."""
    import methods

    declared = methods.get(method)
    for row, options in profile.rows.items():
        name = options.get(PRUNING_RUN)
        if name is None:
            if row != DENSE and declared.prunes_by_training(methods.make_options(declared, {
                    k: v for k, v in options.items() if k not in ROW_STAGE_KEYS})):
                raise UsageError(f"{where}: rows.{row}: method {method!r} prunes by a training run; name its "
                                 f"train spec with `{PRUNING_RUN}:`")
            continue
        if not declared.trains:
            raise UsageError(f"{where}: rows.{row}.{PRUNING_RUN}: method {method!r} does not prune by training")
        kind = profile.training[name].get("kind")
        if kind != declared.training_kind:
            raise UsageError(f"{where}: rows.{row}.{PRUNING_RUN}: spec {name!r} has kind {kind!r}; the pruning "
                             f"run of {method} is kind {declared.training_kind}")
